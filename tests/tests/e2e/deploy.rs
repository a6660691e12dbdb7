//! The deploy kit in `deploy/`: the fleet-server systemd unit passes `systemd-analyze
//! verify`; the Prometheus config passes `promtool check config` (token files and rules
//! included), the alert rules `promtool check rules` and their unit tests `promtool test
//! rules` (which catch a changed threshold); the Grafana dashboard and the rules use only
//! metric names the programs export; every example config passes `validate-config`.
//! Tools that are not installed skip with `SKIPPED ...` unless `E2E_REQUIRE_TOOLS` is set.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use e2e_tests::{bin, root, scratch, tool_or_skip};
use serde_json::Value;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn deploy(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(deploy(rel)).unwrap_or_else(|e| panic!("deploy/{rel}: {e}"))
}

// ---------------------------------------------------------------------------------------
// systemd

#[test]
fn fleet_server_unit_passes_systemd_analyze_verify() {
    let unit = read("fleet-server.service");
    for must in [
        "ExecStartPre=/usr/bin/fleet-server validate-config /etc/fleet-server/fleet-server.toml",
        "ExecStart=/usr/bin/fleet-server run --config /etc/fleet-server/fleet-server.toml --state-dir /var/lib/fleet-server",
        "DynamicUser=yes",
        "StateDirectory=fleet-server",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=@system-service",
        "Restart=on-failure",
        "RestartPreventExitStatus=64",
        "MemoryMax=",
    ] {
        assert!(unit.contains(must), "deploy/fleet-server.service lacks {must:?}");
    }
    // Type=notify only if the server tells systemd it is ready
    let mut sends_ready = false;
    for file in source_files(&root().join("fleet-server/src")) {
        let src = std::fs::read_to_string(&file).unwrap();
        sends_ready |= src.contains("READY=1") || src.contains("NOTIFY_SOCKET");
    }
    if sends_ready {
        assert!(unit.contains("Type=notify"), "fleet-server sends READY=1");
    } else {
        assert!(
            unit.contains("Type=simple") && !unit.contains("WatchdogSec"),
            "fleet-server does not notify systemd: Type=simple, no watchdog"
        );
    }
    // the example config keeps its state where the unit's StateDirectory is
    assert!(read("fleet-server.toml").contains("state_dir = \"/var/lib/fleet-server\""));

    if !tool_or_skip(
        "systemd-analyze",
        "--version",
        "fleet_server_unit_passes_systemd_analyze_verify",
    ) {
        return;
    }
    // verify against the binary just built (systemd-analyze checks the Exec paths exist)
    let tmp = scratch();
    let path = tmp.path().join("fleet-server.service");
    let unit = unit.replace(
        "/usr/bin/fleet-server",
        bin("fleet-server").to_str().unwrap(),
    );
    std::fs::write(&path, &unit).unwrap();
    let check = |path: &Path| {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let ours = err
            .lines()
            .any(|l| l.contains(path.file_name().unwrap().to_str().unwrap()));
        (out.status.success() && !ours, err)
    };
    let (ok, err) = check(&path);
    assert!(ok, "systemd-analyze verify: {err}");

    // the check does catch a broken unit: a misspelt directive
    let broken = tmp.path().join("fleet-server-broken.service");
    std::fs::write(
        &broken,
        unit.replace("ProtectSystem=strict", "ProtectSytem=strict"),
    )
    .unwrap();
    let (ok, err) = check(&broken);
    assert!(!ok && err.contains("ProtectSytem"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Prometheus

/// deploy/prometheus copied to `dir`, `/etc/prometheus/` paths pointing into it, with the
/// token files the scrape configs name.
fn prometheus_copy(dir: &Path) -> PathBuf {
    let etc = format!("{}/", dir.display());
    let config = read("prometheus/prometheus.yml").replace("/etc/prometheus/", &etc);
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    for f in ["alerts.yml", "alerts_test.yml"] {
        std::fs::copy(deploy("prometheus").join(f), dir.join(f)).unwrap();
    }
    std::fs::create_dir(dir.join("edge-agents")).unwrap();
    let mut targets = 0;
    for e in std::fs::read_dir(deploy("prometheus/edge-agents")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join("edge-agents").join(e.file_name())).unwrap();
        targets += 1;
    }
    assert!(targets > 0, "deploy/prometheus/edge-agents/ has an example");
    for t in ["fleet-server.token", "edge-agent.token"] {
        std::fs::write(dir.join(t), "example-token\n").unwrap();
    }
    dir.join("prometheus.yml")
}

fn promtool(dir: &Path, args: &[&str]) -> Output {
    Command::new("promtool")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

/// The alert names of alerts.yml, in order.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn alert_rules_cover_the_issue_and_each_has_firing_and_quiet_tests() {
    let rules = read("prometheus/alerts.yml");
    let names = alert_names(&rules);
    for must in [
        "EdgeConceptDrift",
        "EdgeDataDrift",
        "EdgeDeviceDown",
        "EdgeOutboxNearCap",
        "EdgeRollbackSpike",
        "FleetDevicesOffline",
        "FleetRolloutHalted",
    ] {
        assert!(names.iter().any(|n| n == must), "{must} not in {names:?}");
    }
    // per alert name: (a case expecting it to fire, a case expecting silence)
    let tests = read("prometheus/alerts_test.yml");
    let mut seen: std::collections::BTreeMap<String, (bool, bool)> = Default::default();
    let mut current: Option<String> = None;
    for line in tests.lines().map(str::trim) {
        if let Some(n) = line.strip_prefix("alertname:") {
            current = Some(n.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            let name = current.take().expect("exp_alerts after an alertname");
            let e = seen.entry(name).or_default();
            if rest.trim() == "[]" {
                e.1 = true;
            } else {
                e.0 = true;
            }
        }
    }
    for n in &names {
        assert_eq!(
            seen.get(n),
            Some(&(true, true)),
            "{n}: alerts_test.yml needs a firing and a not-firing case"
        );
    }
    for n in seen.keys() {
        assert!(names.contains(n), "alerts_test.yml tests unknown alert {n}");
    }
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    if !tool_or_skip(
        "promtool",
        "--version",
        "prometheus_config_and_alert_rules_pass_promtool",
    ) {
        return;
    }
    let tmp = scratch();
    let config = prometheus_copy(tmp.path());
    let n = alert_names(&read("prometheus/alerts.yml")).len();

    let out = promtool(tmp.path(), &["check", "config", config.to_str().unwrap()]);
    let got = text(&out);
    assert!(out.status.success(), "promtool check config: {got}");
    assert!(
        got.contains("SUCCESS: 1 rule files found") && got.contains(&format!("{n} rules found")),
        "the config loads alerts.yml: {got}"
    );

    let out = promtool(tmp.path(), &["check", "rules", "alerts.yml"]);
    assert!(
        out.status.success() && text(&out).contains(&format!("SUCCESS: {n} rules found")),
        "promtool check rules: {}",
        text(&out)
    );

    let out = promtool(tmp.path(), &["test", "rules", "alerts_test.yml"]);
    assert!(
        out.status.success() && text(&out).contains("SUCCESS"),
        "promtool test rules: {}",
        text(&out)
    );

    // the config check sees a missing token file
    std::fs::remove_file(tmp.path().join("fleet-server.token")).unwrap();
    let out = promtool(tmp.path(), &["check", "config", config.to_str().unwrap()]);
    assert!(
        !out.status.success() && text(&out).contains("fleet-server.token"),
        "{}",
        text(&out)
    );

    // the unit tests catch a changed threshold
    let rules = read("prometheus/alerts.yml");
    let loose = "edge_agent_outbox_stored_bytes / edge_agent_outbox_max_bytes > 0.8";
    assert!(rules.contains(loose));
    std::fs::write(
        tmp.path().join("alerts.yml"),
        rules.replace(loose, &loose.replace("0.8", "0.9")),
    )
    .unwrap();
    let out = promtool(tmp.path(), &["test", "rules", "alerts_test.yml"]);
    let got = text(&out);
    assert!(
        !out.status.success() && got.contains("EdgeOutboxNearCap"),
        "a 90% threshold must fail the outbox test: {got}"
    );
}

// ---------------------------------------------------------------------------------------
// Metric names

/// The `.rs` files under `dir`.
fn source_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

/// The contents of the string literals of Rust source (escapes kept as written).
fn string_literals(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = src.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                // a comment: skip to the end of the line
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            // a char literal such as '"' or '\"' is not a string (a lifetime has no
            // closing quote)
            '\'' => {
                let mut look = chars.clone();
                match (look.next(), look.next()) {
                    (Some('\\'), _) => {
                        chars.next();
                        chars.next();
                        for c in chars.by_ref() {
                            if c == '\'' {
                                break;
                            }
                        }
                    }
                    (Some(_), Some('\'')) => {
                        chars.next();
                        chars.next();
                    }
                    _ => {}
                }
            }
            '"' => {
                let mut s = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            s.push(c);
                            if let Some(n) = chars.next() {
                                s.push(n);
                            }
                        }
                        '"' => break,
                        _ => s.push(c),
                    }
                }
                out.push(s);
            }
            _ => {}
        }
    }
    out
}

