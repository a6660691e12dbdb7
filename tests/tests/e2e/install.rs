//! `edge-agent bundle install / status / rollback`: the install pipeline on a real state
//! directory, bundles failing their golden samples, and SIGKILL at every step of an install.

use std::path::Path;
use std::process::{Command, Output};

use e2e_tests::{bin, build_bundle, pdm, run_ok, scratch};
use serde_json::Value;

fn agent(dir: &Path, args: &[&str], fault: Option<&str>) -> Output {
    let mut c = Command::new(bin("edge-agent"));
    c.current_dir(dir).args(args);
    if let Some(f) = fault {
        c.env("EDGE_AGENT_FAULT", f);
    }
    c.output().expect("run edge-agent")
}

fn fleetctl(dir: &Path, args: &[&str]) {
    run_ok(dir, "fleetctl", args);
}

fn build(dir: &Path, release: &str, out: &str) {
    build_bundle(dir, &pdm().join("model.onnx"), "pdm-failure", release, out);
}

const STATE: [&str; 4] = ["--state-dir", "state", "--trust-root", "root.pub"];

fn install(dir: &Path, bundle: &str, fault: Option<&str>) -> Output {
    let mut args = vec!["bundle", "install", bundle];
    args.extend(STATE);
    agent(dir, &args, fault)
}

fn status(dir: &Path) -> Value {
    let out = agent(dir, &["status", "--json", "--state-dir", "state"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn active(dir: &Path) -> Option<u64> {
    status(dir)["models"][0]["active"]["release"].as_u64()
}

/// The version directories on disk for the model.
fn versions(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("state/models/pdm-failure"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n != "state.json")
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn install_golden_gate_rollback_and_downgrade() {
    let tmp = scratch();
    let d = tmp.path();
    fleetctl(d, &["keygen", "--out", "root"]);
    build(d, "1", "b1.bundle");
    build(d, "2", "b2.bundle");
    let out = install(d, "b1.bundle", None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("8 golden samples passed"), "{text}");
    assert_eq!(active(d), Some(1));
    assert_eq!(status(d)["models"][0]["phase"], "health_window");

    // a validly signed bundle whose golden outputs this device does not reproduce
    let good = std::fs::read(d.join("b2.bundle")).unwrap();
    let (manifest_bytes, _) =
        shared::bundle::read_unverified(&d.join("b2.bundle"), &Default::default()).unwrap();
    let mut m = shared::bundle::Manifest::parse(&manifest_bytes).unwrap();
    let payload = &good[good.len() - m.payload.size as usize..];
    m.release = 3;
    let p = m.golden.samples[0].output.get_mut("probabilities").unwrap();
    p[0] = serde_json::json!(p[0].as_f64().unwrap() + 0.01);
    let root = shared::trust::SecretKey::load(&d.join("root.key")).unwrap();
    let bytes = shared::bundle::assemble(&mut m, payload, &root).unwrap();
    std::fs::write(d.join("bad-golden.bundle"), bytes).unwrap();
    let out = install(d, "bad-golden.bundle", None);
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("golden samples failed on this device: golden sample 1"),
        "{err}"
    );
    assert_eq!(active(d), Some(1));
    let events = std::fs::read_to_string(d.join("state/events.jsonl")).unwrap();
    assert!(events.contains("\"install_rejected\"") && events.contains("golden samples failed"));

    // upgrade, roll back instantly, refuse a downgrade by release
    assert!(install(d, "b2.bundle", None).status.success());
    assert_eq!(active(d), Some(2));
    assert_eq!(status(d)["models"][0]["previous"]["release"], 1);
    assert_eq!(versions(d).len(), 2);
    let out = agent(
        d,
        &[
            "rollback",
            "pdm-failure",
            "--reason",
            "operator test",
            "--state-dir",
            "state",
            "--trust-root",
            "root.pub",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(d);
    assert_eq!(s["models"][0]["active"]["release"], 1);
    assert_eq!(s["models"][0]["last_rollback"]["reason"], "operator test");
    let out = install(d, "b1.bundle", None);
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already active"));
    // a bundle signed by another key never gets in
    fleetctl(d, &["keygen", "--out", "other"]);
    let out = agent(
        d,
        &[
            "bundle",
            "install",
            "b2.bundle",
            "--state-dir",
            "state",
            "--trust-root",
            "other.pub",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key id"));
}

#[test]
fn sigkill_at_every_install_step_leaves_one_complete_active_version() {
    let tmp = scratch();
    let d = tmp.path();
    fleetctl(d, &["keygen", "--out", "root"]);
    build(d, "1", "b1.bundle");
    build(d, "2", "b2.bundle");
    assert!(install(d, "b1.bundle", None).status.success());
    let steps = [
        "verified",
        "compatible",
        "loaded",
        "golden",
        "measured",
        "moved",
        "activated",
    ];
    for step in steps {
        let out = install(d, "b2.bundle", Some(step));
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                out.status.signal(),
                Some(9),
                "{step}: not killed: {:?} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // exactly one complete active version, whichever the kill left
        let expect = if step == "activated" { 2 } else { 1 };
        assert_eq!(active(d), Some(expect), "after a kill at {step}");
        // the next run cleans up: rolling back (or re-installing) opens the store
        if expect == 2 {
            let out = agent(
                d,
                &[
                    "rollback",
                    "pdm-failure",
                    "--state-dir",
                    "state",
                    "--trust-root",
                    "root.pub",
                ],
                None,
            );
            assert!(out.status.success());
            // release 1 active again; release 2 stays as previous
        } else {
            let out = agent(d, &["status", "--state-dir", "state"], None);
            assert!(out.status.success());
            // opening the store (as install does) removes staging leftovers and orphans
            let out = install(d, "b1.bundle", None);
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("already active"),
                "{step}"
            );
        }
        let staging: Vec<_> = std::fs::read_dir(d.join("state/staging"))
            .unwrap()
            .collect();
        assert!(
            staging.is_empty(),
            "staging not cleaned after a kill at {step}"
        );
        let s = status(d);
        let mut named = vec![s["models"][0]["active"]["dir"]
            .as_str()
            .unwrap()
            .to_string()];
        if let Some(p) = s["models"][0]["previous"]["dir"].as_str() {
            named.push(p.to_string());
        }
        named.sort();
        assert_eq!(
            versions(d),
            named,
            "only named versions on disk after a kill at {step}"
        );
        // the active version loads and matches its record
        let (m, _) = {
            let store = edge_agent_open(d);
            store.load_active("pdm-failure").unwrap()
        };
        assert_eq!(m.name, "pdm-failure");
    }
}

fn edge_agent_open(d: &Path) -> edge_agent::store::Store {
    edge_agent::store::Store::open(&edge_agent::store::StoreConfig {
        root: d.join("state"),
        trust_root: d.join("root.pub"),
        keyring: None,
        max_bundle_bytes: 1 << 30,
        latency_runs: 10,
    })
    .unwrap()
}
