//! Outbox -> MQTT sync -> fleet ingest through a real Mosquitto broker, in process: every
//! record stored exactly once and in order across broker kill -9 and restarts and an agent
//! crash; with a small cap produced = stored + counted drops; TLS, mutual TLS and failover;
//! a quarantined outbox's new epoch stored after the old one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use e2e_tests::{free_port, mosquitto_or_skip, scratch, tool_or_skip, wait_until, Mosquitto};
use edge_agent::outbox::{Class, Outbox, OutboxConfig, Quarantined};
use edge_agent::sync::{self, SyncConfig, SyncCounters};
use fleet_server::ingest::{self, FileStore, IngestConfig, IngestCounters};
use shared::wire;
use tempfile::TempDir;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::mqtt::{publish, subscribe};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A runtime, a scratch directory and a plain Mosquitto broker in it: what most sync tests
/// start from.
struct Rig {
    broker: Mosquitto,
    tmp: TempDir,
    rt: tokio::runtime::Runtime,
}

impl Rig {
    /// `None` (the test is skipped) without Mosquitto.
    fn start() -> Option<Rig> {
        if !mosquitto_or_skip("sync tests") {
            return None;
        }
        let rt = runtime();
        let tmp = scratch();
        let broker = Mosquitto::start(tmp.path());
        Some(Rig { broker, tmp, rt })
    }

    /// A fleet ingest on the broker, storing into `<scratch>/fleet`.
    fn fleet(&self, client_id: &str) -> Fleet {
        start_fleet(
            &self.rt,
            &self.broker.url(),
            &self.tmp.path().join("fleet"),
            client_id,
        )
    }

    /// A fresh outbox in `<scratch>/<name>`.
    fn outbox(&self, name: &str) -> Outbox {
        open_outbox(&self.tmp.path().join(name))
    }

    /// A sync agent for `device` on the broker alone.
    fn agent(&self, device: &str, outbox: &Outbox) -> Agent {
        start_agent(&self.rt, sync_cfg(vec![self.broker.url()]), device, outbox)
    }
}

/// Opens the outbox in `dir` with the default config.
fn open_outbox(dir: &Path) -> Outbox {
    Outbox::open(dir, &OutboxConfig::default()).unwrap().0
}

/// Opens the outbox in `dir` again, waiting (10 s) for the previous incarnation's handles to
/// be released.
fn reopen_outbox(dir: &Path) -> (Outbox, Option<Quarantined>) {
    let mut opened = None;
    assert!(wait_until(Duration::from_secs(10), || {
        opened = Outbox::open(dir, &OutboxConfig::default()).ok();
        opened.is_some()
    }));
    opened.unwrap()
}

fn sync_cfg(urls: Vec<String>) -> SyncConfig {
    SyncConfig {
        urls,
        keep_alive_secs: 5,
        connect_timeout_secs: 3,
        backoff_min_ms: 50,
        backoff_max_ms: 500,
        batch_max_records: 100,
        batch_max_bytes: 16 * 1024,
        compress_above_bytes: 4096,
        window: 4,
        ack_timeout_ms: 2000,
        ..SyncConfig::default()
    }
}

struct Agent {
    task: tokio::task::JoinHandle<Result<(), sync::SyncError>>,
    stop: CancellationToken,
    counters: Arc<SyncCounters>,
    wake: Arc<Notify>,
}

fn start_agent(
    rt: &tokio::runtime::Runtime,
    cfg: SyncConfig,
    device: &str,
    outbox: &Outbox,
) -> Agent {
    let events: edge_agent::command::EventFn = Arc::new(|_: &str, _| {});
    // no directive keys: directives are refused, nothing is written
    let commands =
        edge_agent::command::Commands::open(device, &[], Path::new(outbox.path()), events).unwrap();
    start_agent_with(rt, cfg, device, outbox, commands)
}

