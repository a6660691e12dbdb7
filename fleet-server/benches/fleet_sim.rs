//! Simulated devices for the fleet benchmark (`benches/rollout10k.sh`): N lightweight MQTT
//! clients (rumqttc, one task each) that speak the device side of protocol v1 as the agent
//! does, without models: a retained birth with tags, verification of signed directives with
//! the fleet's directive key, a reply, the bundle download in chunks (every chunk's hash and
//! the whole file's SHA-256 checked), then `activated` and `committed` event records in a
//! sequenced batch (acknowledged by the fleet ingest), and a new birth.
//!
//! `fleet_sim --mqtt 127.0.0.1:1883 --devices 10000 --directive-pub FILE [--tags site=a]
//!  [--prefix edge/v1] [--ramp-per-sec 1000] [--report-every 5]` runs until killed; every
//! `--report-every` seconds it prints one JSON line: connected, births, directives,
//! downloads done, committed, errors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sha2::{Digest, Sha256};
use shared::delivery::{self, ChunkRequest};
use shared::directive::{Action, DirectiveVerifier};
use shared::wire;

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    births: AtomicU64,
    directives: AtomicU64,
    rejected: AtomicU64,
    chunks: AtomicU64,
    downloads: AtomicU64,
    committed: AtomicU64,
    rollbacks: AtomicU64,
    errors: AtomicU64,
}

struct Args {
    host: String,
    port: u16,
    devices: usize,
    prefix: String,
    tags: BTreeMap<String, String>,
    directive_pub: std::path::PathBuf,
    ramp: u64,
    report_every: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        host: "127.0.0.1".into(),
        port: 1883,
        devices: 100,
        prefix: "edge/v1".into(),
        tags: BTreeMap::new(),
        directive_pub: "directive.pub".into(),
        ramp: 1000,
        report_every: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--bench" {
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--mqtt" => {
                let (h, p) = v.rsplit_once(':').ok_or("--mqtt HOST:PORT")?;
                a.host = h.to_string();
                a.port = p.parse().map_err(|_| "--mqtt: bad port")?;
            }
            "--devices" => a.devices = v.parse().map_err(|_| "--devices: a number")?,
            "--prefix" => a.prefix = v,
            "--tags" => {
                for kv in v.split(',').filter(|s| !s.is_empty()) {
                    let (k, v) = kv.split_once('=').ok_or("--tags k=v,k=v")?;
                    a.tags.insert(k.to_string(), v.to_string());
                }
            }
            "--directive-pub" => a.directive_pub = v.into(),
            "--ramp-per-sec" => a.ramp = v.parse().map_err(|_| "--ramp-per-sec: a number")?,
            "--report-every" => a.report_every = v.parse().map_err(|_| "--report-every")?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(a)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Download {
    directive: String,
    model: String,
    release: u64,
    sha256: String,
    bytes: u64,
    next: u32,
    chunks: Option<u32>,
    hasher: Sha256,
    in_window: u32,
}

struct Device {
    id: String,
    prefix: String,
    tags: BTreeMap<String, String>,
    models: Vec<wire::ModelVersion>,
    last_counter: u64,
    seq: u64,
    download: Option<Download>,
}

impl Device {
    fn topic(&self, leaf: &str) -> String {
        format!("{}/{}/{leaf}", self.prefix, self.id)
    }

    fn birth(&self) -> Vec<u8> {
        wire::to_json(&wire::Status::Online(wire::Birth {
            v: wire::VERSION,
            device: self.id.clone(),
            agent_version: "sim".into(),
            models: self.models.clone(),
            started_at_ms: 1,
            sent_at_ms: now_ms(),
            tags: self.tags.clone(),
        }))
    }

    fn events_batch(&mut self, events: &[(&str, &str, serde_json::Value)]) -> Vec<u8> {
        let prev = self.seq;
        let records: Vec<serde_json::Value> = events
            .iter()
            .map(|(name, model, detail)| {
                self.seq += 1;
                serde_json::json!({"seq": self.seq, "class": "event", "produced_at_ms": now_ms(),
                    "body": {"kind": "event", "event": name, "model": model, "at_ms": now_ms(), "detail": detail}})
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"v": 1, "device": self.id, "first": prev + 1,
            "last": self.seq, "prev": prev, "records": records, "epoch": 1, "sent_at_ms": now_ms()}))
        .unwrap_or_default()
    }

    fn request(&self, d: &Download, from: u32, count: u32) -> Vec<u8> {
        wire::to_json(&ChunkRequest {
            v: 1,
            sha256: d.sha256.clone(),
            from,
            count,
        })
    }
}

