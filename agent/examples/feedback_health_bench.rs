//! Benchmark of the feedback log and the health sampler (run by `agent/benches/feedback_health.sh`):
//! `Feedback::record` per row (batches of 1 and 64) against a peer, a plain
//! `Mutex<HashMap<String, _>>` insert of the same ids; `apply` per item; `summary` with a full
//! window; RSS of a full 100,000-entry log; `SystemSampler::sample` against the peer reading
//! /proc/self/status and /proc/meminfo directly; `EwmaChart::observe`.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::Instant;

use edge_agent::feedback::{
    Feedback, FeedbackConfig, Label, ModelKey, ModelSpec, Predicted, Task, Truth,
};
use edge_agent::system::{ChartConfig, EwmaChart, ServingInput, SystemSampler};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn ns_per(start: Instant, n: usize) -> f64 {
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let n: usize = 100_000;
    let ids: Vec<String> = (0..n as u64)
        .map(|i| format!("box-17-3-19a2b3c4d5e-{i:x}"))
        .collect();
    let classes: Vec<String> = vec!["ok".into(), "failure".into()];
    let spec = ModelSpec {
        task: Task::Classifier {
            classes: classes.into(),
            positive: Some(1),
        },
        group_feature: Some("site".into()),
        reference_group: None,
        baseline: None,
    };
    let key = ModelKey::new("pdm", "1.0", 3);
    let groups: Vec<String> = (0..64).map(|i| format!("site-{}", i % 4)).collect();
    let preds: Vec<Option<Predicted>> = (0..64)
        .map(|i| {
            Some(Predicted::Class {
                index: (i % 2) as u32,
                positive_proba: Some(0.25),
            })
        })
        .collect();

    let rss0 = rss_kib();
    let f = Feedback::new(FeedbackConfig::default()).expect("config");
    f.register(&key, spec.clone());
    let t = Instant::now();
    for chunk in ids.chunks(64) {
        let k = chunk.len();
        black_box(f.record(chunk, &key, &preds[..k], Some(&groups[..k])));
    }
    let record64 = ns_per(t, n);
    let rss_full = rss_kib();
    // a second pass: every record evicts one
    let t = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        black_box(f.record(
            std::slice::from_ref(id),
            &key,
            &preds[i % 64..i % 64 + 1],
            Some(&groups[i % 64..i % 64 + 1]),
        ));
    }
    let record1 = ns_per(t, n);

    let peer: Mutex<HashMap<String, (u32, u64)>> = Mutex::new(HashMap::with_capacity(n));
    let t = Instant::now();
    for chunk in ids.chunks(64) {
        let mut m = peer.lock().expect("lock");
        for id in chunk {
            m.insert(id.clone(), (1, 0));
        }
    }
    let peer64 = ns_per(t, n);
    black_box(&peer);

    let t = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let label = if i % 3 == 0 { "failure" } else { "ok" };
        black_box(
            f.apply(id, Truth::Label(Label::Text(label.into())))
                .expect("apply"),
        );
    }
    let apply = ns_per(t, n);
    let t = Instant::now();
    let reps = 100;
    for _ in 0..reps {
        black_box(f.summary(&key));
    }
    let summary_us = ns_per(t, reps) / 1000.0;

    let dir = std::env::temp_dir();
    let mut sampler = SystemSampler::new(&dir);
    sampler.sample(&ServingInput::default());
    let reps = 200;
    let t = Instant::now();
    for i in 0..reps {
        black_box(sampler.sample(&ServingInput {
            ok_total: i as u64,
            ..ServingInput::default()
        }));
    }
    let sample_us = ns_per(t, reps) / 1000.0;
    let t = Instant::now();
    for _ in 0..reps {
        black_box(std::fs::read_to_string("/proc/self/status").ok());
        black_box(std::fs::read_to_string("/proc/meminfo").ok());
    }
    let proc_us = ns_per(t, reps) / 1000.0;

    let mut chart = EwmaChart::new(ChartConfig::default()).expect("chart");
    let reps = 1_000_000;
    let t = Instant::now();
    for i in 0..reps {
        black_box(chart.observe(100.0 + (i % 7) as f64));
    }
    let ewma = ns_per(t, reps);

    println!(
        "feedback log, {n} entries, ids like {:?} ({} bytes):",
        ids[n - 1],
        ids[n - 1].len()
    );
    println!("  record, batches of 64:      {record64:8.0} ns/row");
    println!("  record, one row (evicting): {record1:8.0} ns/row");
    println!("  peer: Mutex<HashMap<String,_>> insert, batches of 64: {peer64:8.0} ns/row");
    println!("  apply:                      {apply:8.0} ns/item");
    println!("  summary (window 1000, groups): {summary_us:8.1} us");
    println!(
        "  RSS of the full log: {} KiB ({:.0} bytes/entry; estimate {} bytes/entry)",
        rss_full.saturating_sub(rss0),
        (rss_full.saturating_sub(rss0) * 1024) as f64 / n as f64,
        f.approx_memory_bytes(ids[0].len()) / n
    );
    println!("health:");
    println!("  SystemSampler::sample:      {sample_us:8.1} us");
    println!("  peer: read /proc/self/status + /proc/meminfo: {proc_us:8.1} us");
    println!("  EwmaChart::observe:         {ewma:8.1} ns");
}