fn start_agent_with(
    rt: &tokio::runtime::Runtime,
    cfg: SyncConfig,
    device: &str,
    outbox: &Outbox,
    commands: edge_agent::command::Commands,
) -> Agent {
    let stop = CancellationToken::new();
    let counters = Arc::new(SyncCounters::default());
    let wake = Arc::new(Notify::new());
    let dev = device.to_string();
    let status: Arc<dyn Fn() -> wire::Birth + Send + Sync> = Arc::new(move || wire::Birth {
        v: wire::VERSION,
        device: dev.clone(),
        agent_version: "test".into(),
        models: vec![],
        started_at_ms: 1,
        sent_at_ms: 0,
        tags: Default::default(),
    });
    let hooks = sync::SyncHooks {
        status,
        commands: Arc::new(commands),
    };
    let task = rt.spawn(sync::run(
        cfg,
        device.to_string(),
        outbox.clone(),
        hooks,
        counters.clone(),
        wake.clone(),
        stop.clone(),
    ));
    Agent {
        task,
        stop,
        counters,
        wake,
    }
}

impl Agent {
    fn stop(self, rt: &tokio::runtime::Runtime) {
        self.stop.cancel();
        let r = rt.block_on(self.task).unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
}

struct Fleet {
    task: tokio::task::JoinHandle<Result<(), ingest::IngestError>>,
    stop: CancellationToken,
    counters: Arc<IngestCounters>,
    dir: PathBuf,
}

fn start_fleet(rt: &tokio::runtime::Runtime, url: &str, dir: &Path, client_id: &str) -> Fleet {
    let stop = CancellationToken::new();
    let counters = Arc::new(IngestCounters::default());
    let mut cfg = IngestConfig::new(url);
    cfg.client_id = client_id.into();
    let store = FileStore::open(dir).unwrap();
    let task = rt.spawn(ingest::run(cfg, store, counters.clone(), stop.clone()));
    Fleet {
        task,
        stop,
        counters,
        dir: dir.to_path_buf(),
    }
}

impl Fleet {
    fn last_seq(&self, device: &str) -> u64 {
        FileStore::read_state(&self.dir, device)
            .unwrap()
            .map_or(0, |s| s.last_seq)
    }

    fn state(&self, device: &str) -> ingest::DeviceState {
        FileStore::read_state(&self.dir, device).unwrap().unwrap()
    }

    fn stop(self, rt: &tokio::runtime::Runtime) {
        self.stop.cancel();
        rt.block_on(self.task).unwrap().unwrap();
    }
}

/// Appends `n` telemetry records whose body carries the seq they will get (`i`), in batches
/// of `chunk`; returns the last seq.
fn produce(outbox: &Outbox, wake: Option<&Notify>, n: u64, chunk: u64) -> u64 {
    let mut last = outbox.last_seq();
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk);
        let recs: Vec<(Class, Vec<u8>)> = (1..=k)
            .map(|j| {
                let i = last + j;
                let class = if i.is_multiple_of(10) {
                    Class::Event
                } else {
                    Class::Telemetry
                };
                (
                    class,
                    format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(150)).into_bytes(),
                )
            })
            .collect();
        let r = outbox.append(&recs).unwrap();
        assert_eq!(r.start, last + 1);
        last = r.end - 1;
        left -= k;
        if let Some(w) = wake {
            w.notify_one();
        }
    }
    last
}

/// The fleet store holds exactly seqs 1..=last, in order, each body carrying its seq.
fn assert_exactly_once(fleet_dir: &Path, device: &str, last: u64) {
    let recs = FileStore::read_records(fleet_dir, device, usize::MAX).unwrap();
    let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
    let want: Vec<u64> = (1..=last).collect();
    if seqs != want {
        let dups = seqs.windows(2).filter(|w| w[1] <= w[0]).count();
        panic!(
            "stored {} records (expected {last}), {dups} out of order or duplicated; first {:?}",
            seqs.len(),
            seqs.iter().take(10).collect::<Vec<_>>()
        );
    }
    for r in &recs {
        let body: serde_json::Value = serde_json::from_str(r.body.get()).unwrap();
        assert_eq!(body["i"], r.seq, "body of seq {}", r.seq);
    }
}