const PREFIXES: [&str; 2] = ["edge_agent_", "fleet_"];

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric names the programs export: names written out in the string literals of
/// their metric sources, and `prefix_{name}_suffix` templates expanded with every
/// identifier-like string literal of the same file.
fn exported_metric_names() -> BTreeSet<String> {
    let r = root();
    let sources = [
        "agent/src/metrics.rs",
        "fleet-server/src/server/http.rs",
        "fleet-server/src/server/sink.rs",
        "fleet-server/src/rollout.rs",
        "fleet-server/src/alerts.rs",
    ];
    let mut names = BTreeSet::new();
    for rel in sources {
        let src = std::fs::read_to_string(r.join(rel)).unwrap();
        let literals = string_literals(&src);
        let words: Vec<&str> = literals
            .iter()
            .map(String::as_str)
            .filter(|w| {
                !w.is_empty()
                    && w.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
            .collect();
        for lit in &literals {
            let chars: Vec<char> = lit.chars().collect();
            let mut i = 0;
            while i < chars.len() {
                if !is_name_char(chars[i]) || (i > 0 && is_name_char(chars[i - 1])) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < chars.len() && is_name_char(chars[i]) {
                    i += 1;
                }
                let ident: String = chars[start..i].iter().collect();
                if !PREFIXES.iter().any(|p| ident.starts_with(p)) {
                    continue;
                }
                let template = ident.ends_with('_')
                    && chars.get(i) == Some(&'{')
                    && chars.get(i + 1) != Some(&'{');
                if template {
                    let Some(close) = chars[i..].iter().position(|&c| c == '}') else {
                        continue;
                    };
                    let mut j = i + close + 1;
                    let from = j;
                    while j < chars.len() && is_name_char(chars[j]) {
                        j += 1;
                    }
                    let suffix: String = chars[from..j].iter().collect();
                    for w in &words {
                        names.insert(format!("{ident}{w}{suffix}"));
                    }
                    i = j;
                } else {
                    names.insert(ident);
                }
            }
        }
    }
    names
}

/// Names in `expr` that look like the programs' metrics (`edge_agent_*`, `fleet_*`) but
/// are not exported (histograms: `_bucket`, `_sum`, `_count` of an exported name).
fn unknown_names(expr: &str, known: &BTreeSet<String>) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !is_name_char(chars[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_name_char(chars[i]) {
            i += 1;
        }
        let ident: String = chars[start..i].iter().collect();
        // $variables and ${variables} of Grafana
        let variable = start > 0 && matches!(chars[start - 1], '$' | '{');
        if variable || !PREFIXES.iter().any(|p| ident.starts_with(p)) {
            continue;
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| ident.strip_suffix(s))
            .unwrap_or(&ident);
        if !known.contains(&ident) && !known.contains(base) {
            out.push(ident);
        }
    }
    out
}

#[test]
fn the_scan_finds_the_exported_names_and_flags_others() {
    let known = exported_metric_names();
    for name in [
        "edge_agent_requests_total",
        "edge_agent_row_latency_seconds",
        "edge_agent_prediction_score",
        "edge_agent_outbox_max_bytes",
        "edge_agent_sync_reconnects_total",
        "edge_agent_drift_score",
        "edge_agent_drift_alert",
        "edge_agent_drift_window_rows",
        "fleet_ingest_records_stored_total",
        "fleet_broker_connected",
        "fleet_devices",
        "fleet_model_versions",
        "fleet_registry_refused_total",
        "fleet_delivery_chunks_total",
        "fleet_rollouts",
        "fleet_alerts_failed_total",
        "fleet_alerts_queue",
    ] {
        assert!(
            known.contains(name),
            "{name} not found in the metric sources"
        );
    }
    // a function name is not a metric
    assert!(!known.contains("fleet_rollback"));
    assert_eq!(
        unknown_names(
            "sum(rate(edge_agent_no_such_total{device=~\"$device\"}[$__rate_interval])) \
             / fleet_devices + edge_agent_prediction_score_bucket",
            &known
        ),
        ["edge_agent_no_such_total"]
    );
}

/// Every PromQL expression of a Grafana dashboard: panel (and row) targets, variables.
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.clone(), e.to_string()));
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        if let (Some(q), Some("query")) = (q, v["type"].as_str()) {
            out.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    out
}