async fn run_device(
    mut dev: Device,
    host: String,
    port: u16,
    verifier: Arc<DirectiveVerifier>,
    stats: Arc<Stats>,
) {
    let mut opts = MqttOptions::new(dev.id.clone(), host, port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    let will = wire::to_json(&wire::Status::Offline(wire::Death {
        v: 1,
        device: dev.id.clone(),
        reason: "connection-lost".into(),
    }));
    opts.set_last_will(rumqttc::LastWill::new(
        dev.topic("status"),
        will,
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut events) = AsyncClient::new(opts, 64);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                stats.connected.fetch_add(1, Ordering::Relaxed);
                for leaf in ["commands", delivery::CHUNK_LEAF, "ack"] {
                    let _ = client.subscribe(dev.topic(leaf), QoS::AtLeastOnce).await;
                }
                let _ = client
                    .publish(dev.topic("status"), QoS::AtLeastOnce, true, dev.birth())
                    .await;
                stats.births.fetch_add(1, Ordering::Relaxed);
                if let Some(d) = &dev.download {
                    let req = dev.request(d, d.next, delivery::MAX_WINDOW);
                    let _ = client
                        .publish(dev.topic(delivery::GET_LEAF), QoS::AtLeastOnce, false, req)
                        .await;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic.ends_with("/commands") {
                    handle_directive(&mut dev, &client, &verifier, &stats, &p.payload).await;
                } else if p.topic.ends_with(delivery::CHUNK_LEAF) {
                    handle_chunk(&mut dev, &client, &stats, &p.payload).await;
                }
            }
            Ok(_) => {}
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn handle_directive(
    dev: &mut Device,
    client: &AsyncClient,
    verifier: &DirectiveVerifier,
    stats: &Stats,
    payload: &[u8],
) {
    stats.directives.fetch_add(1, Ordering::Relaxed);
    let directive = match verifier.verify(payload, &dev.id, now_ms(), dev.last_counter) {
        Ok(d) => d,
        Err(e) => {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            let id = shared::directive::unverified_id(payload).unwrap_or_default();
            let reply = wire::CommandReply {
                v: 1,
                id,
                ok: false,
                error: Some(e.to_string()),
            };
            let _ = client
                .publish(
                    dev.topic("replies"),
                    QoS::AtLeastOnce,
                    false,
                    wire::to_json(&reply),
                )
                .await;
            return;
        }
    };
    dev.last_counter = directive.counter;
    let reply = wire::CommandReply {
        v: 1,
        id: directive.id.clone(),
        ok: true,
        error: None,
    };
    let _ = client
        .publish(
            dev.topic("replies"),
            QoS::AtLeastOnce,
            false,
            wire::to_json(&reply),
        )
        .await;
    match directive.action {
        Action::Install {
            model,
            release,
            bundle_sha256,
            bundle_bytes,
            ..
        } => {
            let d = Download {
                directive: directive.id,
                model,
                release,
                sha256: bundle_sha256,
                bytes: bundle_bytes,
                next: 0,
                chunks: None,
                hasher: Sha256::new(),
                in_window: delivery::MAX_WINDOW,
            };
            let req = dev.request(&d, 0, delivery::MAX_WINDOW);
            dev.download = Some(d);
            let _ = client
                .publish(dev.topic(delivery::GET_LEAF), QoS::AtLeastOnce, false, req)
                .await;
        }
        Action::Rollback { model, reason, .. } => {
            stats.rollbacks.fetch_add(1, Ordering::Relaxed);
            let from = dev
                .models
                .iter()
                .find(|m| m.name == model)
                .and_then(|m| m.release);
            let batch = dev.events_batch(&[(
                "rolled_back",
                &model,
                serde_json::json!({"from": from, "to": 0, "reason": reason, "directive": directive.id}),
            )]);
            let _ = client
                .publish(dev.topic("records"), QoS::AtLeastOnce, false, batch)
                .await;
        }
        Action::Ping {} => {}
    }
}

async fn handle_chunk(dev: &mut Device, client: &AsyncClient, stats: &Stats, payload: &[u8]) {
    let Ok(frame) = delivery::decode_frame(payload) else {
        stats.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let Some(d) = dev.download.as_mut() else {
        return;
    };
    if frame.header.sha256 != d.sha256 || frame.header.index != d.next {
        return; // a duplicate or another download's chunk
    }
    if frame.header.error.is_some() {
        stats.errors.fetch_add(1, Ordering::Relaxed);
        dev.download = None;
        return;
    }
    stats.chunks.fetch_add(1, Ordering::Relaxed);
    d.hasher.update(&frame.data);
    d.chunks = Some(frame.header.chunks);
    d.next += 1;
    d.in_window = d.in_window.saturating_sub(1);
    if d.next < frame.header.chunks {
        if d.in_window == 0 {
            d.in_window = delivery::MAX_WINDOW;
            let req = wire::to_json(&ChunkRequest {
                v: 1,
                sha256: d.sha256.clone(),
                from: d.next,
                count: delivery::MAX_WINDOW,
            });
            let _ = client
                .publish(dev.topic(delivery::GET_LEAF), QoS::AtLeastOnce, false, req)
                .await;
        }
        return;
    }
    let Some(d) = dev.download.take() else {
        return;
    };
    let got = shared::trust::hex(&d.hasher.finalize());
    if got != d.sha256 || frame.header.bundle_bytes != d.bytes {
        stats.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    stats.downloads.fetch_add(1, Ordering::Relaxed);
    dev.models.retain(|m| m.name != d.model);
    dev.models.push(wire::ModelVersion {
        name: d.model.clone(),
        version: format!("r{}", d.release),
        release: Some(d.release),
        role: "active".into(),
        phase: Some("committed".into()),
    });
    let batch = dev.events_batch(&[
        (
            "activated",
            &d.model,
            serde_json::json!({"release": d.release, "directive": d.directive}),
        ),
        (
            "committed",
            &d.model,
            serde_json::json!({"release": d.release}),
        ),
    ]);
    let _ = client
        .publish(dev.topic("records"), QoS::AtLeastOnce, false, batch)
        .await;
    let _ = client
        .publish(dev.topic("status"), QoS::AtLeastOnce, true, dev.birth())
        .await;
    stats.committed.fetch_add(1, Ordering::Relaxed);
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fleet_sim: {e}");
            std::process::exit(64);
        }
    };
    let key = match std::fs::read(&args.directive_pub)
        .map_err(|e| e.to_string())
        .and_then(|b| shared::trust::PublicKey::parse(&b).map_err(|e| e.to_string()))
    {
        Ok(k) => k,
        Err(e) => {
            eprintln!("fleet_sim: {}: {e}", args.directive_pub.display());
            std::process::exit(66);
        }
    };
    let verifier = Arc::new(DirectiveVerifier::new([key]));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleet_sim: runtime: {e}");
            std::process::exit(70);
        }
    };
    let stats = Arc::new(Stats::default());
    rt.block_on(async move {
        let s = stats.clone();
        let every = args.report_every.max(1);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(every)).await;
                println!(
                    "{}",
                    serde_json::json!({
                        "at_ms": now_ms(),
                        "connected": s.connected.load(Ordering::Relaxed),
                        "births": s.births.load(Ordering::Relaxed),
                        "directives": s.directives.load(Ordering::Relaxed),
                        "rejected": s.rejected.load(Ordering::Relaxed),
                        "chunks": s.chunks.load(Ordering::Relaxed),
                        "downloads": s.downloads.load(Ordering::Relaxed),
                        "committed": s.committed.load(Ordering::Relaxed),
                        "rollbacks": s.rollbacks.load(Ordering::Relaxed),
                        "errors": s.errors.load(Ordering::Relaxed),
                    })
                );
            }
        });
        let pause = Duration::from_micros(1_000_000 / args.ramp.max(1));
        for i in 0..args.devices {
            let dev = Device {
                id: format!("sim-{i:05}"),
                prefix: args.prefix.clone(),
                tags: args.tags.clone(),
                models: Vec::new(),
                last_counter: 0,
                seq: 0,
                download: None,
            };
            tokio::spawn(run_device(
                dev,
                args.host.clone(),
                args.port,
                verifier.clone(),
                stats.clone(),
            ));
            tokio::time::sleep(pause).await;
        }
        std::future::pending::<()>().await;
    });
}