/// The agent never published a batch that left out a record it had: the fleet refused no
/// batch for skipping seqs the device did not report dropped (a refusal is recovered by a
/// replay, so delivery alone would not show it).
fn assert_no_unaccounted_skip(fleet: &Fleet) {
    assert_eq!(
        fleet.counters.unaccounted.load(Ordering::Relaxed),
        0,
        "batches skipping records the device still had"
    );
}

fn wait_delivered(fleet: &Fleet, outbox: &Outbox, device: &str, last: u64) {
    assert!(
        wait_until(Duration::from_secs(90), || fleet.last_seq(device) >= last
            && outbox.acked_through() >= last),
        "not delivered: fleet has {} of {last}, outbox acked through {}",
        fleet.last_seq(device),
        outbox.acked_through()
    );
}

/// [`wait_delivered`], then [`assert_exactly_once`].
fn assert_delivered_exactly_once(fleet: &Fleet, outbox: &Outbox, device: &str, last: u64) {
    wait_delivered(fleet, outbox, device, last);
    assert_exactly_once(&fleet.dir, device, last);
}

/// Waits (20 s) until `agent` failed to connect `attempts` times, asserts it never connected
/// and returns its last error.
fn wait_refused(agent: &Agent, attempts: u64) -> String {
    assert!(wait_until(Duration::from_secs(20), || agent
        .counters
        .reconnects
        .load(Ordering::Relaxed)
        >= attempts));
    assert_eq!(agent.counters.connects.load(Ordering::Relaxed), 0);
    agent.counters.last_error()
}

/// The sync config for `url` with `ca` as the trusted CA file.
fn tls_cfg(url: &str, ca: PathBuf) -> SyncConfig {
    let mut cfg = sync_cfg(vec![url.to_string()]);
    cfg.ca_file = Some(ca);
    cfg
}

#[test]
fn sync_broker_killed_while_producing_then_back() {
    let Some(mut rig) = Rig::start() else { return };
    let fleet = rig.fleet("fleet-a");
    let outbox = rig.outbox("outbox");
    let dev = "press-a";
    let agent = rig.agent(dev, &outbox);
    let last = produce(&outbox, Some(&agent.wake), 500, 50);
    wait_delivered(&fleet, &outbox, dev, last);
    assert!(
        fleet.counters.births.load(Ordering::Relaxed) >= 1,
        "birth seen"
    );

    rig.broker.kill();
    let last = produce(&outbox, Some(&agent.wake), 3000, 100);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        outbox.acked_through() < last,
        "nothing acked while the broker is down"
    );
    rig.broker.restart();
    assert_delivered_exactly_once(&fleet, &outbox, dev, last);
    assert_no_unaccounted_skip(&fleet);
    assert!(agent.counters.connects.load(Ordering::Relaxed) >= 2);
    assert!(agent.counters.reconnects.load(Ordering::Relaxed) >= 1);
    assert_eq!(
        outbox.stats().pending_records(),
        0,
        "everything acked left the outbox"
    );
    let st = fleet.state(dev);
    assert_eq!(st.received_total(), last);
    assert_eq!(st.received[&wire::RecordClass::Event], last / 10);

    // clean shutdown publishes the retained death
    let deaths = fleet.counters.deaths.load(Ordering::Relaxed);
    agent.stop(&rig.rt);
    assert!(
        wait_until(Duration::from_secs(10), || fleet
            .counters
            .deaths
            .load(Ordering::Relaxed)
            > deaths),
        "death published on shutdown"
    );
    fleet.stop(&rig.rt);
}

