//! `edge-agent run` as a process: systemd notifications, inbox and admin-socket installs,
//! SIGTERM, the hardened unit file.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use e2e_tests::{
    bin, build_bundle, free_port, pdm, run_ok, scratch, tool_or_skip, wait_until, ChildGuard,
};
use serde_json::Value;

/// `edge-agent run` in `dir` on the state directory `state` trusting `root.pub`, serving HTTP
/// on `127.0.0.1:<port>`; not started.
pub(crate) fn agent_run(dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.current_dir(dir).args([
        "run",
        "--state-dir",
        "state",
        "--trust-root",
        "root.pub",
        "--http-listen",
        &format!("127.0.0.1:{port}"),
    ]);
    cmd
}

/// `edge-agent bundle install <bundle>` into `dir/state` trusting `root.pub`, asserting
/// success; returns its standard output.
pub(crate) fn install_bundle(dir: &Path, bundle: &str) -> String {
    run_ok(
        dir,
        "edge-agent",
        &[
            "bundle",
            "install",
            bundle,
            "--state-dir",
            "state",
            "--trust-root",
            "root.pub",
        ],
    )
}

/// `edge-agent validate-config <file>` in `dir`.
fn validate_config(dir: &Path, file: &str) -> Output {
    Command::new(bin("edge-agent"))
        .current_dir(dir)
        .args(["validate-config", file])
        .output()
        .unwrap()
}

/// Writes `text` to `dir/file` and asserts `validate-config` refuses it (exit 64) naming each
/// of `want` on stderr.
pub(crate) fn assert_config_refused(dir: &Path, file: &str, text: &str, want: &[&str]) {
    std::fs::write(dir.join(file), text).unwrap();
    let out = validate_config(dir, file);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in want {
        assert!(err.contains(want), "{want} in {err}");
    }
}

fn fleetctl(dir: &Path, args: &[&str]) {
    run_ok(dir, "fleetctl", args);
}

fn build(dir: &Path, release: &str, out: &str) {
    build_bundle(dir, &pdm().join("model.onnx"), "pdm-failure", release, out);
}

fn status(dir: &Path) -> Value {
    let out = Command::new(bin("edge-agent"))
        .current_dir(dir)
        .args(["status", "--json", "--state-dir", "state"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

#[cfg(unix)]
#[test]
fn service_notifies_systemd_installs_from_inbox_and_socket_and_stops_on_sigterm() {
    use std::os::unix::net::UnixDatagram;
    let tmp = scratch();
    let d = tmp.path();
    fleetctl(d, &["keygen", "--out", "root"]);
    build(d, "1", "b1.bundle");
    build(d, "2", "b2.bundle");
    let notify = UnixDatagram::bind(d.join("notify.sock")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = free_port();
    let mut child = ChildGuard(
        agent_run(d, port)
            .env("NOTIFY_SOCKET", d.join("notify.sock"))
            .env("WATCHDOG_USEC", "400000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 256];
    let mut seen = Vec::new();
    while !seen.iter().any(|m: &String| m == "READY=1") {
        let n = notify.recv(&mut buf).expect("READY=1 from the agent");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // watchdog pings follow (WATCHDOG_USEC / 2)
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"WATCHDOG=1");

    // the inbox: a file counts once renamed to *.bundle
    std::fs::copy(d.join("b1.bundle"), d.join("state/inbox/b1.part")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        status(d)["models"].as_array().unwrap().is_empty(),
        "a .part file was installed"
    );
    std::fs::rename(
        d.join("state/inbox/b1.part"),
        d.join("state/inbox/b1.bundle"),
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || status(d)["models"][0]["active"]
            ["release"]
            == 1),
        "inbox bundle not installed"
    );
    assert!(wait_until(Duration::from_secs(5), || d
        .join("state/inbox/done/b1.bundle")
        .is_file()));
    // a bad file in the inbox is moved aside with its reason
    std::fs::write(d.join("state/inbox/junk.bundle"), b"not a bundle").unwrap();
    assert!(wait_until(Duration::from_secs(10), || d
        .join("state/inbox/rejected/junk.bundle.reason")
        .is_file()));
    let reason =
        std::fs::read_to_string(d.join("state/inbox/rejected/junk.bundle.reason")).unwrap();
    assert!(
        reason.contains("does not start with a zstd frame"),
        "{reason}"
    );

    // `bundle install` hands the file to the running agent over its socket
    let out = install_bundle(d, "b2.bundle");
    assert!(out.contains("by the running agent"), "{out}");
    assert_eq!(status(d)["models"][0]["active"]["release"], 2);

    // SIGTERM: STOPPING=1, exit 0, socket removed (drain the queued watchdog pings first:
    // the agent never blocks on a full notification queue, it drops the message)
    notify
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    while notify.recv(&mut buf).is_ok() {}
    let status = child
        .terminate(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    let mut stopping = false;
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while let Ok(n) = notify.recv(&mut buf) {
        stopping |= &buf[..n] == b"STOPPING=1";
    }
    assert!(stopping);
    assert!(!d.join("state/agent.sock").exists());
}

#[test]
fn config_validation_and_second_instance() {
    let tmp = scratch();
    let d = tmp.path();
    assert_config_refused(
        d,
        "bad.toml",
        "device_id = \"a b\"\n[http]\nlisten = \"nowhere\"\n[health]\nmax_nan_rate = 2.0\n",
        &["device_id", "trust_root", "http.listen", "max_nan_rate"],
    );
    assert_config_refused(
        d,
        "typo.toml",
        "stat_dir = \"/x\"\n",
        &["unknown field `stat_dir`"],
    );
    let out = Command::new(bin("edge-agent"))
        .current_dir(d)
        .args(["run", "--config", "bad.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    // the default config is valid once its trust root exists
    let def = Command::new(bin("edge-agent"))
        .args(["print-default-config"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&def.stdout).replace("/etc/edge-agent/root.pub", "root.pub");
    std::fs::write(d.join("ok.toml"), text).unwrap();
    fleetctl(d, &["keygen", "--out", "root"]);
    let out = validate_config(d, "ok.toml");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // one process per state directory
    let port = free_port();
    let _first = ChildGuard(agent_run(d, port).stderr(Stdio::null()).spawn().unwrap());
    assert!(wait_until(Duration::from_secs(20), || d
        .join("state/agent.sock")
        .exists()));
    let out = agent_run(d, free_port()).output().unwrap();
    assert_eq!(out.status.code(), Some(75));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another edge-agent process"));
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    if !tool_or_skip(
        "systemd-analyze",
        "--version",
        "systemd_unit_passes_systemd_analyze_verify",
    ) {
        return;
    }
    let tmp = scratch();
    let unit =
        std::fs::read_to_string(e2e_tests::root().join("deploy/edge-agent.service")).unwrap();
    for must in [
        "Type=notify",
        "ProtectSystem=strict",
        "StateDirectory=edge-agent",
        "NoNewPrivileges=yes",
        "ExecStartPre=/usr/bin/edge-agent validate-config",
        "WatchdogSec=",
    ] {
        assert!(unit.contains(must), "{must}");
    }
    // verify against the binary just built (systemd-analyze checks ExecStart exists)
    let unit = unit.replace("/usr/bin/edge-agent", bin("edge-agent").to_str().unwrap());
    let path = tmp.path().join("edge-agent.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("edge-agent.service"))
        .collect();
    assert!(
        out.status.success() && problems.is_empty(),
        "systemd-analyze verify: {err}"
    );
}
