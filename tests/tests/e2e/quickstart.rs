//! The README's first command (`cargo run --locked --bin quickstart`): the whole local
//! stack comes up from nothing (dev keys, signed example bundles, fleet-server with its
//! embedded broker, three agents), the canary-first rollout completes with predictions
//! flowing, and Ctrl-C (SIGINT) stops every process it started, cleanly.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e_tests::{bin, free_port, scratch, ChildGuard};

/// Processes whose working directory is inside `dir`.
fn processes_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) {
            if cwd.starts_with(dir) {
                let cmd = std::fs::read_to_string(e.path().join("cmdline")).unwrap_or_default();
                found.push(format!("{name}: {}", cmd.replace('\0', " ")));
            }
        }
    }
    found
}

/// Kills (SIGKILL) every process whose working directory is inside the directory, when
/// dropped: the quickstart's children run in their own process group and outlive a
/// quickstart killed by a failing test's `ChildGuard`.
struct Leftovers(std::path::PathBuf);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for p in processes_under(&self.0) {
            if let Some(pid) = p.split(':').next() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
    }
}

#[test]
fn quickstart_brings_up_the_stack_completes_the_rollout_and_ctrl_c_stops_everything() {
    // the binaries it starts are built by the helper (the quickstart's own build is a no-op)
    let _ = bin("edge-agent");
    let tmp = scratch();
    let dir = tmp.path().join("qs");
    // dropped after the quickstart's guard (declared before it): whatever a failure left
    let _leftovers = Leftovers(dir.clone());
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_quickstart"))
            .args(["--dir", &dir.display().to_string()])
            .args(["--http-port", &free_port().to_string()])
            .args(["--broker-port", &free_port().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.0.stdout.take().unwrap();
    let err = child.0.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("stderr: {l}"));
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |what: &str, limit: Duration| {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => {
                    let hit = l.contains(what);
                    seen.push(l);
                    if hit {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!(
            "no {what:?} in the quickstart's output:\n{}",
            seen.join("\n")
        );
    };
    wait_for("Ctrl-C stops everything", Duration::from_secs(240));
    wait_for(
        "completed: every agent committed release 2.0",
        Duration::from_secs(240),
    );
    // predictions flow and reach release 2 on the agents (the live summary counts them)
    wait_for("rollout completed wave 2/2", Duration::from_secs(30));
    let running = processes_under(&dir);
    assert_eq!(running.len(), 4, "fleet-server and 3 agents: {running:#?}");

    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    wait_for("everything stopped cleanly", Duration::from_secs(90));
    let status = child.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status}");
    let left = processes_under(&dir);
    assert!(left.is_empty(), "processes left behind: {left:#?}");
    let text = seen.join("\n");
    for name in ["press-1", "press-2", "press-3", "fleet-server"] {
        assert!(
            text.contains(&format!("{name:<14} exited: exit status: 0")),
            "{name} did not exit 0:\n{text}"
        );
    }
    // what it printed to look at
    for want in [
        "admin API",
        "fleet metrics",
        "/metrics",
        "rollout status r-1",
        "logs",
    ] {
        assert!(text.contains(want), "{want:?} not printed:\n{text}");
    }
    assert!(dir.join("fleet/state/admin-token").is_file());
}