#[test]
fn sync_broker_restarted_mid_stream() {
    let Some(mut rig) = Rig::start() else { return };
    let fleet = rig.fleet("fleet-b");
    let outbox = rig.outbox("outbox");
    let dev = "press-b";
    let agent = rig.agent(dev, &outbox);
    let (ob, wake) = (outbox.clone(), agent.wake.clone());
    let producer = std::thread::spawn(move || {
        let mut last = 0;
        for _ in 0..60 {
            last = produce(&ob, Some(&wake), 100, 100);
            std::thread::sleep(Duration::from_millis(50));
        }
        last
    });
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(800));
        rig.broker.kill();
        std::thread::sleep(Duration::from_millis(300));
        rig.broker.restart();
    }
    let last = producer.join().unwrap();
    assert_eq!(last, 6000);
    assert_delivered_exactly_once(&fleet, &outbox, dev, last);
    assert_no_unaccounted_skip(&fleet);
    assert!(agent.counters.connects.load(Ordering::Relaxed) >= 3);
    agent.stop(&rig.rt);
    fleet.stop(&rig.rt);
}

#[test]
fn sync_agent_crash_between_publish_and_ack() {
    let Some(rig) = Rig::start() else { return };
    let fleet = rig.fleet("fleet-c");
    let ob_dir = rig.tmp.path().join("outbox");
    let dev = "press-c";
    let mut last = 0;
    let mut duplicates_before = 0;
    for round in 0..3 {
        let (outbox, q) = reopen_outbox(&ob_dir);
        assert!(q.is_none(), "the outbox survived the crash");
        let agent = rig.agent(dev, &outbox);
        last = produce(&outbox, Some(&agent.wake), 2000, 200);
        if round < 2 {
            // crash once something is published and not everything is acknowledged
            assert!(wait_until(Duration::from_secs(30), || {
                agent.counters.published_batches.load(Ordering::Relaxed) >= 3
            }));
            agent.task.abort();
            let _ = rig.rt.block_on(agent.task);
            assert!(outbox.acked_through() < last, "crashed before the end");
            drop(outbox);
        } else {
            wait_delivered(&fleet, &outbox, dev, last);
            agent.stop(&rig.rt);
        }
        // the fleet may not have stored anything yet when the first crash comes
        let duplicates = FileStore::read_state(&fleet.dir, dev)
            .unwrap()
            .map_or(0, |s| s.duplicates);
        assert!(duplicates >= duplicates_before);
        duplicates_before = duplicates;
    }
    assert_eq!(last, 6000);
    assert_exactly_once(&fleet.dir, dev, last);
    assert_no_unaccounted_skip(&fleet);
    assert!(
        fleet.counters.deaths.load(Ordering::Relaxed) >= 1,
        "the broker published the last will of the crashed agent"
    );
    fleet.stop(&rig.rt);
}

