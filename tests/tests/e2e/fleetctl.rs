//! `fleetctl`: keys, keyring rotation, bundle build with signoff gates, verify, inspect, and
//! bundles tampered with by tools other than ours (GNU tar, zstd, byte edits).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use e2e_tests::{bin, have, pdm, scratch};
use serde_json::Value;
use sha2::Digest;

fn ctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("fleetctl"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run fleetctl")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = ctl(dir, args);
    assert!(
        out.status.success(),
        "fleetctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(dir: &Path, args: &[&str], code: i32, expect: &str) -> String {
    let out = ctl(dir, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "fleetctl {args:?}: {err}");
    assert!(err.contains(expect), "expected {expect:?} in {err:?}");
    err
}

fn ex(name: &str) -> String {
    pdm().join(name).display().to_string()
}

/// Builds the example bundle signed by `key` into `out`.
fn build(dir: &Path, key: &str, name: &str, release: &str, out: &str, extra: &[&str]) -> Output {
    let (model, reference, holdout) = (ex("model.onnx"), ex("reference.csv"), ex("holdout.csv"));
    let mut args = vec![
        "bundle",
        "build",
        "--model",
        &model,
        "--name",
        name,
        "--version",
        "1.0.0",
        "--release",
        release,
        "--key",
        key,
        "--reference",
        &reference,
        "--holdout",
        &holdout,
        "--label-column",
        "failure",
        "--group-column",
        "line",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    ctl(dir, &args)
}

#[test]
fn keygen_writes_a_private_secret_and_refuses_to_overwrite() {
    let tmp = scratch();
    let d = tmp.path();
    let out = ok(d, &["--json", "keygen", "--out", "k"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["key_id"].as_str().unwrap().len(), 16);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| std::fs::metadata(d.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("k.key"), 0o600);
        assert_eq!(mode("k.pub"), 0o644);
    }
    let before = std::fs::read(d.join("k.key")).unwrap();
    fails(d, &["keygen", "--out", "k"], 73, "already exists");
    assert_eq!(std::fs::read(d.join("k.key")).unwrap(), before);
    ok(d, &["keygen", "--out", "k", "--force"]);
    assert_ne!(std::fs::read(d.join("k.key")).unwrap(), before);
    // a public key where a secret one is expected, a missing file
    fails(
        d,
        &[
            "keyring",
            "sign",
            "--keyring",
            "nope.json",
            "--root",
            "k.key",
        ],
        66,
        "nope.json",
    );
    ok(d, &["keyring", "create", "--out", "r.json"]);
    fails(
        d,
        &["keyring", "sign", "--keyring", "r.json", "--root", "k.pub"],
        65,
        "expected \"edge-ml-ed25519-secret\"",
    );
}

#[test]
fn keyring_rotation_and_revocation() {
    let tmp = scratch();
    let d = tmp.path();
    for k in ["root", "a", "b"] {
        ok(d, &["keygen", "--out", k]);
    }
    ok(d, &["keyring", "create", "--out", "ring.json"]);
    ok(
        d,
        &[
            "keyring",
            "add",
            "--keyring",
            "ring.json",
            "--pub",
            "a.pub",
            "--model",
            "pdm-*",
        ],
    );
    // unsigned keyrings are refused, by the builder and by verification
    let out = build(
        d,
        "a.key",
        "pdm-failure",
        "1",
        "a1.bundle",
        &["--keyring", "ring.json"],
    );
    assert_eq!(
        out.status.code(),
        Some(65),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(
        d,
        &[
            "keyring",
            "sign",
            "--keyring",
            "ring.json",
            "--root",
            "root.key",
        ],
    );
    let v1 = std::fs::read(d.join("ring.json")).unwrap();
    let out = build(
        d,
        "a.key",
        "pdm-failure",
        "1",
        "a1.bundle",
        &["--keyring", "ring.json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verify = |bundle: &str| {
        ctl(
            d,
            &[
                "bundle",
                "verify",
                "--root",
                "root.pub",
                "--keyring",
                "ring.json",
                bundle,
            ],
        )
    };
    assert!(verify("a1.bundle").status.success());
    // a key not allowed for the model name: refused before anything is built
    let out = build(
        d,
        "a.key",
        "press-7",
        "1",
        "x.bundle",
        &["--keyring", "ring.json"],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not sign model \"press-7\""));
    assert!(!d.join("x.bundle").exists());
    // root-signed bundles: valid without a keyring, refused with one
    assert!(build(d, "root.key", "pdm-failure", "2", "r.bundle", &[])
        .status
        .success());
    ok(d, &["bundle", "verify", "--root", "root.pub", "r.bundle"]);
    fails(
        d,
        &[
            "bundle",
            "verify",
            "--root",
            "root.pub",
            "--keyring",
            "ring.json",
            "r.bundle",
        ],
        65,
        "must be signed by a keyring key",
    );
    // without the keyring, a keyring key is unknown
    fails(
        d,
        &["bundle", "verify", "--root", "root.pub", "a1.bundle"],
        65,
        "unknown key id",
    );

    // rotate: revoke a (version 2, unsigned until signed), add b
    let a_id = serde_json::from_str::<Value>(&ok(
        d,
        &["--json", "keyring", "show", "--keyring", "ring.json"],
    ))
    .unwrap()["keys"][0]["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = ok(
        d,
        &[
            "--json",
            "keyring",
            "revoke",
            "--keyring",
            "ring.json",
            "--key-id",
            &a_id,
        ],
    );
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["version"], 2);
    let out = ok(
        d,
        &[
            "--json",
            "keyring",
            "add",
            "--keyring",
            "ring.json",
            "--pub",
            "b.pub",
            "--model",
            "pdm-failure",
        ],
    );
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["version"],
        2,
        "one edit session, one version"
    );
    let err = verify("a1.bundle");
    assert_eq!(err.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&err.stderr).contains("not signed"));
    ok(
        d,
        &[
            "keyring",
            "sign",
            "--keyring",
            "ring.json",
            "--root",
            "root.key",
        ],
    );
    let err = verify("a1.bundle");
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("revoked"),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
    let out = build(
        d,
        "b.key",
        "pdm-failure",
        "3",
        "b3.bundle",
        &["--keyring", "ring.json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(verify("b3.bundle").status.success());
    // the old keyring version still verifies on its own (devices refuse it once they have
    // seen version 2: `Trust::with_keyring(.., seen)`), and a keyring signed by someone
    // else is refused
    std::fs::write(d.join("old.json"), &v1).unwrap();
    ok(
        d,
        &[
            "keyring",
            "show",
            "--keyring",
            "old.json",
            "--root",
            "root.pub",
        ],
    );
    fails(
        d,
        &[
            "keyring",
            "show",
            "--keyring",
            "ring.json",
            "--root",
            "a.pub",
        ],
        65,
        "not signed by the root key",
    );
    // editing the signed file by hand breaks the signature
    let text = std::fs::read_to_string(d.join("ring.json")).unwrap();
    std::fs::write(
        d.join("ring.json"),
        text.replace("\"revoked\": true", "\"revoked\": false"),
    )
    .unwrap();
    fails(
        d,
        &[
            "keyring",
            "show",
            "--keyring",
            "ring.json",
            "--root",
            "root.pub",
        ],
        65,
        "signature does not match",
    );
}

#[test]
fn build_with_signoff_gates_and_inspect() {
    let tmp = scratch();
    let d = tmp.path();
    ok(d, &["keygen", "--out", "root"]);
    // unmet gates: exit 1, each listed with its measured value, no bundle written
    let out = build(
        d,
        "root.key",
        "pdm-failure",
        "1",
        "gated.bundle",
        &[
            "--require",
            "recall>=0.8",
            "--require",
            "roc_auc>=0.9",
            "--require",
            "abs(statistical_parity_difference)<0.01",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 of 3 requirements not met"), "{err}");
    assert!(err.contains("recall>=0.8: measured 0.5917"), "{err}");
    assert!(
        err.contains("abs(statistical_parity_difference)<0.01: measured 0.0421"),
        "{err}"
    );
    assert!(!err.contains("roc_auc>=0.9:"), "{err}");
    let names: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "only the key pair: {names:?}");
    // --json: the error as JSON on stdout
    let out = ctl(
        d,
        &[
            "--json",
            "bundle",
            "build",
            "--model",
            &ex("model.onnx"),
            "--name",
            "pdm-failure",
            "--version",
            "1",
            "--release",
            "1",
            "--key",
            "root.key",
            "--holdout",
            &ex("holdout.csv"),
            "--label-column",
            "failure",
            "--require",
            "f1>=0.9",
            "--out",
            "gated.bundle",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "signoff");
    assert_eq!(v["error"]["unmet"][0]["requirement"], "f1>=0.9");
    assert!((v["error"]["unmet"][0]["measured"].as_f64().unwrap() - 0.6927).abs() < 1e-3);

    // met gates: a bundle whose manifest carries everything the device needs
    let out = build(
        d,
        "root.key",
        "pdm-failure",
        "1",
        "ok.bundle",
        &["--require", "roc_auc>=0.9", "--golden", "12"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ok(
        d,
        &[
            "bundle",
            "verify",
            "--root",
            "root.pub",
            "--golden",
            "ok.bundle",
        ],
    );
    assert!(out.contains("golden samples: 12 of 12 match"), "{out}");
    let m: Value = serde_json::from_str(&ok(d, &["bundle", "inspect", "ok.bundle"])).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(pdm().join("expected.json")).unwrap())
            .unwrap();
    assert_eq!(m["format"], 1);
    assert_eq!(m["name"], "pdm-failure");
    assert_eq!(m["release"], 1);
    assert_eq!(m["files"][0]["path"], "model.onnx");
    let model_sha = sha(&std::fs::read(pdm().join("model.onnx")).unwrap());
    assert_eq!(m["files"][0]["sha256"], model_sha);
    assert_eq!(m["golden"]["samples"].as_array().unwrap().len(), 12);
    assert_eq!(m["schema"]["inputs"][0]["name"], "X");
    assert_eq!(m["schema"]["features"].as_array().unwrap().len(), 6);
    let signoff = &m["signoff"];
    assert_eq!(signoff["rows"], 1500);
    assert_eq!(signoff["reference_group"], "A");
    assert_eq!(signoff["requirements"][0]["met"], true);
    // metrics as scikit-learn computed them on onnxruntime's outputs
    let close = |a: &Value, b: &Value, what: &str| {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "{what}: {a} vs {b}"
        );
    };
    let want = &expected["holdout"]["metrics"];
    for k in [
        "accuracy",
        "precision",
        "recall",
        "f1",
        "roc_auc",
        "log_loss",
    ] {
        close(&signoff["metrics"][k], &want[k], k);
    }
    let fair = &expected["holdout"]["fairness"];
    for k in [
        "statistical_parity_difference",
        "equal_opportunity_difference",
        "average_odds_difference",
    ] {
        close(&signoff["metrics"][k], &fair[k], k);
    }
    // reference profile: moments and missing rate as numpy computed them
    let profile = m["reference"]["features"].as_array().unwrap();
    assert_eq!(profile.len(), 6);
    let stats = &expected["reference"]["features"];
    for f in profile {
        let name = f["name"].as_str().unwrap();
        close(&f["mean"], &stats[name]["mean"], name);
        close(&f["std"], &stats[name]["std"], name);
        close(&f["missing_rate"], &stats[name]["missing_rate"], name);
        let sum: f64 = f["proportions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_f64().unwrap())
            .sum();
        assert!((sum - 1.0).abs() < 1e-9);
    }
    let feats = m["schema"]["features"].as_array().unwrap();
    let torque = feats.iter().find(|f| f["name"] == "torque_nm").unwrap();
    close(&torque["min"], &stats["torque_nm"]["min"], "min");
    close(&torque["max"], &stats["torque_nm"]["max"], "max");
    // provenance: data hashes of the files given
    let data = m["provenance"]["data"].as_array().unwrap();
    let holdout = data.iter().find(|x| x["role"] == "holdout").unwrap();
    assert_eq!(
        holdout["sha256"],
        sha(&std::fs::read(pdm().join("holdout.csv")).unwrap())
    );
    assert_eq!(holdout["rows"], 1500);
    assert!(m["compatibility"]["operators"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o == "ai.onnx.ml:TreeEnsembleClassifier"));
}

fn sha(bytes: &[u8]) -> String {
    shared::trust::hex(&sha2::Sha256::digest(bytes))
}

#[test]
fn build_from_mlflow_and_bad_inputs() {
    let tmp = scratch();
    let d = tmp.path();
    ok(d, &["keygen", "--out", "root"]);
    let ml = ex("mlflow-model");
    ok(
        d,
        &[
            "bundle",
            "build",
            "--mlflow-model",
            &ml,
            "--name",
            "pdm-failure",
            "--version",
            "2",
            "--release",
            "2",
            "--key",
            "root.key",
            "--reference",
            &ex("reference.csv"),
            "--out",
            "ml.bundle",
        ],
    );
    let v: Value =
        serde_json::from_str(&ok(d, &["--json", "bundle", "inspect", "ml.bundle"])).unwrap();
    assert_eq!(
        v["manifest"]["provenance"]["run_id"],
        "5d1c7e0a9b3f4e6c8a2d71f0c4b9e853"
    );
    assert!(v["manifest"]["provenance"]["source"]
        .as_str()
        .unwrap()
        .starts_with("mlflow:"));
    assert_eq!(v["verified"], false);
    let base = [
        "bundle",
        "build",
        "--name",
        "pdm-failure",
        "--version",
        "2",
        "--release",
        "2",
        "--key",
        "root.key",
        "--out",
        "bad.bundle",
    ];
    let bad = |extra: &[&str], code: i32, expect: &str| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        fails(d, &a, code, expect);
    };
    let model = ex("model.onnx");
    // a bad cell in the holdout names file, line and column
    let rows = std::fs::read_to_string(pdm().join("holdout.csv")).unwrap();
    let mut lines: Vec<&str> = rows.lines().collect();
    let bad_line = lines[3].replacen(|c: char| c.is_ascii_digit(), "x", 1);
    lines[3] = &bad_line;
    std::fs::write(d.join("h.csv"), lines.join("\n")).unwrap();
    bad(
        &[
            "--model",
            &model,
            "--holdout",
            "h.csv",
            "--label-column",
            "failure",
            "--group-column",
            "line",
        ],
        65,
        "h.csv: line 4, column \"air_temperature_k\"",
    );
    // an unknown label value
    let mut lines: Vec<String> = rows.lines().map(String::from).collect();
    lines[5] = lines[5].replace(",0,", ",7,").replace(",1,", ",7,");
    std::fs::write(d.join("h2.csv"), lines.join("\n")).unwrap();
    bad(
        &[
            "--model",
            &model,
            "--holdout",
            "h2.csv",
            "--label-column",
            "failure",
        ],
        65,
        "line 6, column \"failure\": \"7\" is not one of the model's classes (0, 1)",
    );
    bad(
        &[
            "--model",
            &model,
            "--holdout",
            &ex("holdout.csv"),
            "--label-column",
            "nope",
        ],
        65,
        "no column \"nope\"",
    );
    bad(
        &[
            "--model",
            &model,
            "--reference",
            &ex("holdout.csv"),
            "--require",
            "f1>=0.5",
        ],
        64,
        "need --holdout",
    );
    bad(
        &[
            "--model",
            &model,
            "--holdout",
            &ex("holdout.csv"),
            "--label-column",
            "failure",
            "--require",
            "accuracy>>1",
        ],
        64,
        "--require",
    );
    bad(
        &["--model", "missing.onnx", "--golden", "0"],
        66,
        "missing.onnx",
    );
    bad(
        &["--model", &ex("holdout.csv"), "--golden", "0"],
        65,
        "not an ONNX model",
    );
    bad(
        &["--mlflow-model", d.to_str().unwrap(), "--golden", "0"],
        66,
        "MLmodel",
    );
    fails(
        d,
        &[
            "bundle",
            "build",
            "--model",
            &model,
            "--name",
            "bad name",
            "--version",
            "1",
            "--release",
            "1",
            "--key",
            "root.key",
            "--out",
            "x",
        ],
        64,
        "--name",
    );
    bad(&["--model", &model], 64, "golden samples need rows");
    assert!(!d.join("bad.bundle").exists());
}

/// Builds `dir/ok.bundle` signed by `dir/root.key` (root only).
fn valid_bundle(d: &Path) -> PathBuf {
    ok(d, &["keygen", "--out", "root"]);
    let out = build(d, "root.key", "pdm-failure", "1", "ok.bundle", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.join("ok.bundle")
}

#[test]
fn tampered_bundles_are_rejected_by_verify() {
    let tmp = scratch();
    let d = tmp.path();
    let good = std::fs::read(valid_bundle(d)).unwrap();
    let verify = |bytes: &[u8]| {
        std::fs::write(d.join("t.bundle"), bytes).unwrap();
        ctl(d, &["bundle", "verify", "--root", "root.pub", "t.bundle"])
    };
    assert!(verify(&good).status.success());
    // bytes flipped across the whole file (every 97th byte, both ends)
    let mut positions: Vec<usize> = (0..good.len()).step_by(97).collect();
    positions.extend([1, good.len() - 1, good.len() / 2]);
    for i in positions {
        let mut bad = good.clone();
        bad[i] ^= 0x40;
        let out = verify(&bad);
        assert_eq!(out.status.code(), Some(65), "flip at {i} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("bundle rejected"));
    }
    // truncations, appended bytes
    for len in [0, 10, good.len() / 3, good.len() - 1] {
        assert_eq!(
            verify(&good[..len]).status.code(),
            Some(65),
            "truncated to {len}"
        );
    }
    let mut long = good.clone();
    long.extend_from_slice(b"\0\0\0\0");
    let out = verify(&long);
    assert!(String::from_utf8_lossy(&out.stderr).contains("after the signed payload"));
    // another root key
    ok(d, &["keygen", "--out", "other"]);
    fails(
        d,
        &["bundle", "verify", "--root", "other.pub", "ok.bundle"],
        65,
        "unknown key id",
    );
}

/// Bundles made with GNU tar and the zstd program, by someone who did not write the verifier:
/// repacked archives, and payloads holding links, devices and escaping paths, even with a
/// validly signed manifest.
#[test]
fn archives_made_with_gnu_tar_are_rejected() {
    if !have("tar") || !have("zstd") {
        assert!(
            std::env::var_os("E2E_REQUIRE_TOOLS").is_none(),
            "tar and zstd are required (E2E_REQUIRE_TOOLS is set)"
        );
        eprintln!("SKIPPED archives_made_with_gnu_tar_are_rejected: tar or zstd not installed");
        return;
    }
    let tmp = scratch();
    let d = tmp.path();
    let bundle = valid_bundle(d);
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // any zstd + tar reads a bundle
    std::fs::create_dir(d.join("x")).unwrap();
    sh(&format!("zstd -dc {} | tar -x -C x", bundle.display()));
    for f in ["manifest.json", "manifest.sig", "model.onnx"] {
        assert!(d.join("x").join(f).is_file(), "{f}");
    }
    // repacked with GNU tar + zstd, unchanged content: still refused (not our canonical form)
    sh("cd x && tar --format=ustar -cf - manifest.json manifest.sig model.onnx | zstd -q -o ../repacked.bundle");
    fails(
        d,
        &["bundle", "verify", "--root", "root.pub", "repacked.bundle"],
        65,
        "canonical stored frame",
    );

    // payloads made by GNU tar, with a manifest validly signed by the trusted root key
    let root = shared::trust::SecretKey::load(&d.join("root.key")).unwrap();
    let manifest: shared::bundle::Manifest =
        shared::bundle::Manifest::parse(&std::fs::read(d.join("x/manifest.json")).unwrap())
            .unwrap();
    std::fs::create_dir(d.join("outside")).unwrap();
    let cases: Vec<(&str, &str)> = vec![
        ("ln -s /etc/passwd evil && tar --format=ustar -cf p.tar model.onnx evil", "symbolic link entries are not allowed"),
        ("ln -f model.onnx hard && tar --format=ustar -cf p.tar model.onnx hard", "hard link entries are not allowed"),
        ("mkfifo fifo && tar --format=ustar -cf p.tar model.onnx fifo", "FIFO entries are not allowed"),
        ("mkdir -p sub && tar --format=ustar -cf p.tar sub model.onnx", "directory entries are not allowed"),
        ("echo pwned > ../outside/f && tar --format=ustar -P -cf p.tar model.onnx ../outside/f", "\"..\" is not allowed"),
        ("echo pwned > /tmp/edge-e2e-abs && tar --format=ustar -P -cf p.tar model.onnx /tmp/edge-e2e-abs", "absolute path"),
        ("tar --format=posix -cf p.tar model.onnx", "PAX extended header"),
        ("tar --format=ustar -cf p.tar model.onnx && tar --format=ustar -rf p.tar model.onnx", "appears twice"),
        ("cp model.onnx extra.bin && tar --format=ustar -cf p.tar model.onnx extra.bin", "not listed in the manifest"),
        ("tar --format=ustar -cf p.tar manifest.json", "reserved name"),
    ];
    for (i, (script, expect)) in cases.iter().enumerate() {
        let work = d.join(format!("w{i}"));
        std::fs::create_dir(&work).unwrap();
        std::fs::copy(d.join("x/model.onnx"), work.join("model.onnx")).unwrap();
        std::fs::copy(d.join("x/manifest.json"), work.join("manifest.json")).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{script} && zstd -q -f p.tar -o p.zst"))
            .current_dir(&work)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let payload = std::fs::read(work.join("p.zst")).unwrap();
        let mut m = manifest.clone();
        let bytes = shared::bundle::assemble(&mut m, &payload, &root).unwrap();
        let path = work.join("evil.bundle");
        std::fs::write(&path, bytes).unwrap();
        fails(
            d,
            &[
                "bundle",
                "verify",
                "--root",
                "root.pub",
                "--golden",
                path.to_str().unwrap(),
            ],
            65,
            expect,
        );
    }
    // nothing was written beside what the scripts made
    let outside: Vec<_> = std::fs::read_dir(d.join("outside"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, ["f"]);
    let _ = std::fs::remove_file("/tmp/edge-e2e-abs");
}

/// Writes `input.csv` of a corpus model plus extra columns computed per row from its
/// expected output.
fn with_columns(
    model: &str,
    out: &Path,
    header: &str,
    cell: impl Fn(usize, &Value) -> String,
) -> PathBuf {
    let dir = e2e_tests::corpus("dev", model);
    let input = std::fs::read_to_string(dir.join("input.csv")).unwrap();
    let expected: Vec<Value> = std::fs::read_to_string(dir.join("expected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut text = String::new();
    for (i, line) in input.lines().enumerate() {
        if i == 0 {
            text.push_str(&format!("{line},{header}\n"));
        } else {
            text.push_str(&format!("{line},{}\n", cell(i - 1, &expected[i - 1])));
        }
    }
    std::fs::write(out, text).unwrap();
    dir.join("model.onnx")
}

#[test]
fn build_regression_multi_input_and_multiclass_models() {
    let tmp = scratch();
    let d = tmp.path();
    ok(d, &["keygen", "--out", "root"]);
    // regression: target = prediction + 0.5 on every other row -> mae 0.25, mse 0.125
    let model = with_columns("gb_reg", &d.join("reg.csv"), "target", |i, e| {
        let p = e["variable"].as_f64().unwrap();
        format!("{}", if i % 2 == 0 { p + 0.5 } else { p })
    });
    let out = ok(
        d,
        &[
            "--json",
            "bundle",
            "build",
            "--model",
            model.to_str().unwrap(),
            "--name",
            "reg",
            "--version",
            "1",
            "--release",
            "1",
            "--key",
            "root.key",
            "--holdout",
            "reg.csv",
            "--label-column",
            "target",
            "--require",
            "mae<=0.26",
            "--require",
            "r2>0",
            "--out",
            "reg.bundle",
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let m = &v["signoff"]["metrics"];
    assert_eq!(v["signoff"]["task"], "regression");
    assert!((m["mae"].as_f64().unwrap() - 0.25).abs() < 1e-6, "{m}");
    assert!((m["mse"].as_f64().unwrap() - 0.125).abs() < 1e-6, "{m}");
    ok(
        d,
        &[
            "bundle",
            "verify",
            "--root",
            "root.pub",
            "--golden",
            "reg.bundle",
        ],
    );

    // several inputs (string and numeric columns, missing values): labels = the model's own
    let model = with_columns(
        "df_columntransformer_logreg",
        &d.join("multi.csv"),
        "truth",
        |_, e| e["output_label"].to_string(),
    );
    let out = ok(
        d,
        &[
            "--json",
            "bundle",
            "build",
            "--model",
            model.to_str().unwrap(),
            "--name",
            "multi",
            "--version",
            "1",
            "--release",
            "1",
            "--key",
            "root.key",
            "--holdout",
            "multi.csv",
            "--label-column",
            "truth",
            "--require",
            "accuracy>=1",
            "--out",
            "multi.bundle",
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["signoff"]["metrics"]["accuracy"], 1.0);
    ok(
        d,
        &[
            "bundle",
            "verify",
            "--root",
            "root.pub",
            "--golden",
            "multi.bundle",
        ],
    );
    let m: Value = serde_json::from_str(&ok(d, &["bundle", "inspect", "multi.bundle"])).unwrap();
    let names: Vec<&str> = m["schema"]["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["color", "size", "weight", "count"]);

    // three classes with groups: fairness needs a positive class
    let model = with_columns("gb_clf_multi_bench", &d.join("mc.csv"), "y,g", |i, e| {
        format!(
            "{},{}",
            e["output_label"],
            if i % 3 == 0 { "x" } else { "y" }
        )
    });
    let base = [
        "bundle",
        "build",
        "--model",
        model.to_str().unwrap(),
        "--name",
        "mc",
        "--version",
        "1",
        "--release",
        "1",
        "--key",
        "root.key",
        "--holdout",
        "mc.csv",
        "--label-column",
        "y",
        "--group-column",
        "g",
        "--out",
        "mc.bundle",
    ];
    fails(d, &base, 64, "need --positive-label");
    let mut args = base.to_vec();
    args.extend(["--positive-label", "2", "--json"]);
    let v: Value = serde_json::from_str(&ok(d, &args)).unwrap();
    let metrics = &v["signoff"]["metrics"];
    assert_eq!(metrics["accuracy"], 1.0);
    assert!(
        metrics["statistical_parity_difference"].is_number(),
        "{metrics}"
    );
    assert_eq!(v["signoff"]["positive_label"], "2");
}
