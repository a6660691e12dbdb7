//! `edge-agent run` as a process producing telemetry for the fleet: predictions continue
//! while the broker is down, the agent is killed with SIGKILL and restarted, the broker
//! restarts mid-stream; every record reaches the fleet ingest exactly once, in order; with a
//! small outbox cap, produced = delivered + counted drops, exactly; a full disk under the
//! outbox (writes failing with ENOSPC) never stops inference and is counted.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e_tests::{
    bin, free_port, http, install_example_agent, mosquitto_or_skip, scratch, start_agent,
    wait_until, ChildGuard, Mosquitto,
};
use fleet_server::ingest::{self, FileStore, IngestConfig, IngestCounters};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const DEVICE: &str = "press-07";

fn write_config(d: &Path, port: u16, broker: u16, max_bytes: u64) {
    let cfg = format!(
        r#"device_id = "{DEVICE}"
state_dir = "state"
trust_root = "root.pub"
[http]
listen = "127.0.0.1:{port}"
[outbox]
max_bytes = {max_bytes}
[telemetry]
window_secs = 1
health_secs = 1
[sync]
urls = ["mqtt://127.0.0.1:{broker}"]
keep_alive_secs = 5
connect_timeout_secs = 2
backoff_min_ms = 100
backoff_max_ms = 500
ack_timeout_ms = 2000
"#
    );
    std::fs::write(d.join("agent.toml"), cfg).unwrap();
}

