//! Micro benchmark of one model through `shared::engine::Model`: per-row time at batch 1
//! (one run per row) and batch 1000, single thread, best of several repetitions.
//! Usage: `cargo run --release -p shared --example tree_bench -- MODEL.onnx INPUT.csv [REPS]`
//! (or a directory holding `model.onnx` and `input.csv` in place of the two paths).

use std::path::{Path, PathBuf};
use std::time::Instant;

use shared::engine::{Batch, Model};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model_path, csv_path, rest) = match args.as_slice() {
        [dir, rest @ ..] if Path::new(dir).is_dir() => (
            Path::new(dir).join("model.onnx"),
            Path::new(dir).join("input.csv"),
            rest,
        ),
        [m, c, rest @ ..] => (PathBuf::from(m), PathBuf::from(c), rest),
        _ => anyhow::bail!("usage: tree_bench MODEL.onnx INPUT.csv [REPS] | tree_bench DIR [REPS]"),
    };
    let reps: usize = rest.first().and_then(|r| r.parse().ok()).unwrap_or(7);
    let model = Model::load(&model_path)?;
    let mut rdr = csv::Reader::from_path(&csv_path)?;
    let header: Vec<String> = rdr.headers()?.iter().map(String::from).collect();
    let rows: Vec<Vec<String>> = rdr
        .records()
        .map(|r| Ok(r?.iter().map(String::from).collect()))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!rows.is_empty(), "{} has no rows", csv_path.display());
    let batch = |n: usize, offset: usize| -> anyhow::Result<Batch> {
        let mut b = model.batch_builder();
        b.set_header(&header)?;
        for i in 0..n {
            b.push_csv(&rows[(offset + i) % rows.len()], i as u64 + 2)?;
        }
        Ok(b.take())
    };

    // TREE_BENCH_ONLY=1000 (or =1) skips the other measurement, e.g. for a profiler.
    let only = std::env::var("TREE_BENCH_ONLY").ok();
    let n_singles = if only.as_deref() == Some("1000") {
        0
    } else {
        rows.len().min(500)
    };
    let singles: Vec<Batch> = (0..n_singles)
        .map(|i| batch(1, i))
        .collect::<anyhow::Result<_>>()?;
    for b in &singles {
        model.run(b)?;
    }
    let mut b1 = f64::MAX;
    for _ in 0..if singles.is_empty() { 0 } else { reps } {
        let t = Instant::now();
        for b in &singles {
            std::hint::black_box(model.run(b)?);
        }
        b1 = b1.min(t.elapsed().as_secs_f64() * 1e6 / singles.len() as f64);
    }
    let big = batch(1000, 0)?;
    model.run(&big)?;
    let mut b1000 = f64::MAX;
    for _ in 0..if only.as_deref() == Some("1") {
        0
    } else {
        reps.max(3)
    } {
        let t = Instant::now();
        std::hint::black_box(model.run(&big)?);
        b1000 = b1000.min(t.elapsed().as_secs_f64() * 1e6 / 1000.0);
    }
    println!(
        "{}: batch 1 {b1:.2} us/row, batch 1000 {b1000:.3} us/row",
        model_path.display()
    );
    Ok(())
}
