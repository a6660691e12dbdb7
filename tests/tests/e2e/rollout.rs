//! Staged rollouts end to end: a real `fleet-server run` (embedded broker) and real
//! `edge-agent` processes that get signed directives, download the bundle in chunks over
//! MQTT and install it through their own pipeline. A canary whose model fails on the device
//! halts the rollout with no other device touched; a silent canary fails its wave at the
//! deadline; a `kill -9` of the fleet server mid-rollout resumes and completes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e_tests::{
    bin, build_bundle, free_port, http, pdm, run_ok, scratch, wait_until, ChildGuard, PDM_FEATURES,
};
use serde_json::{json, Value};

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
        let (http_port, broker) = (free_port(), free_port());
        std::fs::write(
            dir.join("fleet.toml"),
            format!(
                "state_dir = \"fleet-state\"\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\
                 {extra}\n\
                 [broker]\nlisten = \"127.0.0.1:{broker}\"\n\
                 [bundles]\ntrust_root = \"root.pub\"\nchunk_bytes = 65536\n\
                 [rollouts]\ntick_ms = 100\n"
            ),
        )
        .unwrap();
        let mut f = Fleet {
            dir: dir.to_path_buf(),
            http: http_port,
            broker,
            token: String::new(),
            child: Fleet::spawn(dir),
        };
        f.wait_healthy();
        f.token = match token {
            Some(t) => t.to_string(),
            None => std::fs::read_to_string(dir.join("fleet-state/admin-token"))
                .unwrap()
                .trim()
                .to_string(),
        };
        f
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

    fn spawn(dir: &Path) -> ChildGuard {
        ChildGuard(
            Command::new(bin("fleet-server"))
                .current_dir(dir)
                .args(["run", "--config", "fleet.toml"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("fleet.log")).unwrap())
                .spawn()
                .unwrap(),
        )
    }

    fn wait_healthy(&mut self) {
        let port = self.http;
        let child = &mut self.child;
        let ok = wait_until(Duration::from_secs(30), || {
            matches!(child.0.try_wait(), Ok(Some(_)))
                || http(port, "GET", "/v1/health", &[], b"").is_ok_and(|r| r.0 == 200)
        });
        assert!(
            ok && matches!(self.child.0.try_wait(), Ok(None)),
            "fleet-server did not become healthy: {}",
            std::fs::read_to_string(self.dir.join("fleet.log")).unwrap_or_default()
        );
    }

    /// `kill -9`, then a new process on the same state, ports and config.
    fn crash_and_restart(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        self.child = Fleet::spawn(&self.dir);
        self.wait_healthy();
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
}

impl Agent {
    fn start(base: &Path, id: &str, fleet: &Fleet, first_bundle: &str) -> Agent {
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
min_predictions = 0
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
            ),
        )
        .unwrap();
        let child = ChildGuard(
            Command::new(bin("edge-agent"))
                .current_dir(&dir)
                .args(["run", "--config", "agent.toml"])
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

    /// Starts the agent again on the same state, config and port.
    fn restart(&mut self) {
        let _ = self.child.terminate(Duration::from_secs(15));
        self.child = ChildGuard(
            Command::new(bin("edge-agent"))
                .current_dir(&self.dir)
                .args(["run", "--config", "agent.toml"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(self.dir.join("agent2.log")).unwrap())
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
}

/// Keys and bundles in `d`: `root.key`/`root.pub`; the example model as `pdm-failure`
/// releases 1 and 2 (`p1.bundle`, `p2.bundle`); `sensor` release 1 scales its inputs
/// (`s1.bundle`), release 2 takes their logarithm (`s2.bundle`: passes its golden samples,
/// returns NaN for negative readings).
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
    std::fs::write(
        d.join("scale.onnx"),
        shared::engine::testing::scaler_model(6, Some(&PDM_FEATURES)),
    )
    .unwrap();
    std::fs::write(
        d.join("log.onnx"),
        shared::engine::testing::unary_model("Log", 6, Some(&PDM_FEATURES)),
    )
    .unwrap();
    build_bundle(d, &d.join("scale.onnx"), "sensor", "1", "s1.bundle");
    build_bundle(d, &d.join("log.onnx"), "sensor", "2", "s2.bundle");
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
    let agents: Vec<Agent> = ["dev-a", "dev-b", "dev-c"]
        .iter()
        .map(|id| Agent::start(d, id, fleet, first))
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || fleet.online() == 3),
        "the registry did not see the 3 agents online"
    );
    agents
}

#[test]
fn rollout_canary_whose_model_fails_on_the_device_halts_with_no_other_device_touched() {
    let tmp = scratch();
    let d = tmp.path();
    keys_and_bundles(d);
    let fleet = Fleet::start(d);
    let agents = three_agents(d, &fleet, "s1.bundle");
    fleet.push(&d.join("s2.bundle"));

    // negative readings on every device, all the time: release 2 answers them with NaN
    let stop = Arc::new(AtomicBool::new(false));
    let ports: Vec<u16> = agents.iter().map(|a| a.port).collect();
    let s = stop.clone();
    let traffic = std::thread::spawn(move || {
        let mut row = serde_json::Map::new();
        for f in PDM_FEATURES {
            row.insert(f.into(), json!(-1.0));
        }
        let body = json!({"instances": [row]}).to_string();
        while !s.load(Ordering::Relaxed) {
            for p in &ports {
                let _ = http(
                    *p,
                    "POST",
                    "/v1/models/sensor:predict",
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });

    let id = create(&fleet, "sensor@2.0", &["1", "2", "3"], "2m", "0%");
    let r = fleet.wait_state(&id, "halted", Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();

    let canary: Vec<String> = r["waves"][0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(canary.len(), 1, "{r:#}");
    assert!(r["halt_reason"].is_string(), "{r:#}");
    for a in &agents {
        let st = a.status("sensor");
        assert_eq!(st["active"]["release"], 1, "{}: {st:#}", a.id);
        let dev = &r["devices"][&a.id];
        if canary.contains(&a.id) {
            // installed, then rolled back on the device by its health window
            assert!(
                st["last_rollback"]["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("NaN")),
                "{}: {st:#}",
                a.id
            );
            assert!(
                matches!(dev["state"].as_str(), Some("failed" | "rolled_back")),
                "{dev:#}"
            );
            assert!(a.events().contains("download_started"));
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