fn status(d: &Path) -> Value {
    let out = Command::new(bin("edge-agent"))
        .current_dir(d)
        .args(["status", "--json", "--config", "agent.toml"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Predicts in a loop until stopped; counts successes and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

fn start_load(port: u16) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
    let body = serde_json::json!({"instances": [{
        "air_temperature_k": 300.1, "process_temperature_k": 310.2,
        "rotational_speed_rpm": 1500.0, "torque_nm": 40.0, "tool_wear_min": 100.0,
        "vibration_rms_mm_s": 2.5
    }]})
    .to_string();
    let thread = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let code = http(
                port,
                "POST",
                "/v1/models/pdm-failure:predict",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .map_or(0, |r| r.0);
            if code == 200 {
                o.fetch_add(1, Ordering::Relaxed);
            } else {
                f.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    Load {
        stop,
        ok,
        failed,
        thread,
    }
}

impl Load {
    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

struct Fleet {
    rt: tokio::runtime::Runtime,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ingest::IngestError>>,
}

fn start_fleet(url: &str, dir: &Path) -> Fleet {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let mut cfg = IngestConfig::new(url);
    cfg.client_id = "fleet-e2e".into();
    let store = FileStore::open(dir).unwrap();
    let task = rt.spawn(ingest::run(
        cfg,
        store,
        Arc::new(IngestCounters::default()),
        stop.clone(),
    ));
    Fleet { rt, stop, task }
}

impl Fleet {
    fn stop(self) {
        self.stop.cancel();
        let _ = self.rt.block_on(self.task);
    }
}

/// The example agent in `d` with no broker configured (`[sync]` left out) and `extra`
/// config appended, started: (its HTTP port, the process).
fn start_local_agent(d: &Path, extra: &str) -> (u16, ChildGuard) {
    install_example_agent(d);
    let port = free_port();
    write_config(d, port, free_port(), 256 * 1024 * 1024);
    let cfg = std::fs::read_to_string(d.join("agent.toml")).unwrap();
    let cfg = cfg.split("[sync]").next().unwrap().to_string();
    std::fs::write(d.join("agent.toml"), cfg + extra).unwrap();
    (port, start_agent(d, port))
}

/// Waits until the agent's outbox has nothing pending and the fleet stored its last seq.
fn wait_drained(d: &Path, fleet_dir: &Path) -> (Value, ingest::DeviceState) {
    let mut last = (Value::Null, None);
    let ok = wait_until(Duration::from_secs(60), || {
        let st = status(d);
        let outbox = st["telemetry"]["outbox"].clone();
        let fleet = FileStore::read_state(fleet_dir, DEVICE).ok().flatten();
        let drained = outbox["acked_through"] == outbox["last_seq"]
            && fleet
                .as_ref()
                .is_some_and(|f| Some(f.last_seq) == outbox["last_seq"].as_u64());
        last = (outbox, fleet);
        drained
    });
    assert!(
        ok,
        "not drained: agent outbox {} / fleet {:?}",
        last.0, last.1
    );
    (last.0, last.1.unwrap())
}

/// Every stored record: seqs strictly increasing, no duplicates; returns them.
fn stored(fleet_dir: &Path) -> Vec<shared::wire::Record> {
    let recs = FileStore::read_records(fleet_dir, DEVICE, 1_000_000).unwrap();
    for w in recs.windows(2) {
        assert!(
            w[0].seq < w[1].seq,
            "records out of order or duplicated: {} then {}",
            w[0].seq,
            w[1].seq
        );
    }
    recs
}

#[test]
fn telemetry_outage_kill9_and_broker_restart_deliver_exactly_once() {
    if !mosquitto_or_skip("telemetry_outage_kill9_and_broker_restart_deliver_exactly_once") {
        return;
    }
    let tmp = scratch();
    let d = tmp.path();
    install_example_agent(d);
    let mut broker = Mosquitto::start(d);
    let broker_port = broker.port;
    let fleet_dir = d.join("fleet");
    let fleet = start_fleet(&broker.url(), &fleet_dir);
    let port = free_port();
    write_config(d, port, broker_port, 256 * 1024 * 1024);
    let mut agent = start_agent(d, port);
    let load = start_load(port);
    std::thread::sleep(Duration::from_secs(3));

    // the broker goes away for E2E_OUTAGE_SECS (CI: 120 s; default 6 s); predictions
    // continue
    let outage: u64 = std::env::var("E2E_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    eprintln!("telemetry_outage: the broker is down for {outage} s (E2E_OUTAGE_SECS)");
    broker.kill();
    let before = load.ok.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(outage));
    assert!(
        load.ok.load(Ordering::Relaxed) > before + 50,
        "predictions stalled while the broker was down"
    );
    broker.restart();
    std::thread::sleep(Duration::from_secs(3));

    // kill -9 of the agent mid-stream, then a restart on the same state
    let (_, failed) = load.stop();
    assert_eq!(failed, 0, "predictions failed while the broker was down");
    agent.0.kill().unwrap();
    let _ = agent.0.wait();
    let mut agent = start_agent(d, port);
    let load = start_load(port);
    std::thread::sleep(Duration::from_secs(3));

    // a broker restart mid-stream
    broker.kill();
    std::thread::sleep(Duration::from_millis(500));
    broker.restart();
    std::thread::sleep(Duration::from_secs(3));

    let (_ok, failed) = load.stop();
    assert_eq!(failed, 0, "predictions failed during the broker restart");
    let (outbox, fleet_state) = wait_drained(d, &fleet_dir);
    let recs = stored(&fleet_dir);
    let last = outbox["last_seq"].as_u64().unwrap();
    // no cap drops: exactly 1..=last, each once
    assert_eq!(recs.len() as u64, last, "stored records != produced");
    assert_eq!(recs.first().map(|r| r.seq), Some(1));
    assert_eq!(fleet_state.dropped_total(), 0);
    let mut produced = 0;
    for (_, c) in outbox["classes"].as_object().unwrap() {
        produced += c["produced"].as_u64().unwrap();
        assert_eq!(c["pending"], 0);
        assert_eq!(c["produced"], c["acknowledged"]);
    }
    assert_eq!(produced, last);
    // the kinds the agent produces all arrived
    let kinds: std::collections::BTreeSet<String> = recs
        .iter()
        .filter_map(|r| {
            serde_json::from_str::<Value>(r.body.get())
                .ok()
                .and_then(|b| b["kind"].as_str().map(String::from))
        })
        .collect();
    for k in [
        "telemetry_window",
        "drift_summary",
        "health_sample",
        "event",
    ] {
        assert!(kinds.contains(k), "no {k} record arrived: {kinds:?}");
    }
    agent.terminate(Duration::from_secs(10));
    fleet.stop();
}

#[test]
fn telemetry_small_cap_produced_equals_delivered_plus_drops() {
    if !mosquitto_or_skip("telemetry_small_cap_produced_equals_delivered_plus_drops") {
        return;
    }
    let tmp = scratch();
    let d = tmp.path();
    install_example_agent(d);
    // the broker is absent at first: records pile up against a 64 KiB cap
    let broker_port = free_port();
    let port = free_port();
    write_config(d, port, broker_port, 64 * 1024);
    let mut agent = start_agent(d, port);
    let load = start_load(port);
    assert!(
        wait_until(Duration::from_secs(90), || {
            let st = status(d);
            st["telemetry"]["outbox"]["classes"]["telemetry"]["dropped"]["cap"]
                .as_u64()
                .unwrap_or(0)
                > 5
        }),
        "the cap never dropped telemetry"
    );
    let (_, failed) = load.stop();
    assert_eq!(failed, 0, "a full outbox stopped predictions");
    let broker = Mosquitto::start_on(d, broker_port);
    let fleet_dir = d.join("fleet");
    let fleet = start_fleet(&broker.url(), &fleet_dir);
    let (outbox, fleet_state) = wait_drained(d, &fleet_dir);
    let recs = stored(&fleet_dir);
    let mut produced = 0;
    let mut dropped = 0;
    for (class, c) in outbox["classes"].as_object().unwrap() {
        let cd: u64 = ["cap", "ttl", "io"]
            .iter()
            .map(|r| c["dropped"][r].as_u64().unwrap())
            .sum();
        assert_eq!(
            c["produced"].as_u64().unwrap(),
            c["acknowledged"].as_u64().unwrap() + cd,
            "class {class}: produced != acknowledged + dropped"
        );
        produced += c["produced"].as_u64().unwrap();
        dropped += cd;
    }
    // exactly: every produced record was either stored once by the fleet or counted dropped
    assert_eq!(produced, recs.len() as u64 + dropped);
    assert!(dropped > 0);
    // events were never the victims while telemetry was there to drop
    assert_eq!(outbox["classes"]["event"]["dropped"]["cap"], 0);
    // the drop counters travelled upstream
    assert_eq!(fleet_state.dropped_total(), dropped);
    agent.terminate(Duration::from_secs(10));
    fleet.stop();
}

#[test]
fn feedback_by_prediction_id_updates_live_metrics() {
    let tmp = scratch();
    let d = tmp.path();
    // no broker configured at all: records wait in the outbox
    let (port, mut agent) = start_local_agent(d, "");
    let body = r#"{"instances": [
        {"air_temperature_k": 300.1, "process_temperature_k": 310.2, "rotational_speed_rpm": 1500.0,
         "torque_nm": 40.0, "tool_wear_min": 100.0, "vibration_rms_mm_s": 2.5},
        {"air_temperature_k": 302.0, "process_temperature_k": 311.0, "rotational_speed_rpm": 1300.0,
         "torque_nm": 65.0, "tool_wear_min": 230.0, "vibration_rms_mm_s": 6.1}]}"#;
    let json = [("Content-Type", "application/json")];
    let (code, resp) = http(
        port,
        "POST",
        "/v1/models/pdm-failure:predict",
        &json,
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 200, "{resp}");
    let resp: Value = serde_json::from_str(&resp).unwrap();
    let ids: Vec<String> = resp["prediction_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let label0 = resp["predictions"][0]["label"].to_string();
    // the first one right, the second one labelled with the other class
    let other = if resp["predictions"][1]["label"] == 1 {
        "0"
    } else {
        "1"
    };
    let fb = format!(
        r#"{{"feedback": [{{"prediction_id": "{}", "label": {label0}}}, {{"prediction_id": "{}", "label": "{other}"}}]}}"#,
        ids[0], ids[1]
    );
    let (code, out) = http(port, "POST", "/v1/feedback", &json, fb.as_bytes()).unwrap();
    assert_eq!(code, 200, "{out}");
    let out: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["applied"], 2, "{out}");
    // the same truth again is a duplicate; a different one is refused with 409
    let again = format!(r#"{{"prediction_id": "{}", "label": {label0}}}"#, ids[0]);
    let (code, out) = http(port, "POST", "/v1/feedback", &json, again.as_bytes()).unwrap();
    assert_eq!(code, 200, "{out}");
    assert!(out.contains("duplicate"), "{out}");
    let flip = if label0 == "1" { "0" } else { "1" };
    let differ = format!(r#"{{"prediction_id": "{}", "label": "{flip}"}}"#, ids[0]);
    let (code, out) = http(port, "POST", "/v1/feedback", &json, differ.as_bytes()).unwrap();
    assert_eq!(code, 409, "{out}");
    let (code, out) = http(
        port,
        "POST",
        "/v1/feedback",
        &json,
        br#"{"prediction_id": "nope", "label": "1"}"#,
    )
    .unwrap();
    assert_eq!(code, 404, "{out}");
    let (code, out) = http(
        port,
        "POST",
        "/v1/feedback",
        &json,
        br#"{"feedback": [{"prediction_id": "a", "label": 1.5}]}"#,
    )
    .unwrap();
    assert_eq!(code, 400, "{out}");
    assert!(out.contains("feedback[0].label"), "{out}");

    // live accuracy 1/2 in /metrics and status --json
    let (_, metrics) = http(port, "GET", "/metrics", &[], b"").unwrap();
    assert!(
        metrics.contains(
            "edge_agent_feedback_metric{model=\"pdm-failure\",release=\"1\",metric=\"accuracy\"} 0.5"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("edge_agent_outbox_records_total{class=\"event\",state=\"produced\"}"));
    let st = status(d);
    assert_eq!(st["telemetry"]["feedback"][0]["labelled_total"], 2, "{st}");
    assert_eq!(st["telemetry"]["sync"]["configured"], false);
    // windows are produced into the outbox even without a broker
    assert!(wait_until(Duration::from_secs(10), || {
        status(d)["telemetry"]["outbox"]["classes"]["drift"]["produced"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    }));
    agent.terminate(Duration::from_secs(10));
}

#[test]
fn telemetry_a_full_disk_under_the_outbox_never_stops_inference() {
    if !Path::new("/dev/full").exists() {
        eprintln!(
            "SKIPPED telemetry_a_full_disk_under_the_outbox_never_stops_inference: no /dev/full"
        );
        return;
    }
    let tmp = scratch();
    let d = tmp.path();
    install_example_agent(d);
    let port = free_port();
    // no broker: the records stay in the outbox
    write_config(d, port, free_port(), 64 << 20);
    let _agent = start_agent(d, port);
    let segments = d.join("state/outbox/segments");
    let files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&segments)
            .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    };
    // events, health samples and telemetry windows are being written
    assert!(
        wait_until(Duration::from_secs(20), || files().len() >= 3),
        "segment files: {:?}",
        files()
    );
    // the file system fills up: every write to the segment files fails with ENOSPC
    for f in files() {
        std::fs::remove_file(&f).unwrap();
        std::os::unix::fs::symlink("/dev/full", &f).unwrap();
    }
    let load = start_load(port);
    let failed_seen = wait_until(Duration::from_secs(20), || {
        let o = &status(d)["telemetry"]["outbox"];
        o["failed"].is_string()
            && o["classes"]
                .as_object()
                .is_some_and(|c| c.values().any(|v| v["dropped"]["io"].as_u64() > Some(0)))
    });
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failed) = load.stop();
    let st = status(d);
    assert!(failed_seen, "the outbox never reported the failure: {st}");
    assert_eq!(failed, 0, "predictions failed while the disk was full");
    assert!(ok > 100, "only {ok} predictions");
    // still ready, and /metrics says what was dropped
    assert_eq!(
        http(port, "GET", "/v2/health/ready", &[], b"").unwrap().0,
        200
    );
    let (code, metrics) = http(port, "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("edge_agent_outbox_dropped_total{")
                && l.contains("reason=\"io\"")
                && !l.ends_with(" 0")),
        "no io drops in /metrics"
    );
}

/// The value of the `/metrics` sample `series` (name and labels exactly as rendered).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn telemetry_data_drift_is_exported_on_metrics() {
    let tmp = scratch();
    let d = tmp.path();
    // no broker: the window's drift is exported whether or not it is delivered; one window
    // above the threshold raises the alert
    let (port, mut agent) = start_local_agent(d, "[drift.alert]\nwindows = 1\n");

    // reference rows, except torque far above anything in the reference (max 74.61 Nm)
    let csv = std::fs::read_to_string(e2e_tests::pdm().join("reference.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let rows: Vec<Value> = lines
        .filter_map(|l| {
            let vals: Vec<f64> = l
                .split(',')
                .map(|v| v.parse().ok())
                .collect::<Option<_>>()?;
            let mut row = serde_json::Map::new();
            for (k, v) in header.iter().zip(vals) {
                let v = if *k == "torque_nm" { 500.0 } else { v };
                row.insert(k.to_string(), v.into());
            }
            Some(Value::Object(row))
        })
        .take(300)
        .collect();
    assert_eq!(rows.len(), 300);
    let body = serde_json::json!({ "instances": rows }).to_string();
    let json = [("Content-Type", "application/json")];

    let m = r#"model="pdm-failure",release="1""#;
    let torque_psi = format!(r#"edge_agent_drift_score{{{m},feature="torque_nm",metric="psi"}}"#);
    let air_psi =
        format!(r#"edge_agent_drift_score{{{m},feature="air_temperature_k",metric="psi"}}"#);
    let torque_alert = format!(r#"edge_agent_drift_alert{{{m},feature="torque_nm"}}"#);
    let air_alert = format!(r#"edge_agent_drift_alert{{{m},feature="air_temperature_k"}}"#);
    let window_rows = format!("edge_agent_drift_window_rows{{{m}}}");
    let mut last = String::new();
    let drifted = wait_until(Duration::from_secs(30), || {
        let (code, out) = http(
            port,
            "POST",
            "/v1/models/pdm-failure:predict",
            &json,
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(code, 200, "{out}");
        last = http(port, "GET", "/metrics", &[], b"").unwrap().1;
        sample(&last, &window_rows).is_some_and(|r| r > 0.0)
            && sample(&last, &torque_psi).is_some_and(|p| p > 1.0)
            && sample(&last, &torque_alert) == Some(1.0)
    });
    assert!(drifted, "no drifted window in /metrics:\n{last}");
    // the reference-like feature is quiet in the same window
    let air = sample(&last, &air_psi).expect("air_temperature_k psi");
    assert!((0.0..0.2).contains(&air), "air_temperature_k psi {air}");
    assert_eq!(sample(&last, &air_alert), Some(0.0));
    // the output distribution (the failure probability, column 1 of the probability tensor,
    // as `fleetctl bundle build` profiled it): torque far out pushes it away from the
    // reference
    let pred = format!(r#"edge_agent_drift_score{{{m},feature="__prediction__",metric="psi"}}"#);
    let pred_psi = sample(&last, &pred).unwrap_or_else(|| panic!("no {pred}:\n{last}"));
    assert!(pred_psi > 0.2, "prediction psi {pred_psi}");
    assert!(
        !last
            .lines()
            .any(|l| l.starts_with("edge_agent_drift_") && l.ends_with("NaN")),
        "{last}"
    );
    e2e_tests::promtool_check_metrics("agent with drift", &last);

    // no more requests: a window without rows says "no data" (rows 0, no scores) and keeps
    // the alert as it was
    let quiet = wait_until(Duration::from_secs(10), || {
        last = http(port, "GET", "/metrics", &[], b"").unwrap().1;
        sample(&last, &window_rows) == Some(0.0)
    });
    assert!(quiet, "no empty window in /metrics:\n{last}");
    assert!(
        !last.contains(&format!("edge_agent_drift_score{{{m},")),
        "{last}"
    );
    assert_eq!(sample(&last, &torque_alert), Some(1.0));
    e2e_tests::promtool_check_metrics("agent after an empty window", &last);
    agent.terminate(Duration::from_secs(10));
}
