//! Operator commands on the state directory: `bundle install`, `status`, `rollback`.

use std::path::Path;

use crate::cli::{StateArgs, EXIT_DATA, EXIT_NO_INPUT, EXIT_USAGE};
use crate::config::Config;
use crate::store::{status_of, Store, StoreConfig, StoreError};

/// Exit code when the state directory is locked by a running agent (EX_TEMPFAIL).
pub const EXIT_BUSY: i32 = 75;
/// Exit code for an I/O failure on the state directory (EX_IOERR).
pub const EXIT_IO: i32 = 74;

fn config(args: &StateArgs) -> Result<Config, i32> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path).map_err(|e| {
            for p in &e.problems {
                eprintln!("edge-agent: config: {p}");
            }
            EXIT_USAGE
        })?,
        None => Config::default(),
    };
    if let Some(d) = &args.state_dir {
        cfg.state_dir = d.clone();
    }
    if let Some(t) = &args.trust_root {
        cfg.trust_root = t.clone();
    }
    Ok(cfg)
}

fn open(cfg: &Config) -> Result<Store, i32> {
    Store::open(&StoreConfig {
        root: cfg.state_dir.clone(),
        trust_root: cfg.trust_root.clone(),
        keyring: cfg.keyring.clone(),
        max_bundle_bytes: cfg.install.max_bundle_bytes,
        latency_runs: cfg.install.latency_runs,
    })
    .map_err(|e| {
        eprintln!("edge-agent: {e}");
        exit_code(&e)
    })
}

fn exit_code(e: &StoreError) -> i32 {
    match e {
        StoreError::Locked(_) => EXIT_BUSY,
        StoreError::Io { .. } | StoreError::Corrupt { .. } => EXIT_IO,
        StoreError::Trust(_) => EXIT_USAGE,
        StoreError::UnknownModel(_) | StoreError::NoPrevious(_) => EXIT_USAGE,
        _ => EXIT_DATA,
    }
}

/// `edge-agent run`: config (exit 64 on any problem), logging, runtime, signals.
pub fn run_service(config_path: Option<&Path>, overrides: &crate::config::Overrides) -> i32 {
    let mut cfg = match config_path {
        Some(p) => match Config::load(p) {
            Ok(c) => c,
            Err(e) => {
                for p in &e.problems {
                    eprintln!("edge-agent: config: {p}");
                }
                return EXIT_USAGE;
            }
        },
        None => Config::default(),
    };
    cfg.apply(overrides);
    if let Err(e) = cfg.validate() {
        for p in &e.problems {
            eprintln!("edge-agent: config: {p}");
        }
        return EXIT_USAGE;
    }
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGE_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // scoring, installs and the inbox share the blocking pool: a few threads per core,
        // not tokio's default of 512 (which grew to ~50 threads under load, costing CPU in
        // scheduling and memory in per-thread allocator arenas; see BENCHMARKS.md)
        .max_blocking_threads(4)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-agent: cannot start the runtime: {e}");
            return EXIT_IO;
        }
    };
    rt.block_on(async move {
        // before anything is served: a SIGTERM from now on drains and exits 0
        let shutdown = shared::shutdown::signal();
        let listener = match tokio::net::TcpListener::bind(&cfg.http.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("edge-agent: cannot listen on {}: {e}", cfg.http.listen);
                return EXIT_USAGE;
            }
        };
        match crate::service::run(cfg, listener, shutdown).await {
            Ok(()) => 0,
            Err(crate::service::ServiceError::Store(e)) => {
                eprintln!("edge-agent: {e}");
                exit_code(&e)
            }
            Err(e) => {
                eprintln!("edge-agent: {e}");
                EXIT_IO
            }
        }
    })
}

