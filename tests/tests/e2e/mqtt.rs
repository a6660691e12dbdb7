//! Inference over a real Mosquitto broker: named-feature JSON in, predictions out, errors
//! naming the field; the agent keeps serving when the broker goes away and comes back.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use e2e_tests::{free_port, mosquitto_or_skip, pdm, scratch, start_agent, tool_or_skip, Mosquitto};
use serde_json::{json, Value};

use crate::http::{holdout_rows, install_example, instance};

fn tools() -> bool {
    mosquitto_or_skip("mqtt tests") && tool_or_skip("mosquitto_pub", "--help", "mqtt tests")
}

/// `mosquitto_sub` on `topic` of the broker at `port`, for `count` messages, giving up after
/// `wait_secs`; at QoS 1 if `qos1`. Its standard output is piped.
pub(crate) fn subscribe(port: u16, topic: &str, count: u32, wait_secs: u32, qos1: bool) -> Child {
    let (port, count, wait) = (port.to_string(), count.to_string(), wait_secs.to_string());
    let mut args = vec![
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        topic,
        "-C",
        &count,
        "-W",
        &wait,
    ];
    if qos1 {
        args.extend(["-q", "1"]);
    }
    Command::new("mosquitto_sub")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `mosquitto_pub` of `msg` to `topic` of the broker at `port`, at QoS 1.
pub(crate) fn publish(port: u16, topic: &str, msg: &str) -> std::io::Result<ExitStatus> {
    Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            topic,
            "-q",
            "1",
            "-m",
            msg,
        ])
        .status()
}

/// Publishes `msg` to `input` and returns the first message on `output`.
fn roundtrip(port: u16, input: &str, output: &str, msg: &str) -> Value {
    let sub = subscribe(port, output, 1, 20, true);
    std::thread::sleep(Duration::from_millis(300));
    assert!(publish(port, input, msg).unwrap().success());
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
    install_example(d, "1.0.0");

    let mport = free_port();
    let mut mosq = Mosquitto::start_on(d, mport);
    let http_port = free_port();
    std::fs::write(
        d.join("agent.toml"),
        format!(
            "state_dir = \"state\"\ntrust_root = \"root.pub\"\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{mport}\"\nfeedback_topic = \"plant/line3/pdm/feedback\"\n[[mqtt.inference]]\nmodel = \"pdm-failure\"\ninput_topic = \"plant/line3/pdm/in\"\noutput_topic = \"plant/line3/pdm/out\"\nerror_topic = \"plant/line3/pdm/errors\"\n",
        ),
    )
    .unwrap();
    let _agent = start_agent(d, http_port);
    // ready on HTTP; give it a moment to subscribe on the broker too
    std::thread::sleep(Duration::from_millis(1500));
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(pdm().join("expected.json")).unwrap())
            .unwrap();
    let features = instance(&holdout_rows(1)[0]);
    let msg = json!({"id": "m-1", "features": features}).to_string();
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
    let truth = json!({"prediction_id": id, "label": want["label"]}).to_string();
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
    bad["torque_nm"] = json!("high");
    let reply = roundtrip(
        mport,
        "plant/line3/pdm/in",
        "plant/line3/pdm/errors",
        &json!({"id": 2, "features": bad}).to_string(),
    );
    assert_eq!(reply["id"], 2);
    assert_eq!(reply["field"], "torque_nm");

    // the broker goes away and comes back: the agent reconnects and serves again
    mosq.kill();
    std::thread::sleep(Duration::from_secs(1));
    mosq.restart();
    let mut ok = false;
    for _ in 0..10 {
        let sub = subscribe(mport, "plant/line3/pdm/out", 1, 3, false);
        std::thread::sleep(Duration::from_millis(300));
        let _ = publish(mport, "plant/line3/pdm/in", &msg);
        let out = sub.wait_with_output().unwrap();
        if serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|v| v["id"] == "m-1") {
            ok = true;
            break;
        }
    }
    assert!(ok, "no prediction after the broker restarted");
    drop(mosq);
}
