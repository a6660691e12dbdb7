//! Inference over a real Mosquitto broker: named-feature JSON in, predictions out, errors
//! naming the field; the agent keeps serving when the broker goes away and comes back.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e_tests::{bin, free_port, pdm, scratch, wait_until, ChildGuard};
use serde_json::Value;

fn tools() -> bool {
    let mosquitto = Command::new("mosquitto").arg("-h").output().is_ok();
    if mosquitto && Command::new("mosquitto_pub").arg("--help").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("E2E_REQUIRE_TOOLS").is_none(),
        "mosquitto and mosquitto-clients are required (E2E_REQUIRE_TOOLS is set)"
    );
    eprintln!("SKIPPED mqtt tests: mosquitto or mosquitto_pub not installed");
    false
}

fn broker(dir: &Path, port: u16) -> ChildGuard {
    let conf = dir.join(format!("mosquitto-{port}.conf"));
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let child = ChildGuard(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto"),
    );
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));
    child
}

/// Publishes `msg` to `input` and returns the first message on `output`.
fn roundtrip(port: u16, input: &str, output: &str, msg: &str) -> Value {
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            output,
            "-C",
            "1",
            "-W",
            "20",
            "-q",
            "1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let st = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            input,
            "-q",
            "1",
            "-m",
            msg,
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let out = sub.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no reply on {output}: {e}"))
}

#[test]
fn predictions_over_mosquitto() {
    if !tools() {
        return;
    }
    let tmp = scratch();
    let d = tmp.path();
    let ctl = |args: &[&str]| {
        let out = Command::new(bin("fleetctl"))
            .current_dir(d)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctl(&["keygen", "--out", "root"]);
    let (model, reference) = (pdm().join("model.onnx"), pdm().join("reference.csv"));
    ctl(&[
        "bundle",
        "build",
        "--model",
        model.to_str().unwrap(),
        "--name",
        "pdm-failure",
        "--version",
        "1.0.0",
        "--release",
        "1",
        "--key",
        "root.key",
        "--reference",
        reference.to_str().unwrap(),
        "--out",
        "b1.bundle",
    ]);
    let out = Command::new(bin("edge-agent"))
        .current_dir(d)
        .args([
            "bundle",
            "install",
            "b1.bundle",
            "--state-dir",
            "state",
            "--trust-root",
            "root.pub",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mport = free_port();
    let mut mosq = Some(broker(d, mport));
    std::fs::write(
        d.join("agent.toml"),
        format!(
            "state_dir = \"state\"\ntrust_root = \"root.pub\"\n[http]\nlisten = \"127.0.0.1:{}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{mport}\"\nfeedback_topic = \"plant/line3/pdm/feedback\"\n[[mqtt.inference]]\nmodel = \"pdm-failure\"\ninput_topic = \"plant/line3/pdm/in\"\noutput_topic = \"plant/line3/pdm/out\"\nerror_topic = \"plant/line3/pdm/errors\"\n",
            free_port()
        ),
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
    std::thread::sleep(Duration::from_millis(1500));
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(pdm().join("expected.json")).unwrap())
            .unwrap();
    let holdout = std::fs::read_to_string(pdm().join("holdout.csv")).unwrap();
    let mut lines = holdout.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let first: Vec<&str> = lines.next().unwrap().split(',').collect();
    let mut features = serde_json::Map::new();
    for (h, v) in header.iter().zip(&first).take(6) {
        features.insert(h.to_string(), serde_json::json!(v.parse::<f64>().unwrap()));
    }
    let msg = serde_json::json!({"id": "m-1", "features": features}).to_string();
    let reply = roundtrip(mport, "plant/line3/pdm/in", "plant/line3/pdm/out", &msg);
    assert_eq!(reply["id"], "m-1");
    assert_eq!(reply["release"], 1);
    let want = &expected["holdout"]["first_rows"][0];
    assert_eq!(
        reply["prediction"]["label"], want["label"],
        "{reply} vs {want}"
    );
    let (got, exp) = (
        &reply["prediction"]["probabilities"],
        &want["probabilities"],
    );
    for i in 0..2 {
        assert!(
            (got[i].as_f64().unwrap() - exp[i].as_f64().unwrap()).abs() < 1e-5,
            "{got} vs {exp}"
        );
    }
    // the prediction has an id, and ground truth sent for it on the feedback topic is applied
    let id = reply["prediction_id"]
        .as_str()
        .expect("prediction_id")
        .to_string();
    let truth = serde_json::json!({"prediction_id": id, "label": want["label"]}).to_string();
    let fb = roundtrip(
        mport,
        "plant/line3/pdm/feedback",
        "plant/line3/pdm/feedback/results",
        &truth,
    );
    assert_eq!(fb["status"], "applied", "{fb}");
    assert_eq!(fb["prediction_id"], id.as_str(), "{fb}");
    // a bad field is answered on the error topic, naming it
    let mut bad = features.clone();
    bad.insert("torque_nm".into(), serde_json::json!("high"));
    let reply = roundtrip(
        mport,
        "plant/line3/pdm/in",
        "plant/line3/pdm/errors",
        &serde_json::json!({"id": 2, "features": bad}).to_string(),
    );
    assert_eq!(reply["id"], 2);
    assert_eq!(reply["field"], "torque_nm");

    // the broker goes away and comes back: the agent reconnects and serves again
    drop(mosq.take());
    std::thread::sleep(Duration::from_secs(1));
    mosq = Some(broker(d, mport));
    let mut ok = false;
    for _ in 0..10 {
        let sub = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &mport.to_string(),
                "-t",
                "plant/line3/pdm/out",
                "-C",
                "1",
                "-W",
                "3",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &mport.to_string(),
                "-t",
                "plant/line3/pdm/in",
                "-q",
                "1",
                "-m",
                &msg,
            ])
            .status();
        let out = sub.wait_with_output().unwrap();
        if serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|v| v["id"] == "m-1") {
            ok = true;
            break;
        }
    }
    assert!(ok, "no prediction after the broker restarted");
    drop(mosq);
}
