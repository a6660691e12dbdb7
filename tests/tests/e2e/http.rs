//! The agent's HTTP API on a real process: `:predict` (values equal to batch scoring, refused
//! rows named), the Open Inference Protocol v2 (metadata, JSON and binary tensors), body
//! limits, bearer tokens with scopes, SIGTERM.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e_tests::{
    bin, free_port, pdm, run_ok, scratch, wait_until, ChildGuard, PDM_FEATURES as FEATURES,
};
use serde_json::{json, Value};
use sha2::Digest;

use crate::service::{agent_run, assert_config_refused, install_bundle};

const MODEL: &str = "pdm-failure";
const PREDICT: &str = "/v1/models/pdm-failure:predict";
const INFER: &str = "/v2/models/pdm-failure/infer";

/// A key pair, a signed bundle of the example model (release 1, `version`) installed in
/// `dir/state`.
pub(crate) fn install_example(dir: &Path, version: &str) {
    run_ok(dir, "fleetctl", &["keygen", "--out", "root"]);
    let (model, reference) = (pdm().join("model.onnx"), pdm().join("reference.csv"));
    run_ok(
        dir,
        "fleetctl",
        &[
            "bundle",
            "build",
            "--model",
            model.to_str().unwrap(),
            "--name",
            MODEL,
            "--version",
            version,
            "--release",
            "1",
            "--key",
            "root.key",
            "--reference",
            reference.to_str().unwrap(),
            "--out",
            "b1.bundle",
        ],
    );
    install_bundle(dir, "b1.bundle");
}

/// A running `edge-agent run` (killed when dropped) and its port.
pub(crate) struct Agent {
    child: ChildGuard,
    pub(crate) port: u16,
    log: std::path::PathBuf,
}

impl Agent {
    /// Starts the agent on a free port (retrying if another process took it) and waits until
    /// `/v2/health/ready` answers 200.
    pub(crate) fn start(dir: &Path, config: Option<&str>) -> Agent {
        let log = dir.join("agent.log");
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = agent_run(dir, port);
            if let Some(c) = config {
                std::fs::write(dir.join("agent.toml"), c).unwrap();
                cmd.args(["--config", "agent.toml"]);
            }
            let child = cmd
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("start edge-agent run");
            let mut agent = Agent {
                child: ChildGuard(child),
                port,
                log: log.clone(),
            };
            let up = wait_until(Duration::from_secs(30), || {
                matches!(agent.child.0.try_wait(), Ok(Some(_)))
                    || try_request(port, "GET", "/v2/health/ready", &[], b"")
                        .is_ok_and(|r| r.status == 200)
            });
            match agent.child.0.try_wait() {
                Ok(None) if up => return agent,
                Ok(Some(_)) if agent.log().contains("cannot listen") => continue,
                _ => panic!("the agent did not become ready:\n{}", agent.log()),
            }
        }
        panic!("no free port after 5 tries");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        try_request(self.port, method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()))
    }

    /// A JSON request; returns the status and the JSON body.
    fn json(&self, method: &str, path: &str, body: &Value, token: Option<&str>) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        let body = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body).unwrap()
        };
        let r = self.request(method, path, &headers, &body);
        (r.status, r.json())
    }
}

/// An HTTP response.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        if self.body.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`). A `Content-Length` is
/// added unless `headers` sets one or `Transfer-Encoding`.
fn try_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    let framed = headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
    });
    if !framed {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    read_response(&mut s)
}