#[test]
fn sync_small_cap_produced_equals_stored_plus_drops() {
    if !mosquitto_or_skip("sync tests") {
        return;
    }
    let rt = runtime();
    let tmp = scratch();
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let cfg = OutboxConfig {
        max_bytes: 64 * 1024,
        ..OutboxConfig::default()
    };
    let (outbox, _) = Outbox::open(&tmp.path().join("outbox"), &cfg).unwrap();
    let dev = "press-d";
    // the broker is not there yet: everything piles up in the capped outbox
    let agent = start_agent(&rt, sync_cfg(vec![url.clone()]), dev, &outbox);
    let last = produce(&outbox, Some(&agent.wake), 3000, 100);
    let stats = outbox.stats();
    let dropped: u64 = Class::ALL
        .iter()
        .map(|c| stats.class(*c).dropped_total())
        .sum();
    assert!(dropped > 1000, "the cap dropped records ({dropped})");
    assert_eq!(
        stats.class(Class::Event).dropped_total(),
        0,
        "events outrank telemetry under the cap"
    );
    let _broker = Mosquitto::start_on(tmp.path(), port);
    let fleet = start_fleet(&rt, &url, &tmp.path().join("fleet"), "fleet-d");
    assert!(
        wait_until(Duration::from_secs(60), || outbox.acked_through() >= last),
        "acked through {} of {last}",
        outbox.acked_through()
    );
    let stats = outbox.stats();
    let produced: u64 = Class::ALL.iter().map(|c| stats.class(*c).produced).sum();
    let dropped: u64 = Class::ALL
        .iter()
        .map(|c| stats.class(*c).dropped_total())
        .sum();
    let st = fleet.state(dev);
    assert_eq!(produced, last);
    assert_eq!(
        produced,
        st.received_total() + dropped,
        "produced = stored + counted drops"
    );
    assert_eq!(st.dropped_total(), dropped, "the fleet knows the drops");
    assert_eq!(
        st.skipped, dropped,
        "every dropped record is a skipped seq at the fleet (the last record, an event, was kept)"
    );
    assert_no_unaccounted_skip(&fleet);
    assert_eq!(
        st.dropped[&wire::RecordClass::Telemetry].cap,
        stats
            .class(Class::Telemetry)
            .dropped(edge_agent::outbox::DropReason::Cap)
    );
    // what was stored is in order, without duplicates, and each body matches its seq
    let recs = FileStore::read_records(&fleet.dir, dev, usize::MAX).unwrap();
    assert_eq!(recs.len() as u64, st.received_total());
    assert!(recs.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(recs
        .iter()
        .all(|r| serde_json::from_str::<serde_json::Value>(r.body.get()).unwrap()["i"] == r.seq));
    agent.stop(&rt);
    fleet.stop(&rt);
}

#[test]
fn sync_failover_to_the_second_url() {
    let Some(rig) = Rig::start() else { return };
    let fleet = rig.fleet("fleet-f");
    let dead = format!("mqtt://127.0.0.1:{}", free_port());
    let outbox = rig.outbox("outbox");
    let dev = "press-f";
    let agent = start_agent(
        &rig.rt,
        sync_cfg(vec![dead.clone(), rig.broker.url()]),
        dev,
        &outbox,
    );
    let last = produce(&outbox, Some(&agent.wake), 300, 100);
    assert_delivered_exactly_once(&fleet, &outbox, dev, last);
    assert_eq!(agent.counters.current_broker(), rig.broker.url());
    assert!(
        agent.counters.last_error().starts_with(&dead),
        "{}",
        agent.counters.last_error()
    );
    agent.stop(&rig.rt);
    fleet.stop(&rig.rt);
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all EC P-256.
fn make_pki(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=edge test CA",
    ]);
    openssl(dir, &a);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        let (key, csr, pem, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        let subj = format!("/CN={who}");
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &a);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
    // mosquitto started as root drops to its own user: let it read the test keys
    use std::os::unix::fs::PermissionsExt;
    let mut d = Some(dir);
    while let Some(p) =
        d.filter(|p| p.starts_with(std::env::temp_dir()) && *p != std::env::temp_dir())
    {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        d = p.parent();
    }
    for key in ["server.key", "client.key"] {
        std::fs::set_permissions(dir.join(key), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

#[test]
fn sync_over_tls_and_mutual_tls() {
    if !mosquitto_or_skip("sync TLS tests") || !tool_or_skip("openssl", "version", "sync TLS tests")
    {
        return;
    }
    let rt = runtime();
    let tmp = scratch();
    let pki = tmp.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    make_pki(&pki);
    let p = |f: &str| pki.join(f).display().to_string();
    let (plain, tls, mtls) = (free_port(), free_port(), free_port());
    let conf = format!(
        "per_listener_settings true\n\
         listener {plain} 127.0.0.1\nallow_anonymous true\n\
         listener {tls} 127.0.0.1\nallow_anonymous true\ncafile {ca}\ncertfile {sc}\nkeyfile {sk}\n\
         listener {mtls} 127.0.0.1\nallow_anonymous true\ncafile {ca}\ncertfile {sc}\nkeyfile {sk}\nrequire_certificate true\n\
         persistence false\n",
        ca = p("ca.pem"),
        sc = p("server.pem"),
        sk = p("server.key"),
    );
    let _broker = Mosquitto::with_config(tmp.path(), plain, &conf);
    for port in [tls, mtls] {
        assert!(wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }));
    }
    let fleet = start_fleet(
        &rt,
        &format!("mqtt://127.0.0.1:{plain}"),
        &tmp.path().join("fleet"),
        "fleet-e",
    );

    // server-authenticated TLS with the CA file
    let tls_url = format!("mqtts://127.0.0.1:{tls}");
    let outbox = open_outbox(&tmp.path().join("ob-tls"));
    let cfg = tls_cfg(&tls_url, pki.join("ca.pem"));
    cfg.validate().unwrap();
    let agent = start_agent(&rt, cfg, "tls-dev", &outbox);
    let last = produce(&outbox, Some(&agent.wake), 300, 100);
    assert_delivered_exactly_once(&fleet, &outbox, "tls-dev", last);
    agent.stop(&rt);

    // mutual TLS without a client certificate: refused, with a clear error
    let mtls_url = format!("mqtts://127.0.0.1:{mtls}");
    let outbox = open_outbox(&tmp.path().join("ob-mtls"));
    let mut cfg = tls_cfg(&mtls_url, pki.join("ca.pem"));
    let agent = start_agent(&rt, cfg.clone(), "mtls-dev", &outbox);
    let last = produce(&outbox, Some(&agent.wake), 100, 100);
    let err = wait_refused(&agent, 2);
    assert!(err.starts_with(&mtls_url), "{err}");
    assert!(
        err.contains("TLS") && err.contains("sync.client_cert"),
        "names the missing client certificate: {err}"
    );
    eprintln!("mTLS without a client certificate: {err}");
    assert_eq!(fleet.last_seq("mtls-dev"), 0);
    agent.stop(&rt);

    // with the client certificate and key: connects and delivers
    cfg.client_cert = Some(pki.join("client.pem"));
    cfg.client_key = Some(pki.join("client.key"));
    cfg.validate().unwrap();
    let agent = start_agent(&rt, cfg, "mtls-dev", &outbox);
    assert_delivered_exactly_once(&fleet, &outbox, "mtls-dev", last);
    agent.stop(&rt);

    // a CA that did not sign the server: refused
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    make_pki(&other);
    let outbox = open_outbox(&tmp.path().join("ob-bad"));
    let agent = start_agent(
        &rt,
        tls_cfg(&tls_url, other.join("ca.pem")),
        "bad-ca",
        &outbox,
    );
    let err = wait_refused(&agent, 1);
    assert!(err.contains("TLS") && err.contains("sync.ca_file"), "{err}");
    agent.stop(&rt);
    fleet.stop(&rt);
}

#[test]
fn sync_a_quarantined_outbox_starts_a_new_epoch_the_fleet_stores() {
    let Some(rig) = Rig::start() else { return };
    let fleet = rig.fleet("fleet-e");
    let ob_dir = rig.tmp.path().join("outbox");
    let dev = "press-e";
    // epoch 1: 500 records delivered
    let outbox = open_outbox(&ob_dir);
    let first_epoch = outbox.epoch();
    let agent = rig.agent(dev, &outbox);
    let last = produce(&outbox, Some(&agent.wake), 500, 100);
    wait_delivered(&fleet, &outbox, dev, last);
    agent.stop(&rig.rt);
    drop(outbox);
    // the outbox's database is damaged: it is moved aside and a fresh one (new epoch, seqs
    // from 1 again) is created
    let db = ob_dir.join("db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    std::fs::write(&db, vec![0x5a; len.max(4096)]).unwrap();
    let (outbox, quarantined) = reopen_outbox(&ob_dir);
    assert!(quarantined.is_some(), "the damaged outbox was quarantined");
    assert_ne!(outbox.epoch(), first_epoch);
    let agent = rig.agent(dev, &outbox);
    let last2 = produce(&outbox, Some(&agent.wake), 300, 100);
    assert_eq!(last2, 300, "the new epoch starts at seq 1");
    // delivered and acknowledged although seqs 1..=300 were stored before (other epoch)
    assert!(
        wait_until(Duration::from_secs(90), || outbox.acked_through() >= last2),
        "the new epoch was not acknowledged: acked through {}",
        outbox.acked_through()
    );
    agent.stop(&rig.rt);
    let st = fleet.state(dev);
    assert_eq!((st.epoch, st.epoch_changes), (outbox.epoch(), 1));
    assert_eq!(st.retired_epochs, vec![first_epoch]);
    let stored = FileStore::read_stored(&fleet.dir, dev, usize::MAX).unwrap();
    let expect: Vec<(u64, u64)> = (1..=500)
        .map(|s| (first_epoch, s))
        .chain((1..=300).map(|s| (outbox.epoch(), s)))
        .collect();
    let got: Vec<(u64, u64)> = stored.iter().map(|(e, r)| (*e, r.seq)).collect();
    assert!(
        got == expect,
        "stored {} records, not epoch 1 seqs 1..=500 then epoch 2 seqs 1..=300",
        got.len()
    );
    assert_no_unaccounted_skip(&fleet);
    fleet.stop(&rig.rt);
}

#[test]
fn sync_signed_directives_replayed_expired_and_other_device_are_refused() {
    use shared::directive::{Action, Directive, DirectiveSigner};
    let Some(rig) = Rig::start() else { return };
    let tmp = &rig.tmp;
    let dev = "press-d";
    // the fleet's directive key; the device trusts its public half
    let key = shared::trust::SecretKey::from_seed([42u8; 32]);
    let pub_file = tmp.path().join("fleet-directive.pub");
    std::fs::write(&pub_file, key.public().to_file_bytes()).unwrap();
    let signer = DirectiveSigner::new(key);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let outbox = open_outbox(&state.join("outbox"));
    let events = Arc::new(std::sync::Mutex::new(
        Vec::<(String, serde_json::Value)>::new(),
    ));
    let ev = events.clone();
    let on_event: edge_agent::command::EventFn = Arc::new(move |name: &str, detail| {
        ev.lock().unwrap().push((name.to_string(), detail));
    });
    let commands =
        edge_agent::command::Commands::open(dev, std::slice::from_ref(&pub_file), &state, on_event)
            .unwrap();
    let agent = start_agent_with(
        &rig.rt,
        sync_cfg(vec![rig.broker.url()]),
        dev,
        &outbox,
        commands,
    );
    assert!(wait_until(Duration::from_secs(20), || {
        agent.counters.connected.load(Ordering::Relaxed) == 1
    }));
    let now = edge_agent::outbox::now_ms();
    let sign = |device: &str, counter: u64, issued: u64| {
        let d = Directive::new(
            device,
            counter,
            format!("d-{counter}"),
            issued,
            60_000,
            Action::Ping {},
        );
        String::from_utf8(signer.sign_payload(&d).unwrap()).unwrap()
    };
    let port = rig.broker.port;
    let sub = subscribe(port, &format!("edge/v1/{dev}/replies"), 4, 30, true);
    std::thread::sleep(Duration::from_millis(500));
    let payloads = [
        sign(dev, 10, now),             // accepted
        sign(dev, 10, now),             // replayed
        sign(dev, 11, now - 3_600_000), // expired an hour ago
        sign("press-other", 12, now),   // another device's
    ];
    for p in &payloads {
        let st = publish(port, &format!("edge/v1/{dev}/commands"), p).unwrap();
        assert!(st.success());
        // one at a time: replies come back in order
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = sub.wait_with_output().unwrap();
    let replies: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replies.len(), 4, "{replies:?}");
    assert_eq!(replies[0]["ok"], true, "{replies:?}");
    assert_eq!(replies[0]["id"], "d-10");
    for r in &replies[1..] {
        assert_eq!(r["ok"], false, "{r}");
    }
    let reasons: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| n == "directive_rejected")
        .map(|(_, d)| d["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(reasons, ["replayed", "expired", "other_device"]);
    // the accepted counter is on disk
    let counter: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("directive-counter.json")).unwrap())
            .unwrap();
    assert_eq!(counter["last"], 10);
    agent.stop(&rig.rt);
}
