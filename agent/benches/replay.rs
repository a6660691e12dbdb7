//! Replay benchmark (run by `bash agent/benches/replay.sh`): a backlog already in the sled
//! outbox is synced to Mosquitto on loopback until the in-process fleet ingest has stored
//! and acknowledged every record; the peer, in the same run and against the same broker, is
//! a plain rumqttc QoS 1 publisher of the same number of messages of the same size, one per
//! publish, timed until every PUBACK arrived.
//!
//! Usage: replay [RECORDS] [RECORD_BYTES]   (defaults 200000 and 200)

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_agent::outbox::{Class, Outbox, OutboxConfig};
use edge_agent::sync::{self, SyncConfig, SyncCounters};
use fleet_server::ingest::{self, FileStore, IngestConfig, IngestCounters};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use shared::wire;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18830)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let n: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let size: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let tmp = tempfile::Builder::new().prefix("replay-bench-").tempdir()?;
    let port = free_port();
    let conf = tmp.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"
        ),
    )?;
    let _broker = Broker(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start mosquitto: {e}"))?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("mosquitto did not start".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("mqtt://127.0.0.1:{port}");

    // 1. the backlog: n records of `size` bytes of JSON body
    let (outbox, _) = Outbox::open(&tmp.path().join("outbox"), &OutboxConfig::default())?;
    let t = Instant::now();
    let mut i = 0u64;
    while i < n {
        let k = (n - i).min(1000);
        let recs: Vec<(Class, Vec<u8>)> = (0..k)
            .map(|j| {
                let head = format!("{{\"i\":{},\"pad\":\"", i + j);
                let pad = size.saturating_sub(head.len() + 2);
                // random hex digits: about as compressible as real telemetry (~2x), unlike
                // a run of one character
                let mut x = (i + j).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let digits: String = (0..pad)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        char::from(b"0123456789abcdef"[(x & 15) as usize])
                    })
                    .collect();
                (Class::Telemetry, format!("{head}{digits}\"}}").into_bytes())
            })
            .collect();
        outbox.append(&recs)?;
        i += k;
    }
    let fill = t.elapsed();
    let last = outbox.last_seq();
    println!(
        "backlog: {n} records of {size} bytes appended in {:.2} s ({:.0} records/s)",
        fill.as_secs_f64(),
        n as f64 / fill.as_secs_f64()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // 2. replay through sync -> mosquitto -> ingest (store fsync, then ack)
    let stop = CancellationToken::new();
    let icounters = Arc::new(IngestCounters::default());
    let mut icfg = IngestConfig::new(&url);
    icfg.client_id = "bench-ingest".into();
    let store = FileStore::open(&tmp.path().join("fleet"))?;
    let ingest_task = rt.spawn(ingest::run(icfg, store, icounters.clone(), stop.clone()));
    let connected = Instant::now();
    while icounters.connected.load(Ordering::Relaxed) == 0 {
        if connected.elapsed() > Duration::from_secs(10) {
            return Err("ingest did not connect".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200)); // subscriptions in place
    let cfg = SyncConfig {
        urls: vec![url.clone()],
        ..SyncConfig::default()
    };
    let counters = Arc::new(SyncCounters::default());
    let status: Arc<dyn Fn() -> wire::Birth + Send + Sync> = Arc::new(|| wire::Birth {
        v: wire::VERSION,
        device: "bench".into(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        models: vec![],
        started_at_ms: 0,
        sent_at_ms: 0,
        tags: Default::default(),
    });
    let events: edge_agent::command::EventFn = Arc::new(|_: &str, _| {});
    let commands = edge_agent::command::Commands::open(
        "bench",
        &[],
        std::path::Path::new(outbox.path()),
        events,
    )
    .map_err(|e| e.to_string())?;
    let hooks = sync::SyncHooks {
        status,
        commands: Arc::new(commands),
    };
    let t = Instant::now();
    let sync_task = rt.spawn(sync::run(
        cfg.clone(),
        "bench".into(),
        outbox.clone(),
        hooks,
        counters.clone(),
        Arc::new(Notify::new()),
        stop.clone(),
    ));
    while outbox.acked_through() < last {
        if t.elapsed() > Duration::from_secs(600) {
            return Err(format!(
                "replay stalled: acked through {} of {last}",
                outbox.acked_through()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let replay = t.elapsed();
    stop.cancel();
    rt.block_on(sync_task)??;
    rt.block_on(ingest_task)??;
    let stored = FileStore::read_state(&tmp.path().join("fleet"), "bench")?
        .map_or(0, |s| s.received_total());
    if stored != n {
        return Err(format!("the fleet stored {stored} of {n} records").into());
    }
    let batches = counters.published_batches.load(Ordering::Relaxed);
    println!(
        "replay: {n} records acked in {:.2} s = {:.0} records/s ({} batches of <= {} records, {} compressed, {:.1} MB on the wire, {} replays)",
        replay.as_secs_f64(),
        n as f64 / replay.as_secs_f64(),
        batches,
        cfg.batch_max_records,
        counters.compressed_batches.load(Ordering::Relaxed),
        counters.published_bytes.load(Ordering::Relaxed) as f64 / 1e6,
        counters.replays.load(Ordering::Relaxed),
    );

    // 3. peer: plain rumqttc QoS 1, one message per publish, until all PUBACKs
    let payload = vec![b'x'; size];
    let peer = rt.block_on(async move {
        let mut o = MqttOptions::new("bench-peer", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(o, 1000);
        let producer = {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..n {
                    if client
                        .publish("bench/peer", QoS::AtLeastOnce, false, payload.clone())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            })
        };
        let t = Instant::now();
        let mut acked = 0u64;
        while acked < n {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => return Err(format!("peer: {e}")),
            }
        }
        let took = t.elapsed();
        let _ = producer.await;
        Ok(took)
    })?;
    println!(
        "peer (rumqttc QoS1 publisher, one {size}-byte message per publish): {n} messages acked in {:.2} s = {:.0} messages/s",
        peer.as_secs_f64(),
        n as f64 / peer.as_secs_f64()
    );
    println!(
        "ratio replay/peer: {:.2}; peak RSS of this process: {} MiB",
        peer.as_secs_f64() / replay.as_secs_f64(),
        rss_kib() / 1024
    );
    Ok(())
}