/// Reads a response until the server closes the connection (a reset after a complete
/// response counts as the end).
fn read_response(s: &mut TcpStream) -> std::io::Result<Resp> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if raw.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end in the response"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..i]).trim(), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[i + 2..i + 2 + n]);
            rest = &rest[i + 2 + n + 2..];
        }
        body = out;
    } else if let Some(n) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(n);
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// The first `n` rows of the example's holdout set, features only.
pub(crate) fn holdout_rows(n: usize) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(pdm().join("holdout.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(&header[..6], FEATURES);
    lines
        .take(n)
        .map(|l| l.split(',').take(6).map(|c| c.parse().unwrap()).collect())
        .collect()
}

/// A holdout row as an instance: feature name -> value.
pub(crate) fn instance(row: &[f64]) -> Value {
    Value::Object(
        FEATURES
            .iter()
            .zip(row)
            .map(|(f, v)| (f.to_string(), json!(v)))
            .collect(),
    )
}

/// What `edge-agent predict` (batch scoring) gives for `rows`.
fn batch_scores(dir: &Path, rows: &[Vec<f64>]) -> Vec<Value> {
    let input = dir.join("rows.jsonl");
    let text: String = rows.iter().map(|r| format!("{}\n", instance(r))).collect();
    std::fs::write(&input, text).unwrap();
    let out = Command::new(bin("edge-agent"))
        .args(["predict", "--model"])
        .arg(pdm().join("model.onnx"))
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Floats compared as the `float`s the model computes.
fn f32s(v: &Value) -> Vec<f32> {
    let mut out = Vec::new();
    match v {
        Value::Array(a) => a.iter().for_each(|x| out.extend(f32s(x))),
        other => out.push(other.as_f64().expect("a number") as f32),
    }
    out
}

#[test]
fn predict_matches_batch_scoring_and_refuses_bad_requests_by_row_and_field() {
    let tmp = scratch();
    let d = tmp.path();
    install_example(d, "1.1.0");
    let agent = Agent::start(
        d,
        Some("device_id = \"line3-box1\"\n[http]\nmax_body_bytes = 65536\n"),
    );
    let rows = holdout_rows(5);
    let instances: Vec<Value> = rows.iter().map(|r| instance(r)).collect();
    let (status, resp) = agent.json("POST", PREDICT, &json!({ "instances": instances }), None);
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["model"], MODEL);
    assert_eq!(resp["version"], "1.1.0");
    assert_eq!(resp["release"], 1);
    let preds = resp["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 5);
    // the same values as batch scoring, and as onnxruntime (the example's expected.json)
    let batch = batch_scores(d, &rows);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(pdm().join("expected.json")).unwrap())
            .unwrap();
    let first = expected["holdout"]["first_rows"].as_array().unwrap();
    for (i, p) in preds.iter().enumerate() {
        assert_eq!(p["label"], batch[i]["label"], "row {i}");
        assert_eq!(
            f32s(&p["probabilities"]),
            f32s(&batch[i]["probabilities"]),
            "row {i}"
        );
        assert_eq!(p["label"], first[i]["label"], "row {i}");
        for (g, w) in f32s(&p["probabilities"])
            .iter()
            .zip(f32s(&first[i]["probabilities"]))
        {
            assert!((g - w).abs() <= 1e-6, "row {i}: {g} vs onnxruntime {w}");
        }
    }
    let ids: Vec<&str> = resp["prediction_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 5);
    assert!(
        ids.iter().all(|id| id.starts_with("line3-box1-1-")),
        "{ids:?}"
    );
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5, "{ids:?}");
    // positional instances feed the model's one input in order
    let positional: Vec<Value> = rows.iter().map(|r| json!(r)).collect();
    let (status, resp2) = agent.json("POST", PREDICT, &json!({ "instances": positional }), None);
    assert_eq!(status, 200, "{resp2}");
    assert_eq!(resp2["predictions"], resp["predictions"]);
    assert_ne!(resp2["prediction_ids"][0], resp["prediction_ids"][0]);

    // refused rows: 400 naming the row and the field
    let refuse = |change: &dyn Fn(&mut Value), field: &str, message: &str| {
        let mut inst = instances.clone();
        change(&mut inst[2]);
        let (status, body) = agent.json("POST", PREDICT, &json!({ "instances": inst }), None);
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["row"], 2, "{body}");
        assert_eq!(body["error"]["field"], field, "{body}");
        let m = body["error"]["message"].as_str().unwrap();
        assert!(m.contains(message), "{message:?} in {m:?}");
    };
    refuse(
        &|r| r["torque_nm"] = json!("warm"),
        "torque_nm",
        "\"warm\" is a string; expected a number",
    );
    refuse(&|r| r["torque_nm"] = Value::Null, "torque_nm", "null");
    refuse(&|r| r["torque_nm"] = json!(""), "torque_nm", "empty string");
    refuse(
        &|r| r["torque_nm"] = json!("NaN"),
        "torque_nm",
        "not a finite number",
    );
    refuse(
        &|r| r["torque_nm"] = json!(1e300),
        "torque_nm",
        "out of the float range",
    );
    refuse(
        &|r| r["bogus"] = json!(1.0),
        "bogus",
        "not an input or feature",
    );
    refuse(
        &|r| {
            r.as_object_mut().unwrap().remove("tool_wear_min");
        },
        "tool_wear_min",
        "missing",
    );
    let (status, body) = agent.json("POST", PREDICT, &json!({ "instances": [1, 2] }), None);
    assert_eq!(status, 400);
    assert_eq!(body["error"]["row"], 0, "{body}");

    // whole-request problems
    for (req, message) in [
        (json!({ "instances": [] }), "\"instances\" is empty"),
        (json!({ "rows": [] }), "unknown key \"rows\""),
        (json!([1]), "expected {\"instances\""),
    ] {
        let (status, body) = agent.json("POST", PREDICT, &req, None);
        assert_eq!(status, 400, "{body}");
        let m = body["error"]["message"].as_str().unwrap();
        assert!(m.contains(message), "{message:?} in {m:?}");
    }
    let r = agent.request("POST", PREDICT, &[], b"{\"instances\": [");
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not JSON"));
    let (status, body) = agent.json(
        "POST",
        "/v1/models/no-such-model:predict",
        &json!({ "instances": instances }),
        None,
    );
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["message"], "no model named \"no-such-model\"");
    let (status, body) = agent.json(
        "POST",
        PREDICT,
        &json!({ "instances": vec![json!({}); 10_001] }),
        None,
    );
    assert_eq!(status, 413, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 10000"));

    // bodies over http.max_body_bytes: refused on Content-Length before the body is sent...
    let r = agent.request(
        "POST",
        PREDICT,
        &[("Content-Length", "1000000"), ("Expect", "100-continue")],
        b"",
    );
    assert_eq!(r.status, 413);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("65536-byte limit"));
    // ...and when streamed without a length
    let mut s = TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(
            format!("POST {PREDICT} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
                .as_bytes(),
        );
        let chunk = format!("{:x}\r\n{}\r\n", 16384, " ".repeat(16384));
        for _ in 0..5 {
            if w.write_all(chunk.as_bytes()).is_err() {
                break;
            }
        }
        let _ = w.write_all(b"0\r\n\r\n");
    });
    let r = read_response(&mut s).unwrap();
    let _ = writer.join();
    assert_eq!(r.status, 413);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("65536-byte limit"));

    // metrics count what was served
    let r = agent.request("GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.header("Content-Type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8_lossy(&r.body);
    assert!(text.contains("edge_agent_ready 1"), "{text}");
    // model status, unknown routes
    let (status, body) = agent.json("GET", "/v1/models/pdm-failure", &Value::Null, None);
    assert_eq!(status, 200);
    assert_eq!(body["ready"], true);
    assert_eq!(body["release"], 1);
    let (status, body) = agent.json("GET", "/v3/nothing", &Value::Null, None);
    assert_eq!(status, 404);
    assert_eq!(body["error"], "no route for GET /v3/nothing");
    // the agent still serves after all that
    let (status, _) = agent.json("POST", PREDICT, &json!({ "instances": instances }), None);
    assert_eq!(status, 200);
}

