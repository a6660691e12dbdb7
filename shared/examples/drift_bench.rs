//! Drift update cost: ns per feature per row of `DriftState::observe_row` (10 reference bins,
//! row-major rows, 1% missing values), single thread.
//!
//! `cargo run --release -p shared --example drift_bench -- --features F [--rows N]
//! [--block B] [--reps R] [--dump DIR]`
//!
//! Builds a reference profile from 100,000 rows, then observes N rows (default 1e7) by
//! cycling over a block of B distinct rows (default 1e6), R times (default 3), and prints
//! JSON `{features, rows, reps, ns_per_feature_row_best, ns_per_feature_row_median}`.
//! With `--dump DIR` it also writes the block (`DIR/block.f64`, little-endian f64,
//! row-major) and the profile (`DIR/reference.json`) so `shared/benches/drift.sh` can run
//! numpy on the same arrays.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;
use shared::bundle::ReferenceProfile;
use shared::drift::{self, DriftState};

fn rows(rng: &mut StdRng, n: usize, features: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n * features);
    for _ in 0..n {
        for j in 0..features {
            let z: f64 = rng.sample(StandardNormal);
            let v = if rng.random::<f64>() < 0.01 {
                f64::NAN
            } else {
                j as f64 + (1.0 + (j % 3) as f64) * z
            };
            out.push(v);
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut features, mut total, mut block, mut reps) =
        (6usize, 10_000_000usize, 1_000_000usize, 3usize);
    let mut dump: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = || -> anyhow::Result<usize> {
            let v = it
                .next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))?;
            Ok(v.parse::<f64>()? as usize)
        };
        match a.as_str() {
            "--features" => features = num()?,
            "--rows" => total = num()?,
            "--block" => block = num()?,
            "--reps" => reps = num()?,
            "--dump" => dump = it.next().map(PathBuf::from),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let block = block.min(total).max(1);
    let mut rng = StdRng::seed_from_u64(42);

    let sample = rows(&mut rng, 100_000, features);
    let reference = ReferenceProfile {
        rows: 100_000,
        features: (0..features)
            .map(|j| {
                let col: Vec<f64> = sample.iter().skip(j).step_by(features).copied().collect();
                drift::profile(&format!("f{j}"), &col, 10)
            })
            .collect(),
        predictions: None,
    };
    let data = rows(&mut rng, block, features);
    if let Some(dir) = &dump {
        std::fs::create_dir_all(dir)?;
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.join("block.f64"), bytes)?;
        std::fs::write(dir.join("reference.json"), serde_json::to_vec(&reference)?)?;
    }

    let mut times = Vec::with_capacity(reps);
    let mut state = DriftState::new(&reference);
    for _ in 0..reps {
        state.reset();
        let start = Instant::now();
        let mut done = 0;
        while done < total {
            let n = block.min(total - done);
            for row in data[..n * features].chunks_exact(features) {
                state.observe_row(black_box(row))?;
            }
            done += n;
        }
        let secs = start.elapsed().as_secs_f64();
        black_box(&state);
        times.push(secs * 1e9 / (total as f64 * features as f64));
    }
    // the work was done: every row counted
    anyhow::ensure!(
        state.rows() == total as u64,
        "rows {} != {total}",
        state.rows()
    );
    let s = state.summary(0, 1);
    let counted: u64 = s.features.iter().map(|f| f.count + f.missing).sum();
    anyhow::ensure!(counted == (total * features) as u64, "values {counted}");
    times.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "features": features,
            "rows": total,
            "reps": reps,
            "ns_per_feature_row_best": times[0],
            "ns_per_feature_row_median": times[times.len() / 2],
        })
    );
    Ok(())
}
