//! `fleetctl`'s remote commands against a real `fleet-server run` process: the health check
//! with the bootstrap admin token read from `<state>/admin-token`, `$FLEET_SERVER` and
//! `$FLEET_TOKEN`, refused tokens (exit 77 with the server's message), an unreachable server
//! (69, naming the URL), `--json` output and errors, usage errors (64) before anything is
//! sent; and `fleetctl audit verify --file` on a real audit log (0) and on edited, truncated
//! and missing copies (65, 66).

use std::process::{Command, Output};

use e2e_tests::{bin, free_port, scratch, start_fleet_server};
use fleet_server::audit::{head_path, AuditLog, NewRecord, Outcome};
use serde_json::Value;

/// `fleetctl ARGS` with no `FLEET_*` variables inherited.
fn fleetctl(args: &[&str]) -> Command {
    let mut c = Command::new(bin("fleetctl"));
    c.args(args)
        .env_remove("FLEET_SERVER")
        .env_remove("FLEET_TOKEN");
    c
}

fn run(c: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().expect("run fleetctl");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

#[test]
fn fleetctl_talks_to_a_real_server_with_the_bootstrap_token() {
    let tmp = scratch();
    let d = tmp.path();
    let port = free_port();
    let _fleet = start_fleet_server(d, port, free_port(), "");
    let url = format!("http://127.0.0.1:{port}");
    let token_file = d.join("fleet-state/admin-token");
    let token_path = token_file.to_str().unwrap();

    // health, token from the file the server wrote: the token is checked and accepted
    let (code, out, err) = run(&mut fleetctl(&[
        "--server",
        &url,
        "--token-file",
        token_path,
        "health",
    ]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("{url}: ok; token accepted"));

    // --json prints the server's JSON (plus where and whether the token was accepted)
    let (code, out, err) = run(&mut fleetctl(&[
        "--json",
        "--server",
        &url,
        "--token-file",
        token_path,
        "health",
    ]));
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["token_accepted"], true);
    assert_eq!(v["server"], url.as_str());

    // the same through $FLEET_SERVER and $FLEET_TOKEN
    let token = std::fs::read_to_string(&token_file).unwrap();
    let (code, out, err) = run(fleetctl(&["health"])
        .env("FLEET_SERVER", &url)
        .env("FLEET_TOKEN", token.trim()));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("token accepted"), "{out}");

    // an unknown token: 77, with the server's message
    let (code, _, err) = run(&mut fleetctl(&[
        "--server",
        &url,
        "--token",
        "not-the-token",
        "health",
    ]));
    assert_eq!(code, 77, "{err}");
    assert!(
        err.contains("HTTP 401") && err.contains(&format!("{url}/metrics")),
        "{err}"
    );
    // and on an API endpoint, with --json: the error object names the status
    let (code, out, err) = run(&mut fleetctl(&[
        "--json",
        "--server",
        &url,
        "--token",
        "not-the-token",
        "devices",
        "list",
    ]));
    assert_eq!(code, 77, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["status"], 401);
    assert_eq!(v["error"]["kind"], "unauthorized");
    assert!(v["error"]["server"]["error"].is_string(), "{out}");

    // no token at all: 77, saying how to give one
    let (code, _, err) = run(&mut fleetctl(&["--server", &url, "audit", "list"]));
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("--token-file"), "{err}");

    // health alone needs no token
    let (code, out, err) = run(&mut fleetctl(&["--server", &url, "health"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("{url}: ok"));

    // a bad flag is refused before anything is sent, naming the flag
    let (code, _, err) = run(&mut fleetctl(&[
        "--server",
        &url,
        "--token-file",
        token_path,
        "rollout",
        "create",
        "--bundle",
        "pdm@1.2.0",
        "--target",
        "site=plant-a",
        "--waves",
        "50%,10%",
        "--success-threshold",
        "95%",
        "--failure-threshold",
        "5%",
    ]));
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--waves") && err.contains("\"10%\""), "{err}");
}

