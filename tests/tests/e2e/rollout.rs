//! Staged rollouts end to end: a real `fleet-server run` (embedded broker) and real
//! `edge-agent run` processes that get signed directives, download the bundle in chunks over
//! MQTT and install it through their own pipeline. Scenarios:
//! - a canary whose bundle fails its golden samples on the device (validly signed, accepted
//!   by the fleet) rejects it at install: the rollout halts, the canary never activated it,
//!   no other device was sent a directive;
//! - a canary whose new model returns NaN, or is tens of times slower, rolls back on the
//!   device within its health window: the rollout halts with no other device touched;
//! - a silent canary fails its wave at the deadline;
//! - a `kill -9` of the fleet server mid-rollout resumes and completes, then a fleet-wide
//!   rollback reaches an offline device when it returns;
//! - `kill -9` of agents mid-rollout, inside the install pipeline (after the golden samples,
//!   after activation) and between download windows: restarted on the same state, they
//!   resume (a complete download is installed, a partial one continues where it stopped)
//!   and the rollout completes;
//! - fleetctl roles, a second admin's approval, fleet metrics and the audit log.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e_tests::{
    bin, build_bundle, free_port, http, pdm, run_ok, scratch, spawn_fleet_server,
    start_fleet_server, wait_fleet_healthy, wait_until, ChildGuard, PDM_FEATURES,
};
use edge_agent::runtime::MIN_FOR_P99;
use serde_json::{json, Value};
use shared::bundle::{assemble, read_unverified, Manifest};

/// A `fleet-server run` process with its state in `<dir>/fleet-state`.
struct Fleet {
    dir: PathBuf,
    http: u16,
    broker: u16,
    token: String,
    child: ChildGuard,
}

impl Fleet {
    fn start(dir: &Path) -> Fleet {
        Fleet::start_with(dir, "", None)
    }

    /// With more config (`extra`, appended; it may not repeat the sections above) and, when
    /// tokens are configured there, the admin token to use.
    fn start_with(dir: &Path, extra: &str, token: Option<&str>) -> Fleet {
        Fleet::start_chunked(dir, extra, token, 65536)
    }

    /// As [`Fleet::start_with`], serving bundles in chunks of `chunk_bytes` (at least 4096).
    fn start_chunked(dir: &Path, extra: &str, token: Option<&str>, chunk_bytes: usize) -> Fleet {
        let (http_port, broker) = (free_port(), free_port());
        let child = start_fleet_server(
            dir,
            http_port,
            broker,
            &format!(
                "[bundles]\ntrust_root = \"root.pub\"\nchunk_bytes = {chunk_bytes}\n\
                 [rollouts]\ntick_ms = 100\n{extra}\n"
            ),
        );
        let token = match token {
            Some(t) => t.to_string(),
            None => std::fs::read_to_string(dir.join("fleet-state/admin-token"))
                .unwrap()
                .trim()
                .to_string(),
        };
        Fleet {
            dir: dir.to_path_buf(),
            http: http_port,
            broker,
            token,
            child,
        }
    }

    /// `fleetctl --server .. --token TOKEN ARGS`: (exit code, stdout, stderr).
    fn ctl(&self, token: &str, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("fleetctl"))
            .current_dir(&self.dir)
            .args(["--server", &format!("http://127.0.0.1:{}", self.http)])
            .args(["--token", token])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `kill -9`, then a new process on the same state, ports and config.
    fn crash_and_restart(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        self.child = spawn_fleet_server(&self.dir);
        wait_fleet_healthy(&mut self.child, &self.dir, self.http);
    }

    fn api(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let auth = format!("Bearer {}", self.token);
        let (code, text) = http(
            self.http,
            method,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body,
        )
        .unwrap();
        (code, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn online(&self) -> usize {
        let (code, v) = self.api("GET", "/v1/devices?online=true", b"");
        if code != 200 {
            return 0;
        }
        v["devices"].as_array().map_or(0, Vec::len)
    }

    fn push(&self, bundle: &Path) -> Value {
        let (code, v) = self.api("POST", "/v1/bundles", &std::fs::read(bundle).unwrap());
        assert!(code == 201 || code == 200, "push: {code} {v}");
        v
    }

    fn rollout(&self, id: &str) -> Value {
        let (code, v) = self.api("GET", &format!("/v1/rollouts/{id}"), b"");
        assert_eq!(code, 200, "{v}");
        v
    }

    fn wait_state(&self, id: &str, want: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(timeout, || {
            last = self.rollout(id);
            last["state"] == want
        });
        assert!(ok, "rollout {id} not {want}: {last:#}");
        last
    }
}

/// An `edge-agent run` process in `<base>/<id>` with the model `model` release 1 installed.
struct Agent {
    id: String,
    dir: PathBuf,
    port: u16,
    child: ChildGuard,
    /// Processes started so far (names the log file of each: `agent.log`, `agent2.log`, ..).
    runs: u32,
}

/// How [`Agent::start_opts`] starts an agent beyond the defaults.
#[derive(Default)]
struct AgentOpts<'a> {
    /// Environment of the first process only (e.g. `EDGE_AGENT_FAULT`); restarts run without.
    env: &'a [(&'a str, &'a str)],
    /// `[health] min_predictions` (0 by default: a window ends healthy after 2 s).
    min_predictions: u64,
}

impl Agent {
    fn start(base: &Path, id: &str, fleet: &Fleet, first_bundle: &str) -> Agent {
        Agent::start_opts(base, id, fleet, first_bundle, &AgentOpts::default())
    }

