//! Shadow and split versions beside the active one, promotion, and `/metrics` checked by
//! promtool.

use std::path::Path;
use std::time::Duration;

use e2e_tests::{build_bundle, http, pdm, run_ok, scratch, wait_until, PDM_FEATURES as PDM};
use serde_json::{json, Value};

use crate::http::{holdout_rows, instance, Agent};
use crate::service::install_bundle;

fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    run_ok(dir, program, args)
}

/// `edge-agent status --json` on `dir/state`.
fn status(dir: &Path) -> Value {
    serde_json::from_str(&run(
        dir,
        "edge-agent",
        &["status", "--json", "--state-dir", "state"],
    ))
    .unwrap()
}

fn bundle(dir: &Path, model: &Path, release: &str, out: &str) {
    build_bundle(dir, model, "pdm-failure", release, out);
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

#[test]
fn shadow_split_promote_and_metrics() {
    let tmp = scratch();
    let d = tmp.path();
    run(d, "fleetctl", &["keygen", "--out", "root"]);
    let model = pdm().join("model.onnx");
    std::fs::write(
        d.join("scale.onnx"),
        shared::engine::testing::scaler_model(6, Some(&PDM)),
    )
    .unwrap();
    bundle(d, &model, "1", "r1.bundle");
    bundle(d, &model, "2", "r2.bundle");
    bundle(d, &d.join("scale.onnx"), "3", "r3.bundle");
    install_bundle(d, "r1.bundle");
    let agent = Agent::start(d, None);
    let port = agent.port;
    let rows: Vec<Value> = holdout_rows(50).iter().map(|r| instance(r)).collect();
    // POST `body` to `path` with an optional routing key; expects 200 and JSON
    let post = |path: &str, body: Value, key: Option<&str>| -> Value {
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(k) = key {
            headers.push(("X-Routing-Key", k));
        }
        let (code, text) = http(port, "POST", path, &headers, body.to_string().as_bytes()).unwrap();
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    };
    let predict = |row: &Value, key: Option<&str>| -> Value {
        post(
            "/v1/models/pdm-failure:predict",
            json!({"instances": [row]}),
            key,
        )
    };
    let infer = |row: &Value, key: Option<&str>| -> Value {
        // one input per feature: fits both models whatever their input is named
        let inputs: Vec<Value> = PDM
            .iter()
            .map(|f| json!({ "name": f, "shape": [1, 1], "datatype": "FP64", "data": [row[*f]] }))
            .collect();
        let v = post(
            "/v2/models/pdm-failure/infer",
            json!({ "inputs": inputs }),
            key,
        );
        assert_eq!(
            v["parameters"]["prediction_ids"].as_array().map(Vec::len),
            Some(1),
            "{v}"
        );
        v
    };

    // a shadow of the same model: never serves, agrees on every row
    let out = run(
        d,
        "edge-agent",
        &[
            "bundle",
            "install",
            "r2.bundle",
            "--shadow",
            "--state-dir",
            "state",
        ],
    );
    assert!(out.contains("as a shadow"), "{out}");
    for r in &rows {
        assert_eq!(predict(r, None)["release"], 1);
    }
    // Open Inference Protocol requests reach the shadow too: 10 more rows, served by 1
    for r in &rows[..10] {
        assert_eq!(infer(r, None)["model_version"], "1.0");
    }
    let scrape = || http(port, "GET", "/metrics", &[], b"").unwrap().1;
    assert!(wait_until(Duration::from_secs(10), || {
        let m = scrape();
        metric(
            &m,
            "edge_agent_shadow_rows_total{model=\"pdm-failure\",release=\"2\",outcome=\"agreed\"}",
        ) + metric(
            &m,
            "edge_agent_shadow_skipped_total{model=\"pdm-failure\",release=\"2\"}",
        ) >= 60.0
    }));
    let m = scrape();
    assert_eq!(metric(&m, "edge_agent_shadow_rows_total{model=\"pdm-failure\",release=\"2\",outcome=\"disagreed\"}"), 0.0);
    let st = status(d);
    assert_eq!(st["models"][0]["candidate"]["mode"], "shadow");
    run(
        d,
        "edge-agent",
        &["drop-candidate", "pdm-failure", "--state-dir", "state"],
    );

    // a 50% split of another model, sticky by routing key
    let out = run(
        d,
        "edge-agent",
        &[
            "bundle",
            "install",
            "r3.bundle",
            "--split",
            "50",
            "--state-dir",
            "state",
        ],
    );
    assert!(out.contains("50% split"), "{out}");
    let mut served = std::collections::BTreeMap::new();
    for k in 0..40 {
        let key = format!("machine-{k}");
        let a = predict(&rows[0], Some(&key))["release"].as_u64().unwrap();
        let b = predict(&rows[1], Some(&key))["release"].as_u64().unwrap();
        assert_eq!(a, b, "key {key} moved between versions");
        // the same key over the Open Inference Protocol goes to the same version
        let c = infer(&rows[2], Some(&key))["model_version"].clone();
        assert_eq!(
            c,
            json!(format!("{a}.0")),
            "key {key}: OIP served {c}, :predict {a}"
        );
        *served.entry(a).or_insert(0) += 1;
    }
    assert!(
        served.get(&1).copied().unwrap_or(0) > 5 && served.get(&3).copied().unwrap_or(0) > 5,
        "{served:?}"
    );

    // promote: release 3 active, 1 previous, candidate gone
    let out = run(
        d,
        "edge-agent",
        &["promote", "pdm-failure", "--state-dir", "state"],
    );
    assert!(out.contains("promoted"), "{out}");
    let st = status(d);
    assert_eq!(st["models"][0]["active"]["release"], 3);
    assert_eq!(st["models"][0]["previous"]["release"], 1);
    assert!(st["models"][0]["candidate"].is_null());
    assert_eq!(predict(&rows[0], Some("machine-1"))["release"], 3);

    // /metrics is valid Prometheus text
    let text = scrape();
    for family in [
        "edge_agent_requests_total",
        "edge_agent_row_latency_seconds_bucket",
        "edge_agent_feature_value_bucket",
        "edge_agent_prediction_score_bucket",
        "edge_agent_model_info",
        "edge_agent_installs_total",
    ] {
        assert!(text.contains(family), "{family} missing");
    }
    e2e_tests::promtool_check_metrics("agent", &text);
}
