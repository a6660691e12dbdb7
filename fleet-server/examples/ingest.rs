//! A standalone fleet ingest for benchmarks and manual runs until `fleet-server` serves it:
//! `ingest serve mqtt://127.0.0.1:1883 DIR` stores and acknowledges device records (Ctrl-C
//! or SIGTERM stops it); `ingest check DIR DEVICE` prints what was stored as JSON (count,
//! first and last seq, the outbox epochs in stored order, whether seqs are strictly
//! increasing within each epoch, the device's state with its drop counters).

use std::path::PathBuf;
use std::sync::Arc;

use fleet_server::ingest::{self, FileStore, IngestConfig, IngestCounters};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve", url, dir] => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let stop = tokio_util::sync::CancellationToken::new();
            let store = FileStore::open(&PathBuf::from(dir))?;
            let counters = Arc::new(IngestCounters::default());
            let s = stop.clone();
            rt.block_on(async move {
                tokio::spawn(async move {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .ok();
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                    }
                    s.cancel();
                });
                ingest::run(IngestConfig::new(url), store, counters, stop).await
            })?;
            Ok(())
        }
        ["check", dir, device] => {
            let dir = PathBuf::from(dir);
            let state = FileStore::read_state(&dir, device)?;
            let recs = FileStore::read_stored(&dir, device, usize::MAX)?;
            // within an epoch (a new epoch restarts the device's seqs)
            let increasing = recs
                .windows(2)
                .all(|w| w[0].1.seq < w[1].1.seq || (w[1].0 != 0 && w[0].0 != w[1].0));
            let mut epochs: Vec<u64> = recs.iter().map(|(e, _)| *e).collect();
            epochs.dedup();
            let out = serde_json::json!({
                "stored": recs.len(),
                "first_seq": recs.first().map(|(_, r)| r.seq),
                "last_seq": recs.last().map(|(_, r)| r.seq),
                "epochs": epochs,
                "strictly_increasing": increasing,
                "state": state,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        _ => {
            eprintln!("usage: ingest serve mqtt://HOST:PORT DIR | ingest check DIR DEVICE");
            std::process::exit(64);
        }
    }
}