#[test]
fn grafana_dashboard_uses_only_exported_metrics() {
    let known = exported_metric_names();
    let dash: Value = serde_json::from_str(&read("grafana/edge-fleet.json"))
        .expect("deploy/grafana/edge-fleet.json is JSON");
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(vars.contains(&"datasource"), "{vars:?}");
    assert!(
        dash["templating"]["list"][0]["type"] == "datasource"
            && dash["templating"]["list"][0]["query"] == "prometheus"
    );

    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 20, "{} expressions", exprs.len());
    let mut problems = Vec::new();
    for (title, e) in &exprs {
        for n in unknown_names(e, &known) {
            problems.push(format!("{title}: {n} in {e}"));
        }
        if !PREFIXES.iter().any(|p| e.contains(p)) && !e.contains("up{") {
            problems.push(format!("{title}: no metric of the programs in {e}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // the panels the issue asks for
    let all: String = exprs.iter().map(|(_, e)| e.as_str()).collect();
    for must in [
        "edge_agent_requests_total",
        "edge_agent_row_latency_seconds_bucket",
        "edge_agent_model_info",
        "edge_agent_feature_value_bucket",
        "edge_agent_concept_drift",
        "edge_agent_drift_score",
        "edge_agent_outbox_pending_records",
        "edge_agent_outbox_dropped_total",
        "fleet_devices",
        "fleet_model_versions",
        "fleet_rollouts",
        "fleet_delivery_chunks_total",
    ] {
        assert!(all.contains(must), "no panel shows {must}");
    }

    // every query panel reads the datasource variable; ids are unique
    let mut ids = BTreeSet::new();
    let mut stack: Vec<&Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "{p}");
        if p["targets"].as_array().is_some_and(|t| !t.is_empty()) {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            for t in p["targets"].as_array().unwrap() {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            }
        }
        stack.extend(p["panels"].as_array().into_iter().flatten());
    }
}

#[test]
fn alert_rules_and_their_tests_use_only_exported_metrics() {
    let known = exported_metric_names();
    for f in ["prometheus/alerts.yml", "prometheus/alerts_test.yml"] {
        let bad = unknown_names(&read(f), &known);
        assert!(bad.is_empty(), "deploy/{f}: not exported: {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Example configs

/// Runs `program validate-config` on `example` as installed: its `/etc/<program>/` paths
/// point into `etc`, which holds a real root public key (`root.pub`, made by `fleetctl
/// keygen`: the agent reads its `trust_root`).
fn validate_example(program: &str, example: &Path, etc: &Path) -> Output {
    let text = std::fs::read_to_string(example).unwrap();
    let installed = etc.join(example.file_name().unwrap());
    let text = text.replace(&format!("/etc/{program}/"), &format!("{}/", etc.display()));
    std::fs::write(&installed, text).unwrap();
    Command::new(bin(program))
        .arg("validate-config")
        .arg(&installed)
        .output()
        .unwrap()
}

#[test]
fn every_example_config_passes_validate_config() {
    let tmp = scratch();
    let etc = tmp.path();
    let out = Command::new(bin("fleetctl"))
        .args(["keygen", "--out"])
        .arg(etc.join("root"))
        .output()
        .unwrap();
    assert!(out.status.success(), "fleetctl keygen: {}", text(&out));
    assert!(etc.join("root.pub").is_file());

    let mut stack = vec![root().join("deploy")];
    let mut checked = (0, 0);
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "toml") {
                continue;
            }
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let program = if name.starts_with("fleet-server") {
                checked.0 += 1;
                "fleet-server"
            } else if name.starts_with("edge-agent") {
                checked.1 += 1;
                "edge-agent"
            } else {
                panic!(
                    "{}: name example configs fleet-server*.toml or edge-agent*.toml so \
                     this test checks them",
                    p.display()
                )
            };
            let out = validate_example(program, &p, etc);
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains(": OK"),
                "{program} validate-config {}: {}",
                p.display(),
                text(&out)
            );
        }
    }
    assert!(
        checked.0 >= 1 && checked.1 >= 1,
        "fleet-server and edge-agent examples: {checked:?}"
    );

    // the check sees a bad value in an example
    let bad = etc.join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(
        bad.join("edge-agent.toml"),
        std::fs::read_to_string(deploy("edge-agent.toml"))
            .unwrap()
            .replace("threshold = 0.2", "threshold = -1"),
    )
    .unwrap();
    let out = validate_example("edge-agent", &bad.join("edge-agent.toml"), etc);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("threshold"), "{}", text(&out));
}
