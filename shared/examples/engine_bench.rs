//! Per-row latency of the engine on the corpus' benchmark models, single thread, at batch 1
//! and batch 1000. Prints JSON `{model_id: {"batch1_us": .., "batch1000_us": ..}}`.
//! Usage: `cargo run --release -p shared --example engine_bench -- [CORPUS_DIR] [--reps N]`.
//! `shared/benches/run.sh` runs it next to onnxruntime and prints the ratios.

use std::path::{Path, PathBuf};
use std::time::Instant;

use shared::engine::{Batch, Model};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut corpus = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/dev"));
    let mut reps = 5usize;
    let mut only: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => reps = it.next().and_then(|v| v.parse().ok()).unwrap_or(reps),
            "--only" => only = it.next().cloned(),
            other => corpus = PathBuf::from(other),
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&corpus)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dirs.sort();
    let mut report = serde_json::Map::new();
    for dir in dirs {
        let Ok(meta) = std::fs::read_to_string(dir.join("meta.json")) else {
            continue;
        };
        let meta: serde_json::Value = serde_json::from_str(&meta)?;
        let id = meta["id"].as_str().unwrap_or_default().to_string();
        if meta["bench"] != serde_json::Value::Bool(true)
            || only.as_ref().is_some_and(|o| !id.contains(o.as_str()))
        {
            continue;
        }
        let model = Model::load(&dir.join("model.onnx"))?;
        let rows = read_rows(&dir.join("input.csv"))?;
        let (b1, b1000) = bench(&model, &rows, reps)?;
        eprintln!("{id}: batch 1 {b1:.2} us/row, batch 1000 {b1000:.3} us/row");
        report.insert(
            id,
            serde_json::json!({"batch1_us": b1, "batch1000_us": b1000}),
        );
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn read_rows(path: &Path) -> anyhow::Result<(Vec<String>, Vec<Vec<String>>)> {
    let mut rdr = csv::Reader::from_path(path)?;
    let header = rdr.headers()?.iter().map(String::from).collect();
    let rows = rdr
        .records()
        .map(|r| Ok(r?.iter().map(String::from).collect()))
        .collect::<anyhow::Result<_>>()?;
    Ok((header, rows))
}

fn batch_of(
    model: &Model,
    header: &[String],
    rows: &[Vec<String>],
    n: usize,
    offset: usize,
) -> anyhow::Result<Batch> {
    let mut b = model.batch_builder();
    b.set_header(header)?;
    for i in 0..n {
        b.push_csv(&rows[(offset + i) % rows.len()], i as u64 + 2)?;
    }
    Ok(b.take())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(
    model: &Model,
    (header, rows): &(Vec<String>, Vec<Vec<String>>),
    reps: usize,
) -> anyhow::Result<(f64, f64)> {
    // batch 1: one run per row, as the agent's online path does
    let singles: Vec<Batch> = (0..rows.len().min(200))
        .map(|i| batch_of(model, header, rows, 1, i))
        .collect::<anyhow::Result<_>>()?;
    for b in &singles {
        model.run(b)?; // warm-up
    }
    let mut b1 = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        for b in &singles {
            std::hint::black_box(model.run(b)?);
        }
        b1.push(t.elapsed().as_secs_f64() * 1e6 / singles.len() as f64);
    }
    // batch 1000
    let big = batch_of(model, header, rows, 1000, 0)?;
    model.run(&big)?;
    let mut b1000 = Vec::new();
    for _ in 0..reps.max(3) {
        let t = Instant::now();
        std::hint::black_box(model.run(&big)?);
        b1000.push(t.elapsed().as_secs_f64() * 1e6 / 1000.0);
    }
    Ok((median(b1), median(b1000)))
}
