//! Health windows: a model that starts returning NaN, and one that is far slower than the
//! version it replaced, are rolled back automatically with the reason in status, events and
//! metrics.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e_tests::{
    bin, build_bundle, free_port, http, run_ok, scratch, wait_until, ChildGuard,
    PDM_FEATURES as PDM,
};
use serde_json::{json, Value};

fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    run_ok(dir, program, args)
}

fn status(dir: &Path, name: &str) -> Value {
    let s: Value = serde_json::from_str(&run(
        dir,
        "edge-agent",
        &["status", "--json", "--state-dir", "state"],
    ))
    .unwrap();
    s["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .cloned()
        .unwrap_or_default()
}

#[test]
fn nan_and_slow_versions_are_rolled_back_within_their_window() {
    let tmp = scratch();
    let d = tmp.path();
    run(d, "fleetctl", &["keygen", "--out", "root"]);
    // "sensor": release 1 scales its inputs; release 2 takes their logarithm, which passes its
    // golden samples (positive reference rows) but turns negative readings into NaN.
    std::fs::write(
        d.join("scale.onnx"),
        shared::engine::testing::scaler_model(6, Some(&PDM)),
    )
    .unwrap();
    std::fs::write(
        d.join("log.onnx"),
        shared::engine::testing::unary_model("Log", 6, Some(&PDM)),
    )
    .unwrap();
    build_bundle(d, &d.join("scale.onnx"), "sensor", "1", "s1.bundle");
    build_bundle(d, &d.join("log.onnx"), "sensor", "2", "s2.bundle");
    // "scorer": release 1 scales its inputs; release 2 computes the same thing the slow way
    // (each row broadcast 50,000 times and summed): tens of times slower per row.
    std::fs::write(
        d.join("slow.onnx"),
        shared::engine::testing::slow_model(6, Some(&PDM), 50_000),
    )
    .unwrap();
    build_bundle(d, &d.join("scale.onnx"), "scorer", "1", "f1.bundle");
    build_bundle(d, &d.join("slow.onnx"), "scorer", "2", "f2.bundle");
    for b in ["s1.bundle", "f1.bundle"] {
        run(
            d,
            "edge-agent",
            &[
                "bundle",
                "install",
                b,
                "--state-dir",
                "state",
                "--trust-root",
                "root.pub",
            ],
        );
    }
    let port = free_port();
    std::fs::write(
        d.join("agent.toml"),
        format!("state_dir = \"state\"\ntrust_root = \"root.pub\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n[health]\nwindow_secs = 3600\nmin_predictions = 200\n"),
    )
    .unwrap();
    let _agent = ChildGuard(
        Command::new(bin("edge-agent"))
            .current_dir(d)
            .args(["run", "--config", "agent.toml"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(20), || http(
        port,
        "GET",
        "/v2/health/ready",
        &[],
        b""
    )
    .is_ok_and(|r| r.0 == 200)));
    for b in ["s2.bundle", "f2.bundle"] {
        let out = run(
            d,
            "edge-agent",
            &["bundle", "install", b, "--state-dir", "state"],
        );
        assert!(out.contains("by the running agent"), "{out}");
    }
    assert_eq!(status(d, "sensor")["active"]["release"], 2);
    assert_eq!(status(d, "scorer")["active"]["release"], 2);

    let predict = |name: &str, row: Value| {
        let body = json!({"instances": [row]}).to_string();
        http(
            port,
            "POST",
            &format!("/v1/models/{name}:predict"),
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .unwrap()
    };
    // negative readings: NaN from release 2
    let mut sensor_row = serde_json::Map::new();
    for f in PDM {
        sensor_row.insert(f.into(), json!(-1.0));
    }
    let mut scorer_row = serde_json::Map::new();
    for f in PDM {
        scorer_row.insert(f.into(), json!(2.5));
    }
    // 40 requests judge the NaN rate; the p99 latency needs edge_agent::runtime::MIN_FOR_P99
    for i in 0..edge_agent::runtime::MIN_FOR_P99 + 20 {
        if i < 40 {
            let (code, _) = predict("sensor", Value::Object(sensor_row.clone()));
            assert_eq!(code, 200);
        }
        let (code, body) = predict("scorer", Value::Object(scorer_row.clone()));
        assert!(code == 200, "{body}");
    }
    assert!(
        wait_until(Duration::from_secs(15), || status(d, "sensor")["active"]
            ["release"]
            == 1),
        "NaN model not rolled back: {}",
        status(d, "sensor")
    );
    let s = status(d, "sensor");
    let reason = s["last_rollback"]["reason"].as_str().unwrap();
    assert!(reason.contains("NaN/inf output rate"), "{reason}");
    assert_eq!(s["previous"]["release"], 2);
    assert!(
        wait_until(Duration::from_secs(15), || status(d, "scorer")["active"]
            ["release"]
            == 1),
        "slow model not rolled back: {}",
        status(d, "scorer")
    );
    let reason = status(d, "scorer")["last_rollback"]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("p99 latency"), "{reason}");
    // serving the previous version again, at once
    let (code, body) = predict("sensor", Value::Object(sensor_row.clone()));
    assert_eq!(code, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["release"], 1);
    let events = std::fs::read_to_string(d.join("state/events.jsonl")).unwrap();
    assert_eq!(events.matches("\"rolled_back\"").count(), 2);
    let (_, metrics) = http(port, "GET", "/metrics", &[], b"").unwrap();
    assert!(
        metrics.contains("edge_agent_rollbacks_total{reason=\"nan\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edge_agent_rollbacks_total{reason=\"latency\"} 1"),
        "{metrics}"
    );
}
