//! `fleet-server run` as a process: embedded broker, ingest and admin API on free ports with a
//! scratch state dir; the bootstrap admin token (0600, created once, reused); an `edge-agent`
//! delivering records through the embedded broker into the fleet's ingest store;
//! `validate-config`; a taken port is a clear error, not a hang.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e_tests::{
    bin, free_port, http, install_example_agent, predict_example, root, scratch, start_agent,
    start_fleet_server, wait_until, ChildGuard,
};
use fleet_server::ingest::FileStore;
use serde_json::Value;

fn write_fleet_config(d: &Path, broker: u16) -> std::path::PathBuf {
    let path = d.join("fleet.toml");
    std::fs::write(
        &path,
        format!("[broker]\nlisten = \"127.0.0.1:{broker}\"\n"),
    )
    .unwrap();
    path
}

fn admin_token(d: &Path) -> String {
    std::fs::read_to_string(d.join("fleet-state/admin-token"))
        .unwrap()
        .trim()
        .to_string()
}

fn metric(port: u16, token: &str, name: &str) -> Option<f64> {
    let auth = format!("Bearer {token}");
    let (code, body) = http(port, "GET", "/metrics", &[("Authorization", &auth)], b"").ok()?;
    if code != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn fleet_server_starts_healthy_with_a_private_admin_token_it_reuses() {
    let tmp = scratch();
    let d = tmp.path();
    let (port, broker) = (free_port(), free_port());
    let mut fleet = start_fleet_server(d, port, broker, "");

    let (code, body) = http(port, "GET", "/v1/health", &[], b"").unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );

    let token_file = d.join("fleet-state/admin-token");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "admin-token mode {mode:o}");
    }
    let token = admin_token(d);
    assert_eq!(token.len(), 64);

    let (code, body) = http(port, "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(code, 401);
    assert!(
        serde_json::from_str::<Value>(&body).unwrap()["error"].is_string(),
        "{body}"
    );
    let (code, _) = http(
        port,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer not-the-token")],
        b"",
    )
    .unwrap();
    assert_eq!(code, 401);
    let auth = format!("Bearer {token}");
    let (code, body) = http(port, "GET", "/metrics", &[("Authorization", &auth)], b"").unwrap();
    assert_eq!(code, 200);
    assert!(
        body.contains("fleet_ingest_records_stored_total 0"),
        "{body}"
    );
    // the ingest connected to the embedded broker
    assert!(
        wait_until(Duration::from_secs(10), || metric(
            port,
            &token,
            "fleet_broker_connected"
        ) == Some(1.0)),
        "the ingest did not connect to the embedded broker"
    );
    let (code, body) = http(port, "GET", "/v1/nothing", &[("Authorization", &auth)], b"").unwrap();
    assert_eq!(code, 404);
    assert!(
        serde_json::from_str::<Value>(&body).unwrap()["error"].is_string(),
        "{body}"
    );

    let status = fleet.terminate(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit on SIGTERM: {status:?}"
    );

    // a second start reuses the token file
    let mut fleet = start_fleet_server(d, port, broker, "");
    assert_eq!(admin_token(d), token);
    let (code, _) = http(port, "GET", "/metrics", &[("Authorization", &auth)], b"").unwrap();
    assert_eq!(code, 200);
    assert!(fleet.terminate(Duration::from_secs(15)).is_some());
}

const DEVICE: &str = "press-11";