    fn start_opts(
        base: &Path,
        id: &str,
        fleet: &Fleet,
        first_bundle: &str,
        opts: &AgentOpts,
    ) -> Agent {
        let dir = base.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let root_pub = base.join("root.pub");
        run_ok(
            base,
            "edge-agent",
            &[
                "bundle",
                "install",
                first_bundle,
                "--state-dir",
                &dir.join("state").display().to_string(),
                "--trust-root",
                "root.pub",
            ],
        );
        let port = free_port();
        std::fs::write(
            dir.join("agent.toml"),
            format!(
                r#"device_id = "{id}"
state_dir = "state"
trust_root = "{root}"
[device]
tags = {{ site = "plant-a", line = "3" }}
[http]
listen = "127.0.0.1:{port}"
[health]
window_secs = 2
min_predictions = {min_predictions}
[telemetry]
window_secs = 1
health_secs = 5
[sync]
urls = ["mqtt://127.0.0.1:{broker}"]
directive_keys = ["{dkey}"]
keep_alive_secs = 5
connect_timeout_secs = 2
backoff_min_ms = 100
backoff_max_ms = 500
ack_timeout_ms = 2000
"#,
                root = root_pub.display(),
                broker = fleet.broker,
                dkey = fleet.dir.join("fleet-state/directive.pub").display(),
                min_predictions = opts.min_predictions,
            ),
        )
        .unwrap();
        let child = ChildGuard(
            Command::new(bin("edge-agent"))
                .current_dir(&dir)
                .args(["run", "--config", "agent.toml"])
                .envs(opts.env.iter().copied())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
                .spawn()
                .unwrap(),
        );
        let a = Agent {
            id: id.to_string(),
            dir,
            port,
            child,
            runs: 1,
        };
        assert!(
            wait_until(Duration::from_secs(30), || http(
                port,
                "GET",
                "/v2/health/ready",
                &[],
                b""
            )
            .is_ok_and(|r| r.0 == 200)),
            "agent {id} did not become ready"
        );
        a
    }

    /// Starts the agent again on the same state, config and port (stopping it first with
    /// SIGTERM unless it already exited), without the first process's extra environment.
    fn restart(&mut self) {
        if matches!(self.child.0.try_wait(), Ok(None)) {
            let _ = self.child.terminate(Duration::from_secs(15));
        }
        self.runs += 1;
        let log = self.dir.join(format!("agent{}.log", self.runs));
        self.child = ChildGuard(
            Command::new(bin("edge-agent"))
                .current_dir(&self.dir)
                .args(["run", "--config", "agent.toml"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log).unwrap())
                .spawn()
                .unwrap(),
        );
        let port = self.port;
        assert!(wait_until(Duration::from_secs(30), || http(
            port,
            "GET",
            "/v2/health/ready",
            &[],
            b""
        )
        .is_ok_and(|r| r.0 == 200)));
    }

    fn status(&self, model: &str) -> Value {
        let out = Command::new(bin("edge-agent"))
            .current_dir(&self.dir)
            .args(["status", "--json", "--config", "agent.toml"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["models"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == model).cloned())
            .unwrap_or_default()
    }

    fn events(&self) -> String {
        std::fs::read_to_string(self.dir.join("state/events.jsonl")).unwrap_or_default()
    }

    /// The details of the events named `name` (each test has one model), oldest first.
    fn events_named(&self, name: &str) -> Vec<Value> {
        self.events()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["event"] == name)
            .map(|e| e["detail"].clone())
            .collect()
    }