/// Sends one request to a running agent over `<state>/agent.sock`; `None` when no agent
/// listens there.
#[cfg(unix)]
fn via_socket(state_dir: &Path, req: &serde_json::Value, what: &str) -> Option<i32> {
    use std::io::{BufRead, BufReader, Write};
    let sock = state_dir.join("agent.sock");
    let mut stream = std::os::unix::net::UnixStream::connect(&sock).ok()?;
    if writeln!(stream, "{req}").is_err() {
        return None;
    }
    let mut line = String::new();
    let _ = BufReader::new(std::io::Read::take(&stream, 64 * 1024)).read_line(&mut line);
    let resp: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
    if resp["ok"] == true {
        println!(
            "{} (by the running agent)",
            resp["message"].as_str().unwrap_or("done")
        );
        Some(0)
    } else {
        eprintln!(
            "edge-agent: {what}: {}",
            resp["error"]
                .as_str()
                .unwrap_or("no answer from the running agent")
        );
        Some(match resp["kind"].as_str() {
            Some("io") => EXIT_IO,
            Some("trust") | Some("usage") => EXIT_USAGE,
            _ => EXIT_DATA,
        })
    }
}

/// The outbox/sync/feedback/health block of a running agent (`None` when none runs).
fn running_telemetry(state_dir: &Path) -> Option<serde_json::Value> {
    #[cfg(unix)]
    {
        use std::io::{BufRead, BufReader, Write};
        let sock = state_dir.join("agent.sock");
        let mut stream = std::os::unix::net::UnixStream::connect(&sock).ok()?;
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        writeln!(stream, "{}", serde_json::json!({"op": "telemetry"})).ok()?;
        let mut line = String::new();
        BufReader::new(std::io::Read::take(&stream, 4 * 1024 * 1024))
            .read_line(&mut line)
            .ok()?;
        let resp: serde_json::Value = serde_json::from_str(&line).ok()?;
        (resp["ok"] == true).then(|| resp["telemetry"].clone())
    }
    #[cfg(not(unix))]
    {
        let _ = state_dir;
        None
    }
}