#[test]
fn unreachable_servers_and_usage_errors() {
    // a port nobody listens on
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, out, err) = run(&mut fleetctl(&["--server", &url, "devices", "list"]));
    assert_eq!(code, 69, "{err}");
    assert!(err.contains(&url), "{err}");
    assert!(out.is_empty());
    let (code, out, _) = run(&mut fleetctl(&[
        "--json", "--server", &url, "bundle", "list",
    ]));
    assert_eq!(code, 69);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["kind"], "unavailable");
    // $FLEET_SERVER is used
    let (code, _, err) = run(fleetctl(&["rollout", "list"]).env("FLEET_SERVER", &url));
    assert_eq!(code, 69);
    assert!(err.contains(&url), "{err}");

    for args in [
        &["--server", "https://fleet.example", "devices", "list"][..],
        &["--server", "fleet.example:8080", "devices", "list"],
        &["--token", "a", "--token-file", "b", "devices", "list"],
        &["devices", "list", "--online", "--offline"],
        &["devices", "frobnicate"],
        &["rollout", "status"],
        &["bundle", "show", "no-version"],
        &["rollback", "--model", "pdm"],
    ] {
        let (code, _, err) = run(&mut fleetctl(args));
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(!err.is_empty(), "{args:?}");
    }
    // the exit codes are in --help
    let (code, out, _) = run(&mut fleetctl(&["--help"]));
    assert_eq!(code, 0);
    for c in ["64", "69", "77", "66"] {
        assert!(out.contains(&format!("\n  {c}  ")), "{c} in {out}");
    }
}

#[test]
fn audit_verify_file_accepts_a_real_log_and_detects_edits_and_deletions() {
    let tmp = scratch();
    let d = tmp.path();
    let log = d.join("audit.jsonl");
    {
        let (w, _) = AuditLog::open(&log).unwrap();
        w.append(
            &NewRecord::new("ci", "operator", "bundle.push", "pdm@1.2.0", Outcome::Ok)
                .with_bundle_sha256("ab".repeat(32)),
        )
        .unwrap();
        w.append(&NewRecord::new(
            "alice",
            "admin",
            "bundle.approve",
            "pdm@1.2.0",
            Outcome::Ok,
        ))
        .unwrap();
        w.append(&NewRecord::new(
            "ci",
            "operator",
            "rollout.create",
            "pdm@1.2.0 site=plant-a",
            Outcome::Error("bundle pdm@1.2.0 is awaiting_approval".into()),
        ))
        .unwrap();
    }
    let (code, out, err) = run(&mut fleetctl(&[
        "audit",
        "verify",
        "--file",
        log.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("audit log verified: 3 record(s), head seq 3"),
        "{out}"
    );
    let (code, out, _) = run(&mut fleetctl(&[
        "--json",
        "audit",
        "verify",
        "--file",
        log.to_str().unwrap(),
    ]));
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["ok"].as_bool(), v["records"].as_u64()),
        (Some(true), Some(3))
    );

    let copy = |name: &str, edit: &dyn Fn(String) -> String| {
        let dir = d.join(name);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        std::fs::write(&path, edit(std::fs::read_to_string(&log).unwrap())).unwrap();
        std::fs::copy(head_path(&log), head_path(&path)).unwrap();
        path
    };
    // one byte of the second record changed: alice -> alicf
    let edited = copy("edited", &|t| t.replacen("\"alice\"", "\"alicf\"", 1));
    let (code, _, err) = run(&mut fleetctl(&[
        "audit",
        "verify",
        "--file",
        edited.to_str().unwrap(),
    ]));
    assert_eq!(code, 65, "{err}");
    assert!(
        err.contains("does not verify") && err.contains("line 2") && err.contains("edited"),
        "{err}"
    );
    // the last record deleted
    let truncated = copy("truncated", &|t| {
        t.lines().take(2).map(|l| format!("{l}\n")).collect()
    });
    let (code, out, err) = run(&mut fleetctl(&[
        "--json",
        "audit",
        "verify",
        "--file",
        truncated.to_str().unwrap(),
    ]));
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("truncated"), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["kind"], "audit_broken");
    assert_eq!(v["error"]["verify"]["ok"], false);
    // no such file
    let (code, _, err) = run(&mut fleetctl(&[
        "audit",
        "verify",
        "--file",
        d.join("nope.jsonl").to_str().unwrap(),
    ]));
    assert_eq!(code, 66, "{err}");
    assert!(err.contains("nope.jsonl"), "{err}");
}
