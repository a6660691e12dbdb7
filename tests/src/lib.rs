//! Helpers for the end-to-end tests: the real binaries (built on demand, same profile as
//! the tests), the committed corpus, scratch directories.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Path to a built workspace binary (`edge-agent`, `fleet-server`, `fleetctl`), building the
/// workspace's binaries once if the test run did not already.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    // target/<profile>/deps/e2e-<hash>  ->  target/<profile>/<name>
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir")
        .to_path_buf();
    let path = dir.join(name);
    BUILT.get_or_init(|| {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(root())
            .args(["build", "--bins", "-p", "edge-agent", "-p", "fleet-server"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
    });
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A model folder of the committed conformance corpus.
pub fn corpus(set: &str, id: &str) -> PathBuf {
    root().join("shared/tests/corpus").join(set).join(id)
}

/// The predictive-maintenance example (model, reference and holdout data, MLflow model).
pub fn pdm() -> PathBuf {
    root().join("deploy/examples/pdm")
}

/// Whether an external program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// A fresh scratch directory, removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("edge-e2e-")
        .tempdir()
        .expect("create scratch dir")
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing test leaves no
/// process behind.
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(s)) = self.0.try_wait() {
                return Some(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port free at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

/// Polls `f` every 20 ms until it is true or `timeout` passed.
pub fn wait_until(timeout: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// A minimal HTTP/1.1 request over a fresh connection: returns (status, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = match text.find("\r\n\r\n") {
        Some(i) => {
            let (head, rest) = text.split_at(i + 4);
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                dechunk(rest)
            } else {
                rest.to_string()
            }
        }
        None => String::new(),
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some(i) = s.find("\r\n") {
        let n = usize::from_str_radix(s[..i].trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        let start = i + 2;
        out.push_str(s.get(start..start + n).unwrap_or(""));
        s = s.get(start + n + 2..).unwrap_or("");
    }
    out
}

/// The six feature columns of the predictive-maintenance example.
pub const PDM_FEATURES: [&str; 6] = [
    "air_temperature_k",
    "process_temperature_k",
    "rotational_speed_rpm",
    "torque_nm",
    "tool_wear_min",
    "vibration_rms_mm_s",
];

/// Runs a workspace binary in `dir`, asserting success; returns its standard output.
pub fn run_ok(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(bin(program))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run a workspace binary");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds a bundle of `model` named `name` at `release` (version `<release>.0`), signed by
/// `dir/root.key`, with the example's reference data, into `dir/out`.
pub fn build_bundle(dir: &Path, model: &Path, name: &str, release: &str, out: &str) {
    let reference = pdm().join("reference.csv");
    let (model, reference) = (model.display().to_string(), reference.display().to_string());
    let version = format!("{release}.0");
    run_ok(
        dir,
        "fleetctl",
        &[
            "bundle",
            "build",
            "--model",
            &model,
            "--name",
            name,
            "--version",
            &version,
            "--release",
            release,
            "--key",
            "root.key",
            "--reference",
            &reference,
            "--out",
            out,
        ],
    );
}

/// Whether `program` runs (`program PROBE`); when it does not, prints `SKIPPED <what>:
/// <program> not installed` and returns false, unless `E2E_REQUIRE_TOOLS` is set (then it
/// fails: `.ci/run` installs the tools and sets it).
pub fn tool_or_skip(program: &str, probe: &str, what: &str) -> bool {
    if Command::new(program).arg(probe).output().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("E2E_REQUIRE_TOOLS").is_none(),
        "{program} is required (E2E_REQUIRE_TOOLS is set)"
    );
    eprintln!("SKIPPED {what}: {program} not installed");
    false
}

/// [`tool_or_skip`] for Mosquitto.
pub fn mosquitto_or_skip(what: &str) -> bool {
    tool_or_skip("mosquitto", "-h", what)
}

/// A real Mosquitto broker on a fixed loopback port with a generated config file; it can be
/// killed with SIGKILL and restarted on the same port. Killed when dropped.
pub struct Mosquitto {
    pub port: u16,
    conf: PathBuf,
    child: Option<ChildGuard>,
}

impl Mosquitto {
    /// A plain (anonymous, no persistence) listener on a free port.
    pub fn start(dir: &Path) -> Mosquitto {
        Mosquitto::start_on(dir, free_port())
    }

    /// A plain listener on `port`.
    pub fn start_on(dir: &Path, port: u16) -> Mosquitto {
        Mosquitto::with_config(
            dir,
            port,
            &format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
    }

    /// A broker with the given full config; `port` is the one waited for (the first
    /// listener).
    pub fn with_config(dir: &Path, port: u16, config: &str) -> Mosquitto {
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(&conf, config).expect("write mosquitto config");
        let mut m = Mosquitto {
            port,
            conf,
            child: None,
        };
        m.restart();
        m
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGKILL (no clean shutdown), then reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.0.kill();
            let _ = c.0.wait();
        }
    }

    /// Starts it (again) on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let mut child = ChildGuard(
                Command::new("mosquitto")
                    .arg("-c")
                    .arg(&self.conf)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("start mosquitto"),
            );
            let port = self.port;
            let up = wait_until(std::time::Duration::from_secs(5), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                    || matches!(child.0.try_wait(), Ok(Some(_)))
            });
            if up && matches!(child.0.try_wait(), Ok(None)) {
                self.child = Some(child);
                return;
            }
            // the port may still be held for a moment after a kill: retry
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not start on port {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

/// In `d`: a root key (`root.key`/`root.pub`), the example model signed as `pdm-failure`
/// release 1 (`b1.bundle`) and installed into `d/state`, as an agent run with
/// `state_dir = "state"` and `trust_root = "root.pub"` expects.
pub fn install_example_agent(d: &Path) {
    run_ok(d, "fleetctl", &["keygen", "--out", "root"]);
    build_bundle(
        d,
        &pdm().join("model.onnx"),
        "pdm-failure",
        "1",
        "b1.bundle",
    );
    run_ok(
        d,
        "edge-agent",
        &[
            "bundle",
            "install",
            "b1.bundle",
            "--state-dir",
            "state",
            "--trust-root",
            "root.pub",
        ],
    );
}

/// `promtool check metrics` on a `/metrics` text, asserting it passes. Without promtool it
/// prints `SKIPPED promtool check metrics (<what>)` and returns, unless `E2E_REQUIRE_TOOLS`
/// is set (then it fails).
pub fn promtool_check_metrics(what: &str, text: &str) {
    use std::io::Write;
    if !tool_or_skip(
        "promtool",
        "--version",
        &format!("promtool check metrics ({what})"),
    ) {
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start promtool");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check metrics ({what}): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `edge-agent run --config agent.toml` in `dir`, waited for until `/v2/health/ready` on
/// `port` answers 200 (30 s).
pub fn start_agent(dir: &Path, port: u16) -> ChildGuard {
    let child = ChildGuard(
        Command::new(bin("edge-agent"))
            .current_dir(dir)
            .args(["run", "--config", "agent.toml"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start edge-agent"),
    );
    assert!(
        wait_until(std::time::Duration::from_secs(30), || {
            http(port, "GET", "/v2/health/ready", &[], b"").is_ok_and(|r| r.0 == 200)
        }),
        "the agent did not become ready"
    );
    child
}

/// `n` single-row predictions of the example model (`pdm-failure`) on the agent at `port`,
/// each asserted to answer 200.
pub fn predict_example(port: u16, n: usize) {
    let body = serde_json::json!({"instances": [{
        "air_temperature_k": 300.1, "process_temperature_k": 310.2,
        "rotational_speed_rpm": 1500.0, "torque_nm": 40.0, "tool_wear_min": 100.0,
        "vibration_rms_mm_s": 2.5
    }]})
    .to_string();
    for _ in 0..n {
        let (code, text) = http(
            port,
            "POST",
            "/v1/models/pdm-failure:predict",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .expect("predict request");
        assert_eq!(code, 200, "{text}");
    }
}

/// `fleet-server run --config fleet.toml` in `dir` (the caller writes the config), stderr to
/// `<dir>/fleet.log`; not waited for (see [`wait_fleet_healthy`]).
pub fn spawn_fleet_server(dir: &Path) -> ChildGuard {
    ChildGuard(
        Command::new(bin("fleet-server"))
            .current_dir(dir)
            .args(["run", "--config", "fleet.toml"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("fleet.log")).expect("create fleet.log"))
            .spawn()
            .expect("start fleet-server"),
    )
}

/// Waits (30 s) until the fleet server `child` answers 200 on `/v1/health` at `http_port`;
/// fails with its log (`<dir>/fleet.log`) when it exits or never does.
pub fn wait_fleet_healthy(child: &mut ChildGuard, dir: &Path, http_port: u16) {
    let ok = wait_until(std::time::Duration::from_secs(30), || {
        matches!(child.0.try_wait(), Ok(Some(_)))
            || http(http_port, "GET", "/v1/health", &[], b"").is_ok_and(|r| r.0 == 200)
    });
    assert!(
        ok && matches!(child.0.try_wait(), Ok(None)),
        "fleet-server did not become healthy: {}",
        std::fs::read_to_string(dir.join("fleet.log")).unwrap_or_default()
    );
}

/// Writes `<dir>/fleet.toml` (state in `fleet-state`, the admin API on `http_port`, the
/// embedded broker on `broker_port`, then `extra` config), starts `fleet-server run` and
/// waits until it is healthy.
pub fn start_fleet_server(dir: &Path, http_port: u16, broker_port: u16, extra: &str) -> ChildGuard {
    std::fs::write(
        dir.join("fleet.toml"),
        format!(
            "state_dir = \"fleet-state\"\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\
             [broker]\nlisten = \"127.0.0.1:{broker_port}\"\n{extra}"
        ),
    )
    .expect("write fleet.toml");
    let mut child = spawn_fleet_server(dir);
    wait_fleet_healthy(&mut child, dir, http_port);
    child
}