/// `edge-agent promote MODEL` / `edge-agent drop-candidate MODEL`.
pub fn candidate_op(op: &str, model: &str, args: &StateArgs) -> i32 {
    let cfg = match config(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    #[cfg(unix)]
    if let Some(code) = via_socket(
        &cfg.state_dir,
        &serde_json::json!({"op": op, "model": model}),
        &format!("{op} {model}"),
    ) {
        return code;
    }
    let store = match open(&cfg) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let result = if op == "promote" {
        store.promote(model)
    } else {
        store.drop_candidate(model)
    };
    match result {
        Ok(s) => {
            println!("{model}: release {} active", s.active.release);
            0
        }
        Err(e) => {
            eprintln!("edge-agent: {op} {model}: {e}");
            exit_code(&e)
        }
    }
}

/// `edge-agent bundle install FILE`.
pub fn install(bundle: &Path, mode: crate::store::InstallMode, args: &StateArgs) -> i32 {
    if !bundle.is_file() {
        eprintln!("edge-agent: {}: no such file", bundle.display());
        return EXIT_NO_INPUT;
    }
    let cfg = match config(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    #[cfg(unix)]
    {
        use crate::store::InstallMode;
        let path = std::fs::canonicalize(bundle).unwrap_or_else(|_| bundle.to_path_buf());
        let req = match mode {
            InstallMode::Activate => serde_json::json!({"op": "install", "path": path}),
            InstallMode::Shadow => {
                serde_json::json!({"op": "install", "path": path, "mode": "shadow"})
            }
            InstallMode::Split(p) => {
                serde_json::json!({"op": "install", "path": path, "mode": "split", "percent": p})
            }
        };
        let what = format!("install {}", bundle.display());
        if let Some(code) = via_socket(&cfg.state_dir, &req, &what) {
            return code;
        }
    }
    let store = match open(&cfg) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.install_as(bundle, &bundle.display().to_string(), mode) {
        Ok(r) => {
            println!(
                "installed {} {} (release {}): {} golden samples passed, latency p50 {} us p99 {} us{}",
                r.name,
                r.version,
                r.release,
                r.golden_checked,
                r.latency_p50_us,
                r.latency_p99_us,
                r.replaced
                    .map_or(String::new(), |p| format!(", replaces release {p}"))
            );
            0
        }
        Err(e) => {
            eprintln!("edge-agent: install {}: {e}", bundle.display());
            exit_code(&e)
        }
    }
}

/// `edge-agent status`: works whether or not the service runs (reads `state.json` files).
pub fn status(args: &StateArgs, json: bool) -> i32 {
    let cfg = match config(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let states = match status_of(&cfg.state_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edge-agent: {e}");
            return exit_code(&e);
        }
    };
    let events = recent_events(&cfg.state_dir, 20);
    let telemetry = running_telemetry(&cfg.state_dir);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "models": states,
                "events": events,
                "telemetry": telemetry,
            }))
            .unwrap_or_default()
        );
        return 0;
    }
    match &telemetry {
        Some(t) => {
            for (class, c) in t["outbox"]["classes"].as_object().into_iter().flatten() {
                println!(
                    "outbox {class}: produced {}, acknowledged {}, pending {}, dropped cap {} ttl {} io {}",
                    c["produced"], c["acknowledged"], c["pending"],
                    c["dropped"]["cap"], c["dropped"]["ttl"], c["dropped"]["io"]
                );
            }
            if t["sync"]["configured"] == true {
                println!(
                    "sync: {} {}",
                    if t["sync"]["connected"] == true {
                        "connected to"
                    } else {
                        "not connected; last broker"
                    },
                    t["sync"]["broker"].as_str().unwrap_or("-")
                );
            }
        }
        None => println!(
            "outbox: the agent is not running (its counters are read from the running agent)"
        ),
    }
    if states.is_empty() {
        println!("no models installed in {}", cfg.state_dir.display());
    }
    let print_events = |events: &[serde_json::Value]| {
        if !events.is_empty() {
            println!("recent events:");
        }
        for e in events {
            println!(
                "  {} {} {} {}",
                e["at"].as_str().unwrap_or(""),
                e["model"].as_str().unwrap_or(""),
                e["event"].as_str().unwrap_or(""),
                e["detail"]
            );
        }
    };
    for s in states {
        println!(
            "{}: release {} ({}) {} since {}{}",
            s.name,
            s.active.release,
            s.active.version,
            s.phase,
            s.activated_at,
            s.previous.as_ref().map_or(String::new(), |p| format!(
                ", previous release {}",
                p.release
            ))
        );
        if let Some(c) = &s.candidate {
            println!(
                "  candidate: release {} ({}) as {}",
                c.version.release,
                c.version.version,
                if c.mode == "split" {
                    format!("a {}% split", c.percent)
                } else {
                    "a shadow".to_string()
                }
            );
        }
        if let Some(r) = &s.last_rollback {
            println!(
                "  rolled back {} from release {} to {}: {}",
                r.at, r.from_release, r.to_release, r.reason
            );
        }
    }
    print_events(&events);
    0
}

/// The last `n` install-pipeline events (from the end of `events.jsonl`, at most 64 KiB read).
fn recent_events(state_dir: &Path, n: usize) -> Vec<serde_json::Value> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(state_dir.join("events.jsonl")) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let mut buf = String::new();
    if f.seek(SeekFrom::Start(start)).is_err()
        || f.take(64 * 1024).read_to_string(&mut buf).is_err()
    {
        return Vec::new();
    }
    let mut lines: Vec<serde_json::Value> = buf
        .lines()
        .skip(usize::from(start > 0))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let skip = lines.len().saturating_sub(n);
    lines.drain(..skip);
    lines
}

/// `edge-agent rollback MODEL`.
pub fn rollback(model: &str, reason: &str, args: &StateArgs) -> i32 {
    let cfg = match config(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    #[cfg(unix)]
    if let Some(code) = via_socket(
        &cfg.state_dir,
        &serde_json::json!({"op": "rollback", "model": model, "reason": reason}),
        &format!("rollback {model}"),
    ) {
        return code;
    }
    let store = match open(&cfg) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.rollback(model, reason) {
        Ok(s) => {
            println!(
                "{model}: release {} active again (was {})",
                s.active.release,
                s.previous.as_ref().map_or(0, |p| p.release)
            );
            0
        }
        Err(e) => {
            eprintln!("edge-agent: rollback {model}: {e}");
            exit_code(&e)
        }
    }
}
