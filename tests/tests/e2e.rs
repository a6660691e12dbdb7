//! End-to-end tests: the real `edge-agent` and `fleetctl` binaries on real files.

#[path = "e2e/candidates.rs"]
mod candidates;
#[path = "e2e/deploy.rs"]
mod deploy;
#[path = "e2e/directive_install.rs"]
mod directive_install;
#[path = "e2e/fleet.rs"]
mod fleet;
#[path = "e2e/fleetctl.rs"]
mod fleetctl;
#[path = "e2e/fleetctl_remote.rs"]
mod fleetctl_remote;
#[path = "e2e/health.rs"]
mod health;
#[path = "e2e/http.rs"]
mod http;
#[path = "e2e/install.rs"]
mod install;
#[path = "e2e/mosquitto_acl.rs"]
mod mosquitto_acl;
#[path = "e2e/mqtt.rs"]
mod mqtt;
#[path = "e2e/quickstart.rs"]
mod quickstart;
#[path = "e2e/rollout.rs"]
mod rollout;
#[path = "e2e/service.rs"]
mod service;
#[path = "e2e/sync.rs"]
mod sync;
#[path = "e2e/telemetry.rs"]
mod telemetry;

use std::io::Write;
use std::process::{Command, Stdio};

use e2e_tests::{bin, corpus, scratch};
use serde_json::Value;

fn agent() -> Command {
    Command::new(bin("edge-agent"))
}

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("read output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each output line is JSON"))
        .collect()
}

#[test]
fn predict_csv_file_matches_onnxruntime() {
    let dir = corpus("dev", "rf_clf_100x10_bench");
    let tmp = scratch();
    let out = tmp.path().join("scores.jsonl");
    let status = agent()
        .args(["predict", "--model"])
        .arg(dir.join("model.onnx"))
        .arg("--input")
        .arg(dir.join("input.csv"))
        .arg("--output")
        .arg(&out)
        .args(["--batch", "7"])
        .status()
        .expect("run edge-agent");
    assert!(status.success());
    let got = lines(&out);
    let want = lines(&dir.join("expected.jsonl"));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["output_label"], w["output_label"]);
        let (gp, wp) = (
            g["output_probability"].as_object().unwrap(),
            w["output_probability"].as_object().unwrap(),
        );
        assert_eq!(
            gp.keys().collect::<Vec<_>>(),
            wp.keys().collect::<Vec<_>>(),
            "ZipMap renders label -> probability"
        );
        for (k, v) in wp {
            let (a, b) = (gp[k].as_f64().unwrap(), v.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-5 + 1e-4 * b.abs(), "{k}: {a} vs {b}");
        }
    }
    // nothing else left next to the output
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn predict_jsonl_from_stdin() {
    let model_bytes = shared::engine::testing::scaler_model(2, Some(&["speed", "temp"]));
    let tmp = scratch();
    let model = tmp.path().join("scaler.onnx");
    std::fs::write(&model, model_bytes).unwrap();
    let mut child = agent()
        .args(["predict", "--model"])
        .arg(&model)
        .args(["--input", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"speed\": 1.5, \"temp\": null}\n\n{\"X\": [2, 3]}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "{\"Y\":[3,null]}\n{\"Y\":[4,6]}\n"
    );
}

#[test]
fn bad_cell_names_line_and_column_and_leaves_no_output() {
    let tmp = scratch();
    let model = tmp.path().join("scaler.onnx");
    std::fs::write(&model, shared::engine::testing::scaler_model(2, None)).unwrap();
    let input = tmp.path().join("rows.csv");
    std::fs::write(&input, "speed,temp\n1,2\n3,4\n5,warm\n").unwrap();
    let output = tmp.path().join("out.jsonl");
    let out = agent()
        .args(["predict", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(["--batch", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rows.csv")
            && err.contains("line 4")
            && err.contains("\"temp\"")
            && err.contains("\"warm\" is not a number"),
        "{err}"
    );
    assert!(!output.exists(), "no half-written output");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        2,
        "no temporary file left behind"
    );
}

#[test]
fn wrong_column_count_and_unknown_input_are_named() {
    let tmp = scratch();
    let model = tmp.path().join("scaler.onnx");
    std::fs::write(&model, shared::engine::testing::scaler_model(3, None)).unwrap();
    let input = tmp.path().join("rows.csv");
    std::fs::write(&input, "a,b\n1,2\n").unwrap();
    let out = agent()
        .args(["predict", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 columns") && err.contains("3 features"),
        "{err}"
    );

    let multi = corpus("dev", "df_columntransformer_logreg");
    {
        std::fs::write(&input, "no_such_column\n1\n").unwrap();
        let out = agent()
            .args(["predict", "--model"])
            .arg(multi.join("model.onnx"))
            .arg("--input")
            .arg(&input)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(65));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("line 1, column \"no_such_column\": not an input of the model (inputs: color, size, weight, count)"),
            "{err}"
        );
    }
}

#[test]
fn not_onnx_and_unsupported_operator_are_clear_errors() {
    let tmp = scratch();
    let input = tmp.path().join("rows.csv");
    std::fs::write(&input, "x\n1\n").unwrap();
    let not_onnx = tmp.path().join("model.onnx");
    std::fs::write(&not_onnx, "hello, I am a text file").unwrap();
    let out = agent()
        .args(["predict", "--model"])
        .arg(&not_onnx)
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an ONNX model"));

    let weird = tmp.path().join("weird.onnx");
    std::fs::write(
        &weird,
        shared::engine::testing::single_node_model("TimeTravel", "ai.example", "node_42"),
    )
    .unwrap();
    let out = agent()
        .args(["predict", "--model"])
        .arg(&weird)
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unsupported operator ai.example:TimeTravel") && err.contains("node_42"),
        "{err}"
    );

    let out = agent()
        .args(["predict", "--model", "/nonexistent.onnx", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(66));
}