fn agent_status(d: &Path) -> Value {
    let out = Command::new(bin("edge-agent"))
        .current_dir(d)
        .args(["status", "--json", "--config", "agent.toml"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

#[test]
fn an_agent_delivers_records_through_the_embedded_broker() {
    let tmp = scratch();
    let d = tmp.path();
    // the agent with the example model, as in the telemetry tests
    install_example_agent(d);
    let (fleet_port, broker, agent_port) = (free_port(), free_port(), free_port());
    let mut fleet = start_fleet_server(d, fleet_port, broker, "");
    std::fs::write(
        d.join("agent.toml"),
        format!(
            r#"device_id = "{DEVICE}"
state_dir = "state"
trust_root = "root.pub"
[http]
listen = "127.0.0.1:{agent_port}"
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
        ),
    )
    .unwrap();
    let mut agent = start_agent(d, agent_port);
    predict_example(agent_port, 5);

    let ingest = d.join("fleet-state/ingest");
    let stored = wait_until(Duration::from_secs(60), || {
        FileStore::read_state(&ingest, DEVICE)
            .ok()
            .flatten()
            .is_some_and(|s| s.last_seq > 0)
    });
    assert!(stored, "no records of {DEVICE} in {}", ingest.display());
    let mut acked = 0;
    let delivered = wait_until(Duration::from_secs(60), || {
        acked = agent_status(d)["telemetry"]["outbox"]["acked_through"]
            .as_u64()
            .unwrap_or(0);
        acked > 0
    });
    assert!(delivered, "the agent's outbox was never acknowledged");
    let state = FileStore::read_state(&ingest, DEVICE).unwrap().unwrap();
    assert!(
        state.last_seq >= acked,
        "acked {acked} > stored {}",
        state.last_seq
    );
    let token = admin_token(d);
    let records = metric(fleet_port, &token, "fleet_ingest_records_stored_total");
    assert!(records.is_some_and(|n| n > 0.0), "{records:?}");
    assert!(agent.terminate(Duration::from_secs(15)).is_some());
    assert!(fleet.terminate(Duration::from_secs(15)).is_some());
}

#[test]
fn validate_config_prints_every_problem_and_the_deploy_example_passes() {
    let tmp = scratch();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "topic_prefix = \"edge/#\"\n[http]\nlisten = \"nowhere\"\n\
         [[http.tokens]]\nname = \"ops\"\nsha256 = \"abc\"\nrole = \"root\"\n\
         [broker]\nmax_payload_bytes = 1\n[mqtt]\nurl = \"http://broker\"\n",
    )
    .unwrap();
    let out = Command::new(bin("fleet-server"))
        .arg("validate-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "topic_prefix",
        "http.listen",
        "http.tokens[0].sha256",
        "http.tokens[0].role",
        "broker.max_payload_bytes",
        "mqtt.url",
    ] {
        assert!(err.contains(key), "{key:?} not in:\n{err}");
    }
    assert_eq!(err.lines().count(), 6, "{err}");

    let unknown = tmp.path().join("unknown.toml");
    std::fs::write(&unknown, "[broker]\nembeded = true\n").unwrap();
    let out = Command::new(bin("fleet-server"))
        .arg("validate-config")
        .arg(&unknown)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("embeded"));

    let out = Command::new(bin("fleet-server"))
        .arg("validate-config")
        .arg(root().join("deploy/fleet-server.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // the printed defaults are a valid config too
    let defaults = tmp.path().join("defaults.toml");
    let out = Command::new(bin("fleet-server"))
        .arg("print-default-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&defaults, &out.stdout).unwrap();
    let out = Command::new(bin("fleet-server"))
        .arg("validate-config")
        .arg(&defaults)
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// Runs `fleet-server run` expecting it to exit on its own; returns (exit code, stderr).
fn run_expecting_exit(d: &Path, http_port: u16, broker: u16) -> (Option<i32>, String) {
    let cfg = write_fleet_config(d, broker);
    let mut child = ChildGuard(
        Command::new(bin("fleet-server"))
            .current_dir(d)
            .args(["run", "--state-dir", "fleet-state", "--config"])
            .arg(&cfg)
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{http_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let exited = wait_until(Duration::from_secs(20), || {
        matches!(child.0.try_wait(), Ok(Some(_)))
    });
    assert!(exited, "fleet-server kept running on a taken port");
    let code = child.0.try_wait().ok().flatten().and_then(|s| s.code());
    let mut err = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    (code, err)
}

#[test]
fn a_taken_port_is_a_clear_error_not_a_hang() {
    let tmp = scratch();
    let d = tmp.path();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();

    // the broker's port
    let (code, err) = run_expecting_exit(d, free_port(), taken_port);
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {err}");
    assert!(
        err.contains(&format!("127.0.0.1:{taken_port}")) && err.contains("broker.listen"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // the admin API's port
    let (code, err) = run_expecting_exit(d, taken_port, free_port());
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {err}");
    assert!(
        err.contains(&format!("127.0.0.1:{taken_port}")) && err.contains("http.listen"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    drop(taken);
}
