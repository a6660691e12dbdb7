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

/// `edge-agent bundle install FILE`.
pub fn install(bundle: &Path, args: &StateArgs) -> i32 {
    if !bundle.is_file() {
        eprintln!("edge-agent: {}: no such file", bundle.display());
        return EXIT_NO_INPUT;
    }
    let cfg = match config(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let store = match open(&cfg) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.install(bundle, &bundle.display().to_string()) {
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
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "models": states }))
                .unwrap_or_default()
        );
        return 0;
    }
    if states.is_empty() {
        println!("no models installed in {}", cfg.state_dir.display());
    }
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
        if let Some(r) = &s.last_rollback {
            println!(
                "  rolled back {} from release {} to {}: {}",
                r.at, r.from_release, r.to_release, r.reason
            );
        }
    }
    0
}

/// `edge-agent rollback MODEL`.
pub fn rollback(model: &str, reason: &str, args: &StateArgs) -> i32 {
    let cfg = match config(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
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