    /// Waits for the process to exit by itself (a fault point); its exit status.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut status = None;
        let child = &mut self.child.0;
        wait_until(timeout, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        status.unwrap_or_else(|| {
            panic!(
                "{} did not exit within {timeout:?}; events:\n{}",
                self.id,
                self.events()
            )
        })
    }
}

/// Keys and bundles in `d`: `root.key`/`root.pub`; the example model as `pdm-failure`
/// releases 1 and 2 (`p1.bundle`, `p2.bundle`).
fn keys_and_bundles(d: &Path) {
    run_ok(d, "fleetctl", &["keygen", "--out", "root"]);
    build_bundle(
        d,
        &pdm().join("model.onnx"),
        "pdm-failure",
        "1",
        "p1.bundle",
    );
    build_bundle(
        d,
        &pdm().join("model.onnx"),
        "pdm-failure",
        "2",
        "p2.bundle",
    );
}

fn create(fleet: &Fleet, bundle: &str, waves: &[&str], timeout: &str, failure: &str) -> String {
    let body = json!({
        "bundle": bundle,
        "target": "site=plant-a,line=3",
        "waves": waves,
        "success_threshold": "100%",
        "failure_threshold": failure,
        "wave_timeout": timeout,
    });
    let (code, v) = fleet.api("POST", "/v1/rollouts", body.to_string().as_bytes());
    assert_eq!(code, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

fn three_agents(d: &Path, fleet: &Fleet, first: &str) -> Vec<Agent> {
    three_agents_opts(d, fleet, first, [(); 3].map(|()| AgentOpts::default()))
}

/// dev-a, dev-b and dev-c (in this order: the canary is the first in device-id order), each
/// started with its options, all seen online by the fleet.
fn three_agents_opts(d: &Path, fleet: &Fleet, first: &str, opts: [AgentOpts; 3]) -> Vec<Agent> {
    let agents: Vec<Agent> = ["dev-a", "dev-b", "dev-c"]
        .iter()
        .zip(&opts)
        .map(|(id, o)| Agent::start_opts(d, id, fleet, first, o))
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || fleet.online() == 3),
        "the registry did not see the 3 agents online"
    );
    agents
}

/// `src` re-signed by `root.key` with the first output of its first golden sample changed:
/// a validly signed bundle that fails its golden samples on every device.
fn tamper_golden(d: &Path, src: &str, out: &str) {
    let good = std::fs::read(d.join(src)).unwrap();
    let (manifest_bytes, _) = read_unverified(&d.join(src), &Default::default()).unwrap();
    let mut m = Manifest::parse(&manifest_bytes).unwrap();
    let payload = &good[good.len() - m.payload.size as usize..];
    let p = m.golden.samples[0].output.get_mut("probabilities").unwrap();
    p[0] = json!(p[0].as_f64().unwrap() + 0.01);
    let root = shared::trust::SecretKey::load(&d.join("root.key")).unwrap();
    std::fs::write(d.join(out), assemble(&mut m, payload, &root).unwrap()).unwrap();
}

#[test]
fn rollout_canary_whose_bundle_fails_its_golden_samples_halts_with_no_other_device_touched() {
    let tmp = scratch();
    let d = tmp.path();
    keys_and_bundles(d);
    tamper_golden(d, "p2.bundle", "p2-bad-golden.bundle");
    let fleet = Fleet::start(d);
    let agents = three_agents(d, &fleet, "p1.bundle");
    // validly signed: the fleet stores it and may roll it out
    let b = fleet.push(&d.join("p2-bad-golden.bundle"));
    assert_eq!(b["signoff"]["state"], "ready", "{b:#}");

    let id = create(&fleet, "pdm-failure@2.0", &["1", "2", "3"], "2m", "0%");
    let r = fleet.wait_state(&id, "halted", Duration::from_secs(120));
    assert!(
        r["halt_reason"].as_str().is_some_and(|s| !s.is_empty()),
        "{r:#}"
    );
    assert_eq!(r["waves"][0]["devices"], json!(["dev-a"]), "{r:#}");
    assert_eq!(r["waves"][0]["state"], "failed", "{r:#}");
    assert_eq!(r["waves"][1]["state"], "pending", "{r:#}");
    assert_eq!(r["waves"][2]["state"], "pending", "{r:#}");

    // the canary downloaded it and rejected it at install, naming the directive
    let canary = &agents[0];
    let dev = &r["devices"]["dev-a"];
    assert_eq!(dev["state"], "failed", "{dev:#}");
    assert!(
        dev["reason"]
            .as_str()
            .is_some_and(|s| s.contains("golden samples failed")),
        "{dev:#}"
    );
    let rejected = canary.events_named("install_rejected");
    assert_eq!(rejected.len(), 1, "{}", canary.events());
    let directive = dev["directive"].as_str().unwrap();
    assert_eq!(
        rejected[0]["source"],
        format!("fleet:{directive}"),
        "{:#}",
        rejected[0]
    );
    // the local event log names the directive, model and release like the fleet's copy
    assert_eq!(rejected[0]["directive"], directive, "{:#}", rejected[0]);
    assert_eq!(rejected[0]["model"], "pdm-failure", "{:#}", rejected[0]);
    assert_eq!(rejected[0]["release"], 2, "{:#}", rejected[0]);
    let local = canary
        .events()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"] == "install_rejected")
        .unwrap();
    assert_eq!(local["model"], "pdm-failure", "{local:#}");
    assert!(
        rejected[0]["reason"]
            .as_str()
            .is_some_and(|s| s.contains("golden samples failed")),
        "{:#}",
        rejected[0]
    );
    assert_eq!(
        canary.events_named("download_started").len(),
        1,
        "{}",
        canary.events()
    );
    // still on release 1, release 2 never activated (not even briefly)
    let st = canary.status("pdm-failure");
    assert_eq!(st["active"]["release"], 1, "{st:#}");
    assert!(st["last_rollback"].is_null(), "{st:#}");
    assert!(
        canary
            .events_named("activated")
            .iter()
            .all(|e| e["release"] != 2),
        "{}",
        canary.events()
    );
    for a in &agents[1..] {
        assert_eq!(r["devices"][&a.id]["state"], "pending", "{}: {r:#}", a.id);
        assert!(r["devices"][&a.id]["directive"].is_null(), "{r:#}");
        assert!(!a.events().contains("download_started"), "{}", a.id);
        assert_eq!(a.status("pdm-failure")["active"]["release"], 1, "{}", a.id);
    }
}

/// Model `model`: release 1 scales its inputs, release 2 is `release2` (passes its golden
/// samples). A rollout in waves 1, 2, 3 while traffic with `value` in every feature reaches
/// every device: the canary rolls release 2 back on the device within its health window
/// with a reason containing `reason`, the rollout halts, and the other two devices are never
/// sent a directive.
///
/// The agents run with `min_predictions` = [`MIN_FOR_P99`] (100), the most requests any
/// health check needs before it judges (error and NaN rates: 20; p99 latency: 100): the
/// window cannot end healthy before every check applied, so too little traffic leaves the
/// canary in its window (this test then fails at the wave deadline) rather than committing
/// it unjudged.
fn canary_rolls_back_on_the_device_and_halts(
    model: &str,
    release2: Vec<u8>,
    value: f64,
    reason: &str,
) {
    let tmp = scratch();
    let d = tmp.path();
    run_ok(d, "fleetctl", &["keygen", "--out", "root"]);
    std::fs::write(
        d.join("r1.onnx"),
        shared::engine::testing::scaler_model(6, Some(&PDM_FEATURES)),
    )
    .unwrap();
    std::fs::write(d.join("r2.onnx"), release2).unwrap();
    build_bundle(d, &d.join("r1.onnx"), model, "1", "m1.bundle");
    build_bundle(d, &d.join("r2.onnx"), model, "2", "m2.bundle");
    let fleet = Fleet::start(d);
    let judged = || AgentOpts {
        min_predictions: MIN_FOR_P99,
        ..AgentOpts::default()
    };
    let agents = three_agents_opts(d, &fleet, "m1.bundle", [judged(), judged(), judged()]);
    fleet.push(&d.join("m2.bundle"));

    // traffic on every device, all the time
    let stop = Arc::new(AtomicBool::new(false));
    let ports: Vec<u16> = agents.iter().map(|a| a.port).collect();
    let s = stop.clone();
    let path = format!("/v1/models/{model}:predict");
    let traffic = std::thread::spawn(move || {
        let mut row = serde_json::Map::new();
        for f in PDM_FEATURES {
            row.insert(f.into(), json!(value));
        }
        let body = json!({"instances": [row]}).to_string();
        while !s.load(Ordering::Relaxed) {
            for p in &ports {
                let _ = http(
                    *p,
                    "POST",
                    &path,
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });

    let bundle = format!("{model}@2.0");
    let id = create(&fleet, &bundle, &["1", "2", "3"], "2m", "0%");
    let r = fleet.wait_state(&id, "halted", Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();

    assert_eq!(r["waves"][0]["devices"], json!(["dev-a"]), "{r:#}");
    assert!(
        r["halt_reason"].as_str().is_some_and(|s| !s.is_empty()),
        "{r:#}"
    );
    for a in &agents {
        let st = a.status(model);
        assert_eq!(st["active"]["release"], 1, "{}: {st:#}", a.id);
        let dev = &r["devices"][&a.id];
        if a.id == "dev-a" {
            // installed, then rolled back on the device by its health window
            eprintln!("{}: {}", a.id, st["last_rollback"]["reason"]);
            assert!(
                st["last_rollback"]["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains(reason)),
                "{}: {st:#}",
                a.id
            );
            assert!(
                matches!(dev["state"].as_str(), Some("failed" | "rolled_back")),
                "{dev:#}"
            );
            assert!(
                dev["reason"].as_str().is_some_and(|s| s.contains(reason)),
                "{dev:#}"
            );
            let activated = a.events_named("activated");
            assert!(
                activated.iter().any(|e| e["release"] == 2),
                "{}",
                a.events()
            );
            let rolled = a.events_named("rolled_back");
            assert_eq!(rolled.len(), 1, "{}", a.events());
            assert_eq!(rolled[0]["from"], 2, "{:#}", rolled[0]);
        } else {
            // never sent a directive: nothing downloaded, nothing installed
            assert_eq!(dev["state"], "pending", "{}: {dev:#}", a.id);
            assert!(!a.events().contains("download_started"), "{}", a.id);
            assert!(st["last_rollback"].is_null(), "{}: {st:#}", a.id);
        }
    }
    assert_eq!(r["waves"][1]["state"], "pending", "{r:#}");
}

#[test]
fn rollout_canary_whose_model_fails_on_the_device_halts_with_no_other_device_touched() {
    // release 2 takes the logarithm: NaN for the negative readings of the traffic
    canary_rolls_back_on_the_device_and_halts(
        "sensor",
        shared::engine::testing::unary_model("Log", 6, Some(&PDM_FEATURES)),
        -1.0,
        "NaN",
    );
}

#[test]
fn rollout_canary_whose_model_slows_down_on_the_device_halts_with_no_other_device_touched() {
    // release 2 computes the same kind of thing the slow way (each row broadcast 50,000
    // times and summed): tens of times slower than release 1's install-time p99
    canary_rolls_back_on_the_device_and_halts(
        "scorer",
        shared::engine::testing::slow_model(6, Some(&PDM_FEATURES), 50_000),
        2.5,
        "p99 latency",
    );
}

#[test]
fn rollout_a_silent_canary_fails_its_wave_at_the_deadline() {
    let tmp = scratch();
    let d = tmp.path();
    keys_and_bundles(d);
    let fleet = Fleet::start(d);
    let mut agents = three_agents(d, &fleet, "p1.bundle");
    fleet.push(&d.join("p2.bundle"));
    // the canary is the first target in device-id order: dev-a goes silent (frozen; its
    // connection stays open until the broker's keep-alive gives up)
    let canary = agents.remove(0);
    assert_eq!(canary.id, "dev-a");
    Command::new("kill")
        .args(["-STOP", &canary.child.id().to_string()])
        .status()
        .unwrap();
    let id = create(&fleet, "pdm-failure@2.0", &["1", "3"], "5s", "0%");
    let r = fleet.wait_state(&id, "halted", Duration::from_secs(60));
    assert_eq!(r["waves"][0]["devices"], json!(["dev-a"]), "{r:#}");
    assert_eq!(r["waves"][0]["state"], "failed", "{r:#}");
    let dev = &r["devices"]["dev-a"];
    assert_eq!(dev["state"], "failed", "{dev:#}");
    assert!(
        dev["reason"]
            .as_str()
            .is_some_and(|s| s.contains("deadline")),
        "{dev:#}"
    );
    for a in &agents {
        assert_eq!(r["devices"][&a.id]["state"], "pending", "{r:#}");
        assert_eq!(a.status("pdm-failure")["active"]["release"], 1);
        assert!(!a.events().contains("download_started"), "{}", a.id);
    }
    let _ = Command::new("kill")
        .args(["-CONT", &canary.child.id().to_string()])
        .status();
}

#[test]
fn rollout_survives_a_fleet_server_kill_9_and_completes_then_a_fleet_rollback_reaches_an_offline_device_when_it_returns(
) {
    let tmp = scratch();
    let d = tmp.path();
    keys_and_bundles(d);
    let mut fleet = Fleet::start(d);
    let mut agents = three_agents(d, &fleet, "p1.bundle");
    fleet.push(&d.join("p2.bundle"));
    let id = create(&fleet, "pdm-failure@2.0", &["1", "2", "3"], "2m", "0%");
    // kill -9 as soon as the canary has committed (the second wave is being issued or about
    // to be)
    assert!(
        wait_until(Duration::from_secs(90), || fleet.rollout(&id)["devices"]
            ["dev-a"]["state"]
            == "committed"),
        "the canary did not commit: {:#}",
        fleet.rollout(&id)
    );
    fleet.crash_and_restart();
    let r = fleet.wait_state(&id, "completed", Duration::from_secs(120));
    for a in &agents {
        let st = a.status("pdm-failure");
        assert_eq!(st["active"]["release"], 2, "{}: {st:#}", a.id);
        assert_eq!(st["phase"], "committed", "{}: {st:#}", a.id);
        assert_eq!(r["devices"][&a.id]["state"], "committed", "{r:#}");
    }
    for w in r["waves"].as_array().unwrap() {
        assert_eq!(w["state"], "promoted", "{r:#}");
    }
    // the registry shows the new version everywhere
    let (_, v) = fleet.api("GET", "/v1/devices", b"");
    for dev in v["devices"].as_array().unwrap() {
        let m = dev["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "pdm-failure")
            .cloned()
            .unwrap_or_default();
        assert_eq!(m["release"], 2, "{dev:#}");
    }

    // fleet-wide rollback while dev-c is offline (clean shutdown: its death is published)
    let _ = agents[2].child.terminate(Duration::from_secs(15));
    assert!(wait_until(Duration::from_secs(20), || fleet.online() == 2));
    let (code, v) = fleet.api(
        "POST",
        "/v1/rollback",
        json!({"model": "pdm-failure", "reason": "labels were wrong"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["devices"].as_array().map(Vec::len), Some(3), "{v}");
    for a in &agents[..2] {
        assert!(
            wait_until(Duration::from_secs(60), || a.status("pdm-failure")
                ["active"]["release"]
                == 1),
            "{} not rolled back: {:#}",
            a.id,
            a.status("pdm-failure")
        );
        let st = a.status("pdm-failure");
        assert_eq!(st["last_rollback"]["reason"], "labels were wrong", "{st:#}");
    }
    assert_eq!(agents[2].status("pdm-failure")["active"]["release"], 2);
    // it gets the directive when it comes back
    agents[2].restart();
    assert!(
        wait_until(Duration::from_secs(90), || agents[2].status("pdm-failure")
            ["active"]["release"]
            == 1),
        "the returning device was not rolled back: {:#}",
        agents[2].status("pdm-failure")
    );
}

/// The example model with about `bytes` of poorly compressible padding in its metadata (one
/// more `metadata_props` entry, field 14, appended to the protobuf), so that its bundle
/// spans several download windows.
fn padded_model(bytes: usize) -> Vec<u8> {
    fn varint(mut n: usize, out: &mut Vec<u8>) {
        while n >= 0x80 {
            out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let value: Vec<u8> = (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % 64) as usize]
        })
        .collect();
    // StringStringEntryProto { key = 1: "padding", value = 2: .. }
    let mut entry = vec![0x0a, 7];
    entry.extend(b"padding");
    entry.push(0x12);
    varint(value.len(), &mut entry);
    entry.extend(value);
    let mut model = std::fs::read(pdm().join("model.onnx")).unwrap();
    model.push(0x72);
    varint(entry.len(), &mut model);
    model.extend(entry);
    model
}

#[cfg(unix)]
#[test]
fn rollout_completes_after_agents_are_killed_inside_the_install_pipeline_and_mid_download() {
    use std::os::unix::process::ExitStatusExt;
    const CHUNK: u64 = 4096;
    const WINDOW: u64 = 16;
    let tmp = scratch();
    let d = tmp.path();
    keys_and_bundles(d);
    std::fs::write(d.join("big.onnx"), padded_model(300_000)).unwrap();
    build_bundle(d, &d.join("big.onnx"), "pdm-failure", "2", "big2.bundle");
    // the smallest chunk size the fleet allows: the bundle takes several windows
    let fleet = Fleet::start_chunked(d, "", None, CHUNK as usize);
    // each agent kills itself (SIGKILL) at one point of its install of release 2: after the
    // golden samples passed, after activation, and between two download windows
    let faults = ["golden", "activated", "download"];
    let envs = faults.map(|f| [("EDGE_AGENT_FAULT", f)]);
    let opts = [0, 1, 2].map(|i| AgentOpts {
        env: &envs[i],
        ..AgentOpts::default()
    });
    let mut agents = three_agents_opts(d, &fleet, "p1.bundle", opts);
    let b = fleet.push(&d.join("big2.bundle"));
    let bytes = b["bytes"].as_u64().unwrap();
    let chunks = bytes.div_ceil(CHUNK);
    assert!(chunks > 2 * WINDOW, "{bytes} bytes: not several windows");
    let sha = b["sha256"].as_str().unwrap().to_string();

    let id = create(&fleet, "pdm-failure@2.0", &["1", "2", "3"], "5m", "0%");
    // the waves reach dev-a, dev-b, dev-c in this order, one after the other's commit
    for (a, fault) in agents.iter_mut().zip(faults) {
        let status = a.wait_exit(Duration::from_secs(120));
        assert_eq!(status.signal(), Some(9), "{} ({fault}): {status:?}", a.id);
        // what the kill left on the device
        let st = a.status("pdm-failure");
        let progress: Value = serde_json::from_slice(
            &std::fs::read(a.dir.join(format!("state/downloads/{sha}.json"))).unwrap(),
        )
        .unwrap();
        let left = progress["next"].as_u64().unwrap();
        let activated_2 = |a: &Agent| {
            a.events_named("activated")
                .iter()
                .filter(|e| e["release"] == 2)
                .count()
        };
        match fault {
            "golden" => {
                assert_eq!(st["active"]["release"], 1, "{st:#}");
                assert!(a
                    .events_named("golden_passed")
                    .iter()
                    .any(|e| e["release"] == 2));
                assert_eq!(activated_2(a), 0, "{}", a.events());
                assert_eq!(left, chunks, "the complete download stays until installed");
            }
            "activated" => {
                assert_eq!(st["active"]["release"], 2, "{st:#}");
                assert_eq!(st["phase"], "health_window", "{st:#}");
                assert_eq!(activated_2(a), 1, "{}", a.events());
                assert_eq!(left, chunks, "the complete download stays until installed");
            }
            _ => {
                assert_eq!(st["active"]["release"], 1, "{st:#}");
                assert!(left > 0 && left < chunks, "{progress:#}");
                assert_eq!(
                    left % WINDOW,
                    0,
                    "killed at a window boundary: {progress:#}"
                );
                assert!(a.events_named("downloaded").is_empty());
            }
        }

        // the same state, without the fault: it picks up where it was killed
        a.restart();
        assert!(
            wait_until(Duration::from_secs(120), || a
                .events_named("committed")
                .iter()
                .any(|e| e["release"] == 2)),
            "{} ({fault}) did not commit release 2 after the restart: {}",
            a.id,
            a.events()
        );
        let resumed = a.events_named("download_resumed");
        assert_eq!(resumed.len(), 1, "{}", a.events());
        assert_eq!(resumed[0]["next"], left, "{:#}", resumed[0]);
        assert_eq!(resumed[0]["directive"], progress["directive"]);
        // resumed, not started over: one download, one activation of release 2
        assert_eq!(
            a.events_named("download_started").len(),
            1,
            "{}",
            a.events()
        );
        assert_eq!(activated_2(a), 1, "installed once: {}", a.events());
    }

    let r = fleet.wait_state(&id, "completed", Duration::from_secs(120));
    for w in r["waves"].as_array().unwrap() {
        assert_eq!(w["state"], "promoted", "{r:#}");
    }
    for a in &agents {
        assert_eq!(r["devices"][&a.id]["state"], "committed", "{r:#}");
        let st = a.status("pdm-failure");
        assert_eq!(st["active"]["release"], 2, "{}: {st:#}", a.id);
        assert_eq!(st["phase"], "committed", "{}: {st:#}", a.id);
        assert!(st["last_rollback"].is_null(), "{}: {st:#}", a.id);
        // nothing left behind in the downloads
        let left: Vec<_> = std::fs::read_dir(a.dir.join("state/downloads"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{}: {left:?}", a.id);
    }
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    shared::trust::hex(&sha2::Sha256::digest(s.as_bytes()))
}

#[test]
fn rollout_with_fleetctl_roles_second_admin_approval_and_audit() {
    let tmp = scratch();
    let d = tmp.path();
    keys_and_bundles(d);
    let (alice, bob, eve) = (
        "alice-token-0123456789abcdef0123456789",
        "bob-token-0123456789abcdef0123456789ab",
        "eve-token-0123456789abcdef0123456789abc",
    );
    let tokens = format!(
        "[[http.tokens]]\nname = \"alice\"\nsha256 = \"{}\"\nrole = \"admin\"\n\
         [[http.tokens]]\nname = \"bob\"\nsha256 = \"{}\"\nrole = \"admin\"\n\
         [[http.tokens]]\nname = \"eve\"\nsha256 = \"{}\"\nrole = \"viewer\"\n\
         [[bundles.signoff]]\nmodel = \"pdm-failure\"\napprovals = 1\n",
        sha256_hex(alice),
        sha256_hex(bob),
        sha256_hex(eve)
    );
    let fleet = Fleet::start_with(d, &tokens, Some(alice));
    let agent = Agent::start(d, "dev-a", &fleet, "p1.bundle");
    assert!(wait_until(Duration::from_secs(30), || fleet.online() == 1));

    // the registry, through fleetctl
    let (code, out, err) = fleet.ctl(
        eve,
        &["devices", "list", "--selector", "site=plant-a", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["devices"][0]["id"], "dev-a", "{v:#}");
    assert_eq!(v["devices"][0]["tags"]["line"], "3", "{v:#}");
    let (code, out, err) = fleet.ctl(eve, &["devices", "show", "dev-a"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("dev-a") && out.contains("pdm-failure"),
        "{out}"
    );

    // a viewer may not push; the uploader may not approve their own bundle
    let p2 = d.join("p2.bundle").display().to_string();
    let (code, _, err) = fleet.ctl(eve, &["bundle", "push", &p2]);
    assert_eq!(code, 77, "{err}");
    let (code, out, err) = fleet.ctl(alice, &["bundle", "push", &p2, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["signoff"]["state"], "awaiting_approval", "{v:#}");
    let spec = [
        "rollout",
        "create",
        "--bundle",
        "pdm-failure@2.0",
        "--target",
        "site=plant-a",
        "--waves",
        "100%",
        "--success-threshold",
        "100%",
        "--failure-threshold",
        "0%",
        "--wave-timeout",
        "2m",
        "--json",
    ];
    let (code, _, err) = fleet.ctl(alice, &spec);
    assert_ne!(code, 0, "a bundle awaiting approval cannot be rolled out");
    assert!(
        err.contains("awaiting_approval") || err.contains("not ready"),
        "{err}"
    );
    let (code, _, err) = fleet.ctl(alice, &["bundle", "approve", "pdm-failure@2.0"]);
    assert_eq!(code, 77, "the uploader cannot approve: {err}");
    let (code, _, err) = fleet.ctl(bob, &["bundle", "approve", "pdm-failure@2.0"]);
    assert_eq!(code, 0, "{err}");

    let (code, out, err) = fleet.ctl(alice, &spec);
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    fleet.wait_state(&id, "completed", Duration::from_secs(90));
    assert_eq!(agent.status("pdm-failure")["active"]["release"], 2);
    let (code, out, _) = fleet.ctl(eve, &["rollout", "status", &id]);
    assert_eq!(code, 0);
    assert!(out.contains("completed"), "{out}");

    // fleet metrics: devices, versions, rollouts; valid for promtool
    let auth = format!("Bearer {eve}");
    let (code, metrics) = http(
        fleet.http,
        "GET",
        "/metrics",
        &[("Authorization", &auth)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 200);
    for line in [
        "fleet_devices{state=\"online\"} 1",
        "fleet_model_versions{model=\"pdm-failure\",version=\"2.0\"} 1",
        "fleet_rollouts{state=\"completed\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }
    e2e_tests::promtool_check_metrics("fleet", &metrics);

    // the audit log names who did what, and an edit is detected
    let (code, out, err) = fleet.ctl(eve, &["audit", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let actions: Vec<(String, String, String)> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["actor"].as_str().unwrap_or("").to_string(),
                r["action"].as_str().unwrap_or("").to_string(),
                r["result"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for (actor, action, ok) in [
        ("alice", "bundle.push", true),
        ("alice", "rollout.create", false),
        ("alice", "bundle.approve", false),
        ("bob", "bundle.approve", true),
        ("alice", "rollout.create", true),
    ] {
        assert!(
            actions
                .iter()
                .any(|(a, n, r)| a == actor && n == action && (r == "ok") == ok),
            "{actor} {action} ok={ok} not in {actions:?}"
        );
    }
    let (code, _, err) = fleet.ctl(eve, &["audit", "verify"]);
    assert_eq!(code, 0, "{err}");
    let log = d.join("fleet-state/audit.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("\"bob\"", "\"eve\"", 1)).unwrap();
    let (code, out, err) = fleet.ctl(eve, &["audit", "verify"]);
    assert_ne!(code, 0, "an edited record must fail verification: {out}");
    assert!(err.contains("line") || out.contains("line"), "{err}{out}");
}
