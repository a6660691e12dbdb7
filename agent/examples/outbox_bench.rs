//! Outbox benchmark (run by `agent/benches/outbox.sh`): append, ack and replay throughput of
//! 200-byte records, and memory while holding a large backlog. The outbox writes the records
//! of an append to segment files (the newest segment of each class grows up to 1 MiB / 4096
//! records) and indexes them in sled, so an append of 1000 records of two classes is two file
//! writes + fsyncs and one sled batch + flush.
//!
//! Usage: `outbox_bench DIR [RECORDS] [BACKLOG_MB]` (defaults 200000 and 0; 0 skips a part).
//! DIR must not exist; it is created and left for the caller to remove.

use std::path::{Path, PathBuf};
use std::time::Instant;

use edge_agent::outbox::{Class, Outbox, OutboxConfig};

const RECORD: usize = 200;
const APPEND_BATCH: usize = 1000;
const READ_BATCH: usize = 500;

fn main() {
    if let Err(e) = run() {
        eprintln!("outbox_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: outbox_bench DIR [RECORDS] [BACKLOG_MB]")?,
    );
    let records: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200_000);
    let backlog_mb: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0);
    let records = records / APPEND_BATCH * APPEND_BATCH;

    let cfg = OutboxConfig {
        max_bytes: 2 * 1024 * 1024 * 1024,
        ..OutboxConfig::default()
    };
    if records > 0 {
        throughput(&dir, &cfg, records)?;
    }
    if backlog_mb > 0 {
        backlog(&dir.join("backlog"), &cfg, backlog_mb)?;
    }
    Ok(())
}

/// (a) append, (c) replay, (b) ack, with raw sled as the in-process peer.
fn throughput(
    dir: &Path,
    cfg: &OutboxConfig,
    records: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    // Peer in the same process: raw sled with the same record size, batch and flush.
    let raw = edge_agent::outbox::raw_sled_append_rate(
        &dir.join("raw-sled"),
        records,
        APPEND_BATCH,
        RECORD,
    )?;
    println!(
        "peer raw sled: apply_batch of {APPEND_BATCH} x {RECORD} B + flush: {raw:.0} records/s"
    );
    let (o, _) = Outbox::open(&dir.join("throughput"), cfg)?;

    // (a) append: batches of 1000 records, one flush per batch (inside append).
    let t = Instant::now();
    append(&o, records)?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "append: {records} records of {RECORD} B in batches of {APPEND_BATCH} (one flush each): \
         {:.0} records/s, {:.1} batches (flushes)/s",
        records as f64 / secs,
        (records / APPEND_BATCH) as f64 / secs
    );

    // (c) replay: read everything back in batches of 500.
    let t = Instant::now();
    let n = read_all(&o)?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "read_after: {n} records in batches of {READ_BATCH}: {:.0} records/s",
        n as f64 / secs
    );

    // (b) ack: cumulative acks every 1000 records (each one batch of deletes + a flush).
    let t = Instant::now();
    let last = o.last_seq();
    let mut removed = 0;
    let mut seq = o.acked_through();
    while seq < last {
        seq = (seq + APPEND_BATCH as u64).min(last);
        removed += o.ack_through(seq)?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "ack_through: {removed} records, acks of {APPEND_BATCH} (one flush each): {:.0} records/s",
        removed as f64 / secs
    );
    o.verify()?;
    Ok(())
}

fn append(o: &Outbox, records: usize) -> Result<(), Box<dyn std::error::Error>> {
    let mut batch: Vec<(Class, Vec<u8>)> = Vec::with_capacity(APPEND_BATCH);
    for b in 0..records / APPEND_BATCH {
        batch.clear();
        for i in 0..APPEND_BATCH {
            let class = if i % 100 == 0 {
                Class::Event
            } else {
                Class::Telemetry
            };
            batch.push((class, vec![(b + i) as u8; RECORD]));
        }
        o.append(&batch)?;
    }
    Ok(())
}

fn read_all(o: &Outbox) -> Result<u64, Box<dyn std::error::Error>> {
    let mut after = o.acked_through();
    let mut n = 0u64;
    loop {
        let batch = o.read_after(after, READ_BATCH, usize::MAX)?;
        let Some(last) = batch.last() else {
            return Ok(n);
        };
        after = last.seq;
        n += batch.len() as u64;
    }
}

/// (d) hold a backlog of `mb` MiB of 200-byte records, read it all, report memory and disk.
fn backlog(dir: &Path, cfg: &OutboxConfig, mb: u64) -> Result<(), Box<dyn std::error::Error>> {
    let records = (mb * 1024 * 1024 / RECORD as u64) as usize;
    let (o, _) = Outbox::open(dir, cfg)?;
    if let Some(n) = std::env::var("OUTBOX_SEG_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        o.set_segment_limits(n, usize::MAX);
        println!("backlog: segments of at most {n} records");
    }
    println!("backlog: before: {}", memory());
    let t = Instant::now();
    append(&o, records)?;
    let append_secs = t.elapsed().as_secs_f64();
    let s = o.stats();
    println!(
        "backlog: appended {} records ({} MiB of payload) in {append_secs:.1} s ({:.0} records/s); \
         stored_bytes {} MiB, size_on_disk {} MiB, {} segments (files); {}",
        s.last_seq,
        s.last_seq * RECORD as u64 / (1024 * 1024),
        s.last_seq as f64 / append_secs,
        s.stored_bytes / (1024 * 1024),
        s.size_on_disk / (1024 * 1024),
        o.segment_count()?,
        memory()
    );
    let t = Instant::now();
    let n = read_all(&o)?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "backlog: read_after {n} records in {secs:.1} s ({:.0} records/s); {}",
        n as f64 / secs,
        memory()
    );
    drop(o);
    // Reopen (restart with the backlog), then read it again.
    let t = Instant::now();
    let (o, _) = Outbox::open(dir, cfg)?;
    let open_secs = t.elapsed().as_secs_f64();
    let n = read_all(&o)?;
    println!(
        "backlog: reopened in {open_secs:.2} s, read {n} records again; size_on_disk {} MiB; {}",
        o.size_on_disk()? / (1024 * 1024),
        memory()
    );
    Ok(())
}

/// VmHWM and VmRSS of this process.
fn memory() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l[name.len()..].trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    format!("VmHWM {}, VmRSS {}", field("VmHWM:"), field("VmRSS:"))
}