/// Little-endian `f32`s.
fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn open_inference_protocol_metadata_and_infer_match_predict() {
    let tmp = scratch();
    let d = tmp.path();
    install_example(d, "1.1.0");
    let agent = Agent::start(d, None);
    let get = |path: &str| agent.json("GET", path, &Value::Null, None);

    let (status, server) = get("/v2");
    assert_eq!(status, 200);
    assert_eq!(server["name"], "edge-agent");
    assert!(server["version"].is_string() && server["extensions"].is_array());
    let (status, meta) = get("/v2/models/pdm-failure");
    assert_eq!(status, 200, "{meta}");
    assert_eq!(
        meta,
        json!({
            "name": MODEL,
            "versions": ["1.1.0"],
            "platform": "onnx",
            "inputs": [{ "name": "X", "datatype": "FP32", "shape": [-1, 6] }],
            "outputs": [
                { "name": "label", "datatype": "INT64", "shape": [-1] },
                { "name": "probabilities", "datatype": "FP32", "shape": [-1, 2] },
            ],
        })
    );
    assert_eq!(
        get("/v2/models/pdm-failure/versions/1.1.0"),
        (200, meta.clone())
    );
    assert_eq!(get("/v2/models/pdm-failure/versions/1").0, 200);
    let (status, body) = get("/v2/models/pdm-failure/versions/2.0");
    assert_eq!(status, 404);
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("no version \"2.0\""));
    assert_eq!(get("/v2/models/pdm-failure/ready").0, 200);
    assert_eq!(get("/v2/health/live").0, 200);
    let (status, body) = get("/v2/models/nope/ready");
    assert_eq!(status, 404);
    assert_eq!(body["error"], "no model named \"nope\"");

    let rows = holdout_rows(4);
    let instances: Vec<Value> = rows.iter().map(|r| instance(r)).collect();
    let (_, v1) = agent.json("POST", PREDICT, &json!({ "instances": instances }), None);
    let labels: Vec<Value> = v1["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].clone())
        .collect();
    let probs: Vec<f32> = v1["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| f32s(&p["probabilities"]))
        .collect();
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();

    let check = |body: &Value| {
        assert_eq!(body["model_name"], MODEL, "{body}");
        assert_eq!(body["model_version"], "1.1.0");
        let outs = body["outputs"].as_array().unwrap();
        assert_eq!(outs[0]["name"], "label");
        assert_eq!(outs[0]["datatype"], "INT64");
        assert_eq!(outs[0]["shape"], json!([4]));
        assert_eq!(outs[0]["data"], json!(labels));
        assert_eq!(outs[1]["name"], "probabilities");
        assert_eq!(outs[1]["datatype"], "FP32");
        assert_eq!(outs[1]["shape"], json!([4, 2]));
        assert_eq!(f32s(&outs[1]["data"]), probs);
    };
    // flat data
    let (status, body) = agent.json(
        "POST",
        INFER,
        &json!({ "id": "req-7", "inputs": [{ "name": "X", "shape": [4, 6], "datatype": "FP32", "data": flat }] }),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "req-7");
    check(&body);
    // every row has a prediction id, as on :predict, and feedback takes it
    let ids: Vec<&str> = body["parameters"]["prediction_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no prediction ids in {body}"))
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "{body}");
    let v1_ids = v1["prediction_ids"].as_array().unwrap();
    // <device>-<release>-<process start>-<counter>: the same process and release as :predict's
    let prefix = v1_ids[0].as_str().unwrap().rsplit_once('-').unwrap().0;
    for id in &ids {
        assert!(id.starts_with(&format!("{prefix}-")), "{id} vs {prefix}");
        assert!(!v1_ids.iter().any(|v| v == id), "{id} reused");
    }
    let (status, out) = agent.json(
        "POST",
        "/v1/feedback",
        &json!({ "prediction_id": ids[3], "label": labels[3].to_string() }),
        None,
    );
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["status"], "applied", "{out}");
    assert_eq!(out["prediction_id"], ids[3], "{out}");
    // nested data, by version
    let (status, body) = agent.json(
        "POST",
        "/v2/models/pdm-failure/versions/1.1.0/infer",
        &json!({ "inputs": [{ "name": "X", "shape": [4, 6], "datatype": "FP64", "data": rows }] }),
        None,
    );
    assert_eq!(status, 200, "{body}");
    check(&body);
    // one input per feature
    let per_feature: Vec<Value> = FEATURES
        .iter()
        .enumerate()
        .map(|(k, f)| {
            json!({ "name": f, "shape": [4, 1], "datatype": "FP32",
                    "data": rows.iter().map(|r| r[k]).collect::<Vec<_>>() })
        })
        .collect();
    let (status, body) = agent.json("POST", INFER, &json!({ "inputs": per_feature }), None);
    assert_eq!(status, 200, "{body}");
    check(&body);
    // requested outputs only
    let (status, body) = agent.json(
        "POST",
        INFER,
        &json!({ "inputs": [{ "name": "X", "shape": [4, 6], "datatype": "FP32", "data": flat }],
                 "outputs": [{ "name": "probabilities" }] }),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(body["outputs"][0]["name"], "probabilities");

    // the binary tensor data extension, as tritonclient sends it by default
    let header = serde_json::to_vec(&json!({
        "inputs": [{ "name": "X", "shape": [4, 6], "datatype": "FP32",
                     "parameters": { "binary_data_size": 4 * 24 } }],
        "parameters": { "binary_data_output": true },
    }))
    .unwrap();
    let mut body = header.clone();
    body.extend(f32_bytes(
        &flat.iter().map(|v| *v as f32).collect::<Vec<_>>(),
    ));
    let len = header.len().to_string();
    let r = agent.request(
        "POST",
        INFER,
        &[("Inference-Header-Content-Length", len.as_str())],
        &body,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let json_len: usize = r
        .header("Inference-Header-Content-Length")
        .expect("binary response header")
        .parse()
        .unwrap();
    let meta: Value = serde_json::from_slice(&r.body[..json_len]).unwrap();
    let bin = &r.body[json_len..];
    assert_eq!(meta["outputs"][0]["parameters"]["binary_data_size"], 4 * 8);
    assert_eq!(meta["outputs"][1]["parameters"]["binary_data_size"], 8 * 4);
    assert!(meta["outputs"][0].get("data").is_none());
    let got_labels: Vec<Value> = bin[..32]
        .chunks_exact(8)
        .map(|c| json!(i64::from_le_bytes(c.try_into().unwrap())))
        .collect();
    assert_eq!(got_labels, labels);
    let got_probs: Vec<f32> = bin[32..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got_probs, probs);

    // refused: 400 naming the input (and row), 404 for an unknown model
    let x = |shape: Value, datatype: &str, data: Value| json!({ "inputs": [{ "name": "X", "shape": shape, "datatype": datatype, "data": data }] });
    for (req, message) in [
        (
            x(json!([4, 5]), "FP32", json!(flat[..20])),
            "input \"X\": shape [4, 5] does not match the model's [-1, 6]",
        ),
        (
            x(json!([4, 6]), "FP32", json!(flat[..23])),
            "input \"X\": shape [4, 6] holds 24 elements, data has 23",
        ),
        (
            x(json!([4, 6]), "BYTES", json!(vec!["1"; 24])),
            "input \"X\": datatype BYTES does not fit the model's FP32 input",
        ),
        (
            x(json!([1, 6]), "FP32", json!([1, 2, 3, "x", 5, 6])),
            "input \"X\": element 3 (\"x\") is not a FP32 value",
        ),
        (
            json!({ "inputs": [{ "name": "Y", "shape": [1, 6], "datatype": "FP32", "data": [0, 0, 0, 0, 0, 0] }] }),
            "input \"Y\": not an input or feature of the model (inputs: X)",
        ),
        (
            json!({ "inputs": per_feature[..5] }),
            "missing input \"vibration_rms_mm_s\"",
        ),
        (
            json!({ "inputs": [{ "name": "X", "shape": [1, 6], "datatype": "FP32", "data": [0, 0, 0, 0, 0, 0] }],
                    "outputs": [{ "name": "score" }] }),
            "output \"score\": not an output of the model",
        ),
        (json!({ "input": [] }), "not a valid inference request"),
    ] {
        let (status, body) = agent.json("POST", INFER, &req, None);
        assert_eq!(status, 400, "{body}");
        let m = body["error"].as_str().unwrap();
        assert!(m.contains(message), "{message:?} in {m:?}");
    }
    let mut big = x(json!([1, 6]), "FP32", json!([1, 2, 3, 4, 5, 6]));
    big["inputs"][0]["data"] = json!([300.0, 310.0, 1500.0, 40.0, 100.0, 1e39]);
    let (status, body) = agent.json("POST", INFER, &big, None);
    assert_eq!(status, 400, "{body}");
    let m = body["error"].as_str().unwrap();
    assert!(m.starts_with("row 0, input \"X\": "), "{m}");
    let (status, body) = agent.json(
        "POST",
        "/v2/models/nope/infer",
        &x(json!([1, 6]), "FP32", json!([1, 2, 3, 4, 5, 6])),
        None,
    );
    assert_eq!(status, 404);
    assert_eq!(body["error"], "no model named \"nope\"");
}

#[test]
fn bearer_tokens_with_scopes_guard_everything_but_health() {
    let tmp = scratch();
    let d = tmp.path();
    install_example(d, "1.1.0");
    let hash = |t: &str| shared::trust::hex(&sha2::Sha256::digest(t.as_bytes()));
    let config = format!(
        "[[http.tokens]]\nname = \"scada\"\nsha256 = \"{}\"\nscopes = [\"predict\"]\n\n\
         [[http.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nscopes = [\"feedback\", \"admin\"]\n",
        hash("predict-token-1"),
        hash("ops-token-2").to_uppercase()
    );
    let agent = Agent::start(d, Some(&config));
    let body = json!({ "instances": [instance(&holdout_rows(1)[0])] });
    let infer = json!({ "inputs": [{ "name": "X", "shape": [1, 6], "datatype": "FP32",
                                     "data": holdout_rows(1)[0] }] });

    // health stays open
    assert_eq!(
        agent.request("GET", "/v2/health/live", &[], b"").status,
        200
    );
    assert_eq!(
        agent.request("GET", "/v2/health/ready", &[], b"").status,
        200
    );

    // no token, a wrong one, a malformed header: 401 with a challenge
    for auth in [
        None,
        Some("Bearer predict-token-2"),
        Some("Basic cHJlZGljdC10b2tlbi0x"),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let r = agent.request("POST", PREDICT, &headers, body.to_string().as_bytes());
        assert_eq!(r.status, 401, "{auth:?}");
        assert!(
            r.header("WWW-Authenticate").unwrap().starts_with("Bearer"),
            "{auth:?}"
        );
        assert!(r.json()["error"]["message"].is_string());
        let r = agent.request("POST", INFER, &headers, infer.to_string().as_bytes());
        assert_eq!(r.status, 401);
        assert!(r.json()["error"].is_string());
        assert_eq!(agent.request("GET", "/v2", &headers, b"").status, 401);
        assert_eq!(agent.request("GET", "/metrics", &headers, b"").status, 401);
        assert_eq!(
            agent
                .request("GET", "/v2/models/pdm-failure", &headers, b"")
                .status,
            401
        );
    }
    // a valid token without the predict scope: 403 on model routes, fine elsewhere
    let (status, err) = agent.json("POST", PREDICT, &body, Some("ops-token-2"));
    assert_eq!(status, 403);
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("\"predict\" scope"));
    let r = agent.request(
        "POST",
        INFER,
        &[("Authorization", "Bearer ops-token-2")],
        infer.to_string().as_bytes(),
    );
    assert_eq!(r.status, 403);
    assert!(r
        .header("WWW-Authenticate")
        .unwrap()
        .contains("insufficient_scope"));
    assert_eq!(
        agent
            .json("GET", "/v2", &Value::Null, Some("ops-token-2"))
            .0,
        200
    );
    let r = agent.request(
        "GET",
        "/metrics",
        &[("Authorization", "Bearer ops-token-2")],
        b"",
    );
    assert_eq!(r.status, 200);
    // the predict token: everything
    let (status, resp) = agent.json("POST", PREDICT, &body, Some("predict-token-1"));
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["predictions"].as_array().unwrap().len(), 1);
    let (status, resp) = agent.json("POST", INFER, &infer, Some("predict-token-1"));
    assert_eq!(status, 200, "{resp}");
    assert_eq!(
        agent
            .json(
                "GET",
                "/v2/models/pdm-failure",
                &Value::Null,
                Some("predict-token-1")
            )
            .0,
        200
    );
    // an invalid token list keeps the agent from starting
    assert_config_refused(
        d,
        "bad.toml",
        "[[http.tokens]]\nname = \"x\"\nsha256 = \"predict-token-1\"\nscopes = [\"predict\"]\n",
        &["http.tokens[0]: sha256 must be"],
    );
}

#[cfg(unix)]
#[test]
fn sigterm_stops_the_http_agent_with_exit_0() {
    let tmp = scratch();
    let d = tmp.path();
    install_example(d, "1.1.0");
    let mut agent = Agent::start(d, None);
    let body = json!({ "instances": [instance(&holdout_rows(1)[0])] });
    assert_eq!(agent.json("POST", PREDICT, &body, None).0, 200);
    let port = agent.port;
    let status = agent
        .child
        .terminate(Duration::from_secs(20))
        .expect("the agent exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening"
    );
    assert!(agent.log().contains("stopped"), "{}", agent.log());
}
