//! A fleet install directive carried out by a real `edge-agent run` over real Mosquitto: the
//! test plays the fleet (signs the directive, serves the bundle's chunks with
//! `shared::delivery::frame_for`), cuts the connection once mid-download (broker SIGKILL and
//! restart), and checks that the agent resumed from the first missing chunk, installed the
//! bundle through its pipeline (release 2 active), reported `download_started` and
//! `activated` with the directive id, and republished its birth with the new release and
//! its tags.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e_tests::{
    bin, build_bundle, free_port, http, install_example_agent, mosquitto_or_skip, pdm, scratch,
    wait_until, ChildGuard, Mosquitto,
};
use fleet_server::ingest::{self, FileStore, IngestConfig, IngestCounters};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use shared::delivery::{self, ChunkRequest};
use shared::directive::{Action, Directive, DirectiveSigner};
use tokio_util::sync::CancellationToken;

const DEVICE: &str = "press-di";
const CHUNK: u32 = 1024;

/// What the fake fleet saw.
#[derive(Default)]
struct Seen {
    requests: Vec<ChunkRequest>,
    replies: Vec<Value>,
    births: Vec<Value>,
}

/// The fleet's side of bundle delivery: answers chunk requests (all of them once `serve`
/// is set; only the first window before) and records replies and births.
fn fake_fleet(
    rt: &tokio::runtime::Runtime,
    port: u16,
    bundle: Arc<Vec<u8>>,
    serve_all: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
) -> AsyncClient {
    let mut o = MqttOptions::new("fake-fleet", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(2 << 20, 2 << 20);
    let (client, mut events) = AsyncClient::new(o, 256);
    let c = client.clone();
    let sha = delivery::sha256_hex(&bundle);
    rt.spawn(async move {
        let t = |leaf: &str| format!("edge/v1/{DEVICE}/{leaf}");
        loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => return,
                ev = events.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for leaf in [delivery::GET_LEAF, "replies", "status"] {
                        let _ = c.try_subscribe(t(leaf), QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic == t(delivery::GET_LEAF) {
                        let Ok(req) = delivery::parse_request(&p.payload) else {
                            continue;
                        };
                        let first_window = req.from < delivery::MAX_WINDOW;
                        seen.lock().unwrap().requests.push(req.clone());
                        if req.sha256 != sha || !(first_window || serve_all.load(Ordering::SeqCst))
                        {
                            continue;
                        }
                        for i in req.from..req.from + req.count {
                            if let Some(f) = delivery::frame_for(&bundle, &sha, CHUNK, i) {
                                let _ = c.try_publish(
                                    t(delivery::CHUNK_LEAF),
                                    QoS::AtLeastOnce,
                                    false,
                                    f,
                                );
                            }
                        }
                    } else if p.topic == t("replies") {
                        if let Ok(v) = serde_json::from_slice(&p.payload) {
                            seen.lock().unwrap().replies.push(v);
                        }
                    } else if p.topic == t("status") {
                        if let Ok(v) = serde_json::from_slice(&p.payload) {
                            seen.lock().unwrap().births.push(v);
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    client
}

fn write_config(d: &Path, http_port: u16, broker: u16) {
    let cfg = format!(
        r#"device_id = "{DEVICE}"
state_dir = "state"
trust_root = "root.pub"
[device]
tags = {{ site = "plant-a", line = "3" }}
[http]
listen = "127.0.0.1:{http_port}"
[install]
latency_runs = 20
download_timeout_secs = 2
download_retries = 20
[sync]
urls = ["mqtt://127.0.0.1:{broker}"]
keep_alive_secs = 5
connect_timeout_secs = 2
backoff_min_ms = 100
backoff_max_ms = 500
ack_timeout_ms = 2000
directive_keys = ["directive.pub"]
"#
    );
    std::fs::write(d.join("agent.toml"), cfg).unwrap();
}

fn events(fleet_dir: &Path) -> Vec<Value> {
    FileStore::read_records(fleet_dir, DEVICE, 1_000_000)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| serde_json::from_str::<Value>(r.body.get()).ok())
        .filter(|b| b["kind"] == "event")
        .collect()
}

#[test]
fn directive_install_downloads_over_mqtt_resumes_after_a_cut_and_activates() {
    if !mosquitto_or_skip("directive install") {
        return;
    }
    let tmp = scratch();
    let d = tmp.path();
    install_example_agent(d);
    build_bundle(
        d,
        &pdm().join("model.onnx"),
        "pdm-failure",
        "2",
        "b2.bundle",
    );
    let bundle = Arc::new(std::fs::read(d.join("b2.bundle")).unwrap());
    let sha = delivery::sha256_hex(&bundle);
    let chunks = delivery::chunk_count(bundle.len() as u64, CHUNK);
    assert!(
        chunks > delivery::MAX_WINDOW,
        "the bundle ({} bytes) needs more than one window",
        bundle.len()
    );
    let key = shared::trust::SecretKey::from_seed([61u8; 32]);
    std::fs::write(d.join("directive.pub"), key.public().to_file_bytes()).unwrap();
    let signer = DirectiveSigner::new(key);

    let mut broker = Mosquitto::start(d);
    let http_port = free_port();
    write_config(d, http_port, broker.port);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fleet_dir = d.join("fleet");
    let stop = CancellationToken::new();
    let mut icfg = IngestConfig::new(&broker.url());
    icfg.client_id = "fleet-ingest-e2e".into();
    let ingest_task = rt.spawn(ingest::run(
        icfg,
        FileStore::open(&fleet_dir).unwrap(),
        Arc::new(IngestCounters::default()),
        stop.clone(),
    ));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let serve_all = Arc::new(AtomicBool::new(false));
    let fleet = fake_fleet(
        &rt,
        broker.port,
        bundle.clone(),
        serve_all.clone(),
        seen.clone(),
        stop.clone(),
    );

    let _agent = ChildGuard(
        Command::new(bin("edge-agent"))
            .current_dir(d)
            .args(["run", "--config", "agent.toml"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(30), || {
        http(http_port, "GET", "/v2/health/ready", &[], b"").is_ok_and(|r| r.0 == 200)
    }));
    // the birth carries the tags and the phase of release 1
    assert!(
        wait_until(Duration::from_secs(30), || seen
            .lock()
            .unwrap()
            .births
            .iter()
            .any(|b| b["state"] == "online")),
        "no birth"
    );
    let birth = seen.lock().unwrap().births.last().cloned().unwrap();
    assert_eq!(birth["tags"]["site"], "plant-a", "{birth}");
    assert_eq!(birth["models"][0]["release"], 1, "{birth}");
    assert!(birth["models"][0]["phase"].is_string(), "{birth}");

    let now = edge_agent::outbox::now_ms();
    let directive = Directive::new(
        DEVICE,
        now,
        "d-install-2",
        now,
        600_000,
        Action::Install {
            model: "pdm-failure".into(),
            version: "2.0".into(),
            release: 2,
            bundle_sha256: sha.clone(),
            bundle_bytes: bundle.len() as u64,
        },
    );
    let payload = signer.sign_payload(&directive).unwrap();
    fleet
        .try_publish(
            format!("edge/v1/{DEVICE}/commands"),
            QoS::AtLeastOnce,
            false,
            payload,
        )
        .unwrap();
    // accepted when the download starts
    assert!(
        wait_until(Duration::from_secs(30), || !seen
            .lock()
            .unwrap()
            .replies
            .is_empty()),
        "no reply"
    );
    let reply = seen.lock().unwrap().replies[0].clone();
    assert_eq!(
        (reply["id"].as_str(), reply["ok"].as_bool()),
        (Some("d-install-2"), Some(true)),
        "{reply}"
    );
    // the first window is served, the second is asked for and not answered: cut
    assert!(
        wait_until(Duration::from_secs(30), || seen
            .lock()
            .unwrap()
            .requests
            .iter()
            .any(|r| r.from == delivery::MAX_WINDOW)),
        "the second window was not asked for"
    );
    broker.kill();
    std::thread::sleep(Duration::from_secs(1));
    let before = seen.lock().unwrap().requests.len();
    serve_all.store(true, Ordering::SeqCst);
    broker.restart();
    // release 2 becomes active
    let ok = wait_until(Duration::from_secs(90), || {
        let out = Command::new(bin("edge-agent"))
            .current_dir(d)
            .args(["status", "--json", "--config", "agent.toml"])
            .output()
            .unwrap();
        let st: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        st["models"]
            .as_array()
            .and_then(|m| m.first())
            .is_some_and(|m| m["active"]["release"] == 2)
    });
    assert!(ok, "release 2 did not become active");
    // after the cut, the agent asked from the first missing chunk, never from 0 again
    let requests: Vec<(u32, u32)> = seen.lock().unwrap().requests[before..]
        .iter()
        .map(|r| (r.from, r.count))
        .collect();
    assert!(!requests.is_empty());
    assert!(
        requests
            .iter()
            .all(|(from, _)| *from >= delivery::MAX_WINDOW),
        "requests after the cut: {requests:?}"
    );
    // events reached the fleet with the directive id
    let ok = wait_until(Duration::from_secs(60), || {
        let ev = events(&fleet_dir);
        ev.iter()
            .any(|e| e["event"] == "activated" && e["detail"]["directive"] == "d-install-2")
    });
    let ev = events(&fleet_dir);
    assert!(ok, "no activated event with the directive: {ev:?}");
    let started = ev
        .iter()
        .find(|e| e["event"] == "download_started")
        .expect("download_started");
    assert_eq!(started["model"], "pdm-failure");
    assert_eq!(started["detail"]["directive"], "d-install-2");
    assert_eq!(started["detail"]["release"], 2);
    assert_eq!(started["detail"]["sha256"], sha.as_str());
    let activated = ev.iter().find(|e| e["event"] == "activated").unwrap();
    assert_eq!(activated["model"], "pdm-failure");
    assert_eq!(activated["detail"]["release"], 2);
    assert_eq!(activated["detail"]["replaced"], 1);
    // the birth was republished with release 2 in its health window
    assert!(
        wait_until(Duration::from_secs(30), || seen
            .lock()
            .unwrap()
            .births
            .iter()
            .any(
                |b| b["models"][0]["release"] == 2 && b["models"][0]["phase"] == "health_window"
            )),
        "no birth with release 2"
    );
    // the downloaded file is gone
    let left: Vec<_> = std::fs::read_dir(d.join("state/downloads"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // the same release again: accepted, nothing downloaded
    let send = |counter: u64, id: &str, action: Action| {
        let d = Directive::new(DEVICE, counter, id, now, 600_000, action);
        fleet
            .try_publish(
                format!("edge/v1/{DEVICE}/commands"),
                QoS::AtLeastOnce,
                false,
                signer.sign_payload(&d).unwrap(),
            )
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(30), || seen
                .lock()
                .unwrap()
                .replies
                .iter()
                .any(|r| r["id"] == id)),
            "no reply to {id}"
        );
        let r = seen
            .lock()
            .unwrap()
            .replies
            .iter()
            .find(|r| r["id"] == id)
            .cloned();
        r.unwrap()
    };
    let requests_before = seen.lock().unwrap().requests.len();
    let r = send(
        now + 1,
        "d-install-2b",
        Action::Install {
            model: "pdm-failure".into(),
            version: "2.0".into(),
            release: 2,
            bundle_sha256: sha.clone(),
            bundle_bytes: bundle.len() as u64,
        },
    );
    assert_eq!(r["ok"], true, "{r}");
    // a rollback to a release that is not the previous one is refused
    let rollback = |to: Option<u64>| Action::Rollback {
        model: "pdm-failure".into(),
        to_release: to,
        reason: "canary failed".into(),
    };
    let r = send(now + 2, "d-rb-bad", rollback(Some(7)));
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("previous release 1"),
        "{r}"
    );
    let r = send(now + 3, "d-rb", rollback(Some(1)));
    assert_eq!(r["ok"], true, "{r}");
    let ok = wait_until(Duration::from_secs(60), || {
        events(&fleet_dir).iter().any(|e| {
            e["event"] == "rolled_back"
                && e["detail"]["directive"] == "d-rb"
                && e["detail"]["from"] == 2
                && e["detail"]["to"] == 1
        })
    });
    assert!(ok, "no rolled_back event: {:?}", events(&fleet_dir));
    // the running service serves release 1 again
    let (code, body) = http(http_port, "GET", "/v2/models/pdm-failure", &[], b"").unwrap();
    assert_eq!(code, 200);
    let meta: Value = serde_json::from_str(&body).unwrap_or_default();
    assert!(meta.to_string().contains("\"1.0\""), "{meta}");
    assert_eq!(
        seen.lock().unwrap().requests.len(),
        requests_before,
        "nothing was downloaded for the release already active"
    );
    assert!(!events(&fleet_dir)
        .iter()
        .any(|e| e["event"] == "download_started" && e["detail"]["directive"] == "d-install-2b"));
    stop.cancel();
    let _ = rt.block_on(ingest_task);
}
