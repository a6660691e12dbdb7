//! The README's first command: the whole local stack on embedded defaults, on one machine.
//!
//! `cargo run --locked --bin quickstart` builds `edge-agent`, `fleet-server` and `fleetctl`
//! (same profile as itself), then, in a fresh work directory (`target/quickstart`):
//! makes a dev key hierarchy (a root key and a root-signed keyring with one signing key);
//! builds and signs the predictive-maintenance example as bundles `pdm-failure` 1.0 and 2.0
//! (signoff metrics computed on the holdout set); starts `fleet-server run` with its embedded
//! MQTT broker; starts three `edge-agent run` processes with release 1 installed; sends them
//! predictions; pushes release 2 and starts a canary-first rollout (`--waves 1,100%`); and
//! prints where to look and a live summary. Ctrl-C (SIGINT or SIGTERM) stops the traffic,
//! then the agents, then the fleet server, each with SIGTERM (they drain and flush), and
//! reports how each exited.
//!
//! `--until-done` exits by itself (0) once the rollout completed and every agent answered
//! predictions with release 2 and the fleet received telemetry from every agent; 1 if the
//! rollout ended otherwise, a process died, or `--timeout` passed. The e2e test uses it.
//!
//! The child processes run in their own process group, so that Ctrl-C reaches only this
//! program, which then stops them in order.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use e2e_tests::{http, PDM_FEATURES};
use serde_json::{json, Value};

const MODEL: &str = "pdm-failure";
const MARKER: &str = ".quickstart";
/// The pids of the processes started, one per line (see [`stop_leftovers`]).
const PIDS: &str = "pids";
const AGENTS: [&str; 3] = ["press-1", "press-2", "press-3"];

struct Args {
    dir: PathBuf,
    until_done: bool,
    timeout: Option<Duration>,
    http_port: Option<u16>,
    broker_port: Option<u16>,
}

fn usage() -> &'static str {
    "usage: quickstart [--dir DIR] [--http-port PORT] [--broker-port PORT] [--until-done] [--timeout SECS]\n\
     \n\
     Brings up fleet-server (embedded broker), three edge-agents, a dev keyring, the example\n\
     bundle and a canary-first rollout in DIR (default: target/quickstart, recreated on every\n\
     run). Ctrl-C stops everything. --until-done exits once the rollout completed and\n\
     predictions flow (exit 0), or failed (exit 1)."
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        dir: workspace().join("target/quickstart"),
        until_done: false,
        timeout: None,
        http_port: None,
        broker_port: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value\n\n{}", usage()))
        };
        match arg.as_str() {
            "--dir" => a.dir = PathBuf::from(value("--dir")?),
            "--until-done" => a.until_done = true,
            "--timeout" => {
                let v = value("--timeout")?;
                let secs: u64 = v
                    .parse()
                    .map_err(|_| format!("--timeout {v:?}: not a number of seconds"))?;
                a.timeout = Some(Duration::from_secs(secs));
            }
            "--http-port" => {
                let v = value("--http-port")?;
                a.http_port = Some(
                    v.parse()
                        .map_err(|_| format!("--http-port {v:?}: not a port"))?,
                );
            }
            "--broker-port" => {
                let v = value("--broker-port")?;
                a.broker_port = Some(
                    v.parse()
                        .map_err(|_| format!("--broker-port {v:?}: not a port"))?,
                );
            }
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{}", usage())),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("quickstart: {e}");
            return ExitCode::from(64);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    if let Err(e) = watch_signals(stop.clone()) {
        eprintln!("quickstart: cannot install the signal handler: {e:#}");
        return ExitCode::from(70);
    }
    let mut stack = Stack::default();
    let outcome = run(&args, &stop, &mut stack);
    let interrupted = stop.load(Ordering::SeqCst);
    let clean = stack.shutdown();
    match outcome {
        Ok(()) if clean => ExitCode::SUCCESS,
        Ok(()) => ExitCode::from(1),
        // Ctrl-C while the stack was still coming up: a stop that was asked for
        Err(e) if interrupted && clean => {
            println!("interrupted ({e})");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\nquickstart: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Sets `stop` on SIGINT or SIGTERM (handlers installed before anything starts).
fn watch_signals(stop: Arc<AtomicBool>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let signal = {
        let _guard = rt.enter();
        shared::shutdown::signal()
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(signal);
            stop.store(true, Ordering::SeqCst);
        })?;
    Ok(())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The running processes, stopped in order by [`Stack::shutdown`].
#[derive(Default)]
struct Stack {
    traffic_stop: Arc<AtomicBool>,
    traffic: Vec<std::thread::JoinHandle<()>>,
    agents: Vec<Proc>,
    fleet: Option<Proc>,
}

struct Proc {
    name: String,
    log: PathBuf,
    child: Child,
}

impl Proc {
    /// Starts `program` in its own process group, output to `log`; its pid is appended to
    /// `pids`.
    fn spawn(
        name: &str,
        cwd: &Path,
        program: &Path,
        args: &[&str],
        log: PathBuf,
        pids: &Path,
    ) -> Result<Proc> {
        use std::os::unix::process::CommandExt;
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .current_dir(cwd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(pids)
            .with_context(|| format!("open {}", pids.display()))?;
        writeln!(f, "{}", child.id()).with_context(|| format!("write {}", pids.display()))?;
        Ok(Proc {
            name: name.to_string(),
            log,
            child,
        })
    }

    /// `Some(description)` when the process has exited.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits up to `limit` for the exit; kills it after that. True when it exited 0.
    fn wait(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    println!("  {:<14} exited: {s}", self.name);
                    return s.success();
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    println!(
                        "  {:<14} did not stop within {}s: killed",
                        self.name,
                        limit.as_secs()
                    );
                    return false;
                }
            }
        }
    }
}

impl Stack {
    /// Traffic first, then the agents (they flush their outbox), then the fleet server.
    /// True when every process exited cleanly.
    fn shutdown(&mut self) -> bool {
        if self.agents.is_empty() && self.fleet.is_none() {
            return true;
        }
        println!("\nstopping: traffic, then the agents, then the fleet server (SIGTERM each)");
        self.traffic_stop.store(true, Ordering::SeqCst);
        for t in self.traffic.drain(..) {
            let _ = t.join();
        }
        let mut clean = true;
        for a in &self.agents {
            a.sigterm();
        }
        for a in &mut self.agents {
            clean &= a.wait(Duration::from_secs(30));
        }
        self.agents.clear();
        if let Some(mut f) = self.fleet.take() {
            f.sigterm();
            clean &= f.wait(Duration::from_secs(30));
        }
        if clean {
            println!("everything stopped cleanly");
        }
        clean
    }
}

/// Programs of this workspace, next to this executable.
struct Bins {
    dir: PathBuf,
}

impl Bins {
    /// Builds the three programs with the profile this executable was built with.
    fn build() -> Result<Bins> {
        let exe = std::env::current_exe().context("path of this executable")?;
        let dir = exe
            .parent()
            .map(Path::to_path_buf)
            .context("directory of this executable")?;
        let release = dir.file_name().is_some_and(|n| n == "release");
        step("building edge-agent, fleet-server and fleetctl (the first build takes minutes)");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(workspace()).args([
            "build",
            "--locked",
            "--bins",
            "-p",
            "edge-agent",
            "-p",
            "fleet-server",
        ]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().context("run cargo build")?;
        if !status.success() {
            bail!("cargo build failed ({status})");
        }
        Ok(Bins { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs a program to completion in `cwd`; its output when it succeeded.
    fn run(&self, cwd: &Path, name: &str, args: &[&str]) -> Result<String> {
        let out = Command::new(self.path(name))
            .current_dir(cwd)
            .args(args)
            .output()
            .with_context(|| format!("run {name}"))?;
        if !out.status.success() {
            bail!(
                "{name} {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn step(what: &str) {
    println!("==> {what}");
    let _ = std::io::stdout().flush();
}

/// `preferred` when it can be bound on loopback now, else any free port.
fn port(preferred: u16, what: &str) -> Result<u16> {
    if TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return Ok(preferred);
    }
    let p = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("find a free port")?
        .port();
    println!("    {what}: port {preferred} is in use, using {p}");
    Ok(p)
}

/// Stops the processes a previous run left behind when it was killed hard (`kill -9`
/// gives it no chance to stop them): the pids in `<dir>/pids` whose working directory is
/// still inside `dir`.
fn stop_leftovers(dir: &Path) {
    let Ok(text) = std::fs::read_to_string(dir.join(PIDS)) else {
        return;
    };
    for pid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"));
        if cwd.is_ok_and(|c| c.starts_with(dir)) {
            println!("    stopping pid {pid} left by an earlier quickstart");
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Removes and recreates `dir` (only if it is empty or a previous quickstart's).
fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let ours = dir.join(MARKER).is_file();
        let empty = std::fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !ours && !empty {
            bail!(
                "{} exists and was not made by quickstart (no {MARKER} file): choose another --dir",
                dir.display()
            );
        }
        if ours {
            stop_leftovers(dir);
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    for sub in ["keys", "bundles", "logs", "fleet"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("create {}", dir.join(sub).display()))?;
    }
    std::fs::write(dir.join(MARKER), "made by `cargo run --bin quickstart`\n")?;
    Ok(())
}

fn run(args: &Args, stop: &AtomicBool, stack: &mut Stack) -> Result<()> {
    let started = Instant::now();
    let bins = Bins::build()?;
    let dir = if args.dir.is_absolute() {
        args.dir.clone()
    } else {
        std::env::current_dir()?.join(&args.dir)
    };
    fresh_dir(&dir)?;
    let s = |p: &Path| p.display().to_string();
    let keys = dir.join("keys");
    let example = workspace().join("deploy/examples/pdm");

    step("dev keys: a root key (the trust root) and a root-signed keyring with one signing key");
    bins.run(&keys, "fleetctl", &["keygen", "--out", "root"])?;
    bins.run(&keys, "fleetctl", &["keygen", "--out", "dev-signer"])?;
    bins.run(
        &keys,
        "fleetctl",
        &["keyring", "create", "--out", "keyring.json"],
    )?;
    bins.run(
        &keys,
        "fleetctl",
        &[
            "keyring",
            "add",
            "--keyring",
            "keyring.json",
            "--pub",
            "dev-signer.pub",
            "--model",
            "pdm-*",
        ],
    )?;
    bins.run(
        &keys,
        "fleetctl",
        &[
            "keyring",
            "sign",
            "--keyring",
            "keyring.json",
            "--root",
            "root.key",
        ],
    )?;
    println!(
        "    {}/{{root.key,root.pub,dev-signer.key,keyring.json}}",
        s(&keys)
    );

    step("example bundles: pdm-failure 1.0 and 2.0 from deploy/examples/pdm, signoff roc_auc>=0.9");
    for release in ["1", "2"] {
        let out = dir.join(format!("bundles/{MODEL}-{release}.0.bundle"));
        bins.run(
            &dir,
            "fleetctl",
            &[
                "bundle",
                "build",
                "--model",
                &s(&example.join("model.onnx")),
                "--name",
                MODEL,
                "--version",
                &format!("{release}.0"),
                "--release",
                release,
                "--key",
                &s(&keys.join("dev-signer.key")),
                "--keyring",
                &s(&keys.join("keyring.json")),
                "--reference",
                &s(&example.join("reference.csv")),
                "--holdout",
                &s(&example.join("holdout.csv")),
                "--label-column",
                "failure",
                "--group-column",
                "line",
                "--require",
                "roc_auc>=0.9",
                "--out",
                &s(&out),
            ],
        )?;
        println!("    {}", s(&out));
    }

    step("fleet-server with its embedded MQTT broker");
    let http_port = match args.http_port {
        Some(p) => p,
        None => port(8080, "admin API")?,
    };
    let broker = match args.broker_port {
        Some(p) => p,
        None => port(1883, "MQTT broker")?,
    };
    let fleet_dir = dir.join("fleet");
    std::fs::write(
        fleet_dir.join("fleet-server.toml"),
        format!(
            "# written by quickstart\n\
             state_dir = \"state\"\n\
             [http]\nlisten = \"127.0.0.1:{http_port}\"\n\
             [broker]\nlisten = \"127.0.0.1:{broker}\"\n\
             [bundles]\ntrust_root = \"{root}\"\nkeyring = \"{keyring}\"\nchunk_bytes = 65536\n\
             [[bundles.signoff]]\nmodel = \"{MODEL}\"\nrequire = [\"roc_auc>=0.9\"]\napprovals = 0\n\
             [rollouts]\ntick_ms = 500\n",
            root = s(&keys.join("root.pub")),
            keyring = s(&keys.join("keyring.json")),
        ),
    )?;
    bins.run(
        &fleet_dir,
        "fleet-server",
        &["validate-config", "fleet-server.toml"],
    )?;
    stack.fleet = Some(Proc::spawn(
        "fleet-server",
        &fleet_dir,
        &bins.path("fleet-server"),
        &["run", "--config", "fleet-server.toml"],
        dir.join("logs/fleet-server.log"),
        &dir.join(PIDS),
    )?);
    wait_for(
        stop,
        stack,
        Duration::from_secs(60),
        "the fleet server's /v1/health",
        || http(http_port, "GET", "/v1/health", &[], b"").is_ok_and(|r| r.0 == 200),
    )?;
    let token_file = fleet_dir.join("state/admin-token");
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("read {}", token_file.display()))?
        .trim()
        .to_string();
    let api = Api {
        port: http_port,
        auth: format!("Bearer {token}"),
    };

    step("three edge-agents (release 1.0 installed, synced to the fleet over MQTT)");
    let mut agent_ports = Vec::new();
    for (i, id) in AGENTS.iter().enumerate() {
        let adir = dir.join("agents").join(id);
        std::fs::create_dir_all(&adir)?;
        let p = port(8081 + i as u16, id)?;
        std::fs::write(
            adir.join("edge-agent.toml"),
            format!(
                "# written by quickstart\n\
                 device_id = \"{id}\"\n\
                 state_dir = \"state\"\n\
                 trust_root = \"{root}\"\n\
                 keyring = \"{keyring}\"\n\
                 [device]\ntags = {{ site = \"plant-a\", line = \"3\", box = \"{id}\" }}\n\
                 [http]\nlisten = \"127.0.0.1:{p}\"\n\
                 [health]\nwindow_secs = 20\nmin_predictions = 50\n\
                 [telemetry]\nwindow_secs = 5\nhealth_secs = 10\n\
                 [sync]\nurls = [\"mqtt://127.0.0.1:{broker}\"]\ndirective_keys = [\"{dkey}\"]\n",
                root = s(&keys.join("root.pub")),
                keyring = s(&keys.join("keyring.json")),
                dkey = s(&fleet_dir.join("state/directive.pub")),
            ),
        )?;
        bins.run(&adir, "edge-agent", &["validate-config", "edge-agent.toml"])?;
        bins.run(
            &adir,
            "edge-agent",
            &[
                "bundle",
                "install",
                &s(&dir.join(format!("bundles/{MODEL}-1.0.bundle"))),
                "--config",
                "edge-agent.toml",
            ],
        )?;
        stack.agents.push(Proc::spawn(
            id,
            &adir,
            &bins.path("edge-agent"),
            &["run", "--config", "edge-agent.toml"],
            dir.join(format!("logs/{id}.log")),
            &dir.join(PIDS),
        )?);
        agent_ports.push(p);
    }
    for (id, p) in AGENTS.iter().zip(&agent_ports) {
        let p = *p;
        wait_for(
            stop,
            stack,
            Duration::from_secs(60),
            &format!("{id} ready"),
            || http(p, "GET", "/v2/health/ready", &[], b"").is_ok_and(|r| r.0 == 200),
        )?;
    }
    wait_for(
        stop,
        stack,
        Duration::from_secs(60),
        "3 agents online in the registry",
        || {
            api.get("/v1/devices?online=true")
                .is_some_and(|v| v["devices"].as_array().map_or(0, Vec::len) == AGENTS.len())
        },
    )?;

    // predictions: every agent scores holdout rows, a few per second
    let rows = holdout_rows(&example.join("holdout.csv"))?;
    let counters: Vec<Arc<Counters>> = AGENTS.iter().map(|_| Arc::default()).collect();
    for (p, c) in agent_ports.iter().zip(&counters) {
        let (p, c, rows, stop) = (*p, c.clone(), rows.clone(), stack.traffic_stop.clone());
        stack.traffic.push(
            std::thread::Builder::new()
                .name(format!("traffic-{p}"))
                .spawn(move || traffic(p, &rows, &c, &stop))?,
        );
    }

    step("release 2.0: push to the fleet, then a canary-first rollout (waves 1, 100%)");
    let fleet_url = format!("http://127.0.0.1:{http_port}");
    let ctl = |a: &[&str]| -> Result<String> {
        let mut all = vec!["--server", &fleet_url, "--token-file"];
        let tf = s(&token_file);
        all.push(&tf);
        all.extend_from_slice(a);
        bins.run(&dir, "fleetctl", &all)
    };
    let pushed = ctl(&[
        "bundle",
        "push",
        &s(&dir.join(format!("bundles/{MODEL}-2.0.bundle"))),
    ])?;
    for l in pushed.lines() {
        println!("    {l}");
    }
    let created: Value = serde_json::from_str(&ctl(&[
        "--json",
        "rollout",
        "create",
        "--bundle",
        &format!("{MODEL}@2.0"),
        "--target",
        "site=plant-a",
        "--waves",
        "1,100%",
        "--success-threshold",
        "100%",
        "--failure-threshold",
        "0%",
        "--wave-timeout",
        "5m",
    ])?)
    .context("fleetctl rollout create --json: not JSON")?;
    let rollout = created["id"]
        .as_str()
        .context("fleetctl rollout create --json: no id")?
        .to_string();

    println!();
    println!(
        "The stack is up ({:.0} s). Where to look:",
        started.elapsed().as_secs_f64()
    );
    println!(
        "  admin API       {fleet_url}   (admin token in {})",
        s(&token_file)
    );
    println!("  fleet metrics   {fleet_url}/metrics");
    println!(
        "  rollout         fleetctl --server {fleet_url} --token-file {} rollout status {rollout}",
        s(&token_file)
    );
    println!(
        "  devices         fleetctl --server {fleet_url} --token-file {} devices list",
        s(&token_file)
    );
    for (id, p) in AGENTS.iter().zip(&agent_ports) {
        println!("  {id:<15} http://127.0.0.1:{p}/v2/models/{MODEL}   metrics: http://127.0.0.1:{p}/metrics");
    }
    println!(
        "  predict         curl -s http://127.0.0.1:{}/v1/models/{MODEL}:predict -H 'Content-Type: application/json' -d '{}'",
        agent_ports[0],
        json!({"instances": [rows[0]]})
    );
    println!("  logs            {}/logs/", s(&dir));
    println!("  MQTT            mqtt://127.0.0.1:{broker} (topics edge/v1/<device>/...)");
    println!("Ctrl-C stops everything.\n");

    let deadline = args.timeout.map(|t| Instant::now() + t);
    let mut last_print = Instant::now() - Duration::from_secs(60);
    let mut announced = false;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        check_alive(stack)?;
        if deadline.is_some_and(|d| Instant::now() > d) {
            bail!("--timeout passed before the rollout completed");
        }
        let r = api.get(&format!("/v1/rollouts/{rollout}"));
        let devices = api.get("/v1/devices");
        let state = r
            .as_ref()
            .and_then(|r| r["state"].as_str().map(str::to_string))
            .unwrap_or_else(|| "?".into());
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            println!(
                "{}",
                summary(r.as_ref(), devices.as_ref(), &counters, started)
            );
        }
        match state.as_str() {
            "completed" if !announced => {
                announced = true;
                println!("rollout {rollout} completed: every agent committed release 2.0 after its health window");
            }
            "halted" | "aborted" | "rolled_back" if !announced => {
                announced = true;
                let reason = r
                    .as_ref()
                    .map(|r| r["halt_reason"].to_string())
                    .unwrap_or_default();
                println!("rollout {rollout} ended {state}: {reason}");
                if args.until_done {
                    bail!("the rollout ended {state}");
                }
            }
            _ => {}
        }
        if args.until_done && state == "completed" && done(devices.as_ref(), &counters) {
            println!(
                "done: rollout completed, predictions served by release 2.0 on every agent, telemetry received from every agent"
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits for `ok`, failing early when a process died or Ctrl-C was pressed.
fn wait_for(
    stop: &AtomicBool,
    stack: &mut Stack,
    limit: Duration,
    what: &str,
    mut ok: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if ok() {
            return Ok(());
        }
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted while waiting for {what}");
        }
        check_alive(stack)?;
        if Instant::now() > deadline {
            bail!("{what}: not within {}s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn check_alive(stack: &mut Stack) -> Result<()> {
    for p in stack.agents.iter_mut().chain(stack.fleet.iter_mut()) {
        if let Some(how) = p.exited() {
            bail!(
                "{} exited ({how}); the end of {}:\n{}",
                p.name,
                p.log.display(),
                p.log_tail()
            );
        }
    }
    Ok(())
}

struct Api {
    port: u16,
    auth: String,
}

impl Api {
    fn get(&self, path: &str) -> Option<Value> {
        match http(
            self.port,
            "GET",
            path,
            &[("Authorization", &self.auth)],
            b"",
        ) {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }
}

/// Predictions answered per release, and errors.
#[derive(Default)]
struct Counters {
    release1: AtomicU64,
    release2: AtomicU64,
    errors: AtomicU64,
}

fn traffic(port: u16, rows: &[Value], c: &Counters, stop: &AtomicBool) {
    let mut i = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let Some(row) = rows.get(i % rows.len().max(1)) else {
            return;
        };
        i += 1;
        let body = json!({"instances": [row]}).to_string();
        let answer = http(
            port,
            "POST",
            &format!("/v1/models/{MODEL}:predict"),
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        match answer {
            Ok((200, text)) => {
                let v: Value = serde_json::from_str(&text).unwrap_or_default();
                if v["release"] == 2 || v["version"] == "2.0" {
                    c.release2.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.release1.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The feature columns of the example's holdout rows, as named-feature JSON objects.
fn holdout_rows(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .with_context(|| format!("{}: empty", path.display()))?
        .split(',')
        .collect();
    let mut rows = Vec::new();
    for (n, line) in lines.enumerate().take(500) {
        let cells: Vec<&str> = line.split(',').collect();
        let mut row = serde_json::Map::new();
        for f in PDM_FEATURES {
            let col = header
                .iter()
                .position(|h| *h == f)
                .with_context(|| format!("{}: no column {f}", path.display()))?;
            let cell = cells.get(col).copied().unwrap_or("");
            let v: f64 = cell.parse().with_context(|| {
                format!(
                    "{} row {}: {f} = {cell:?} is not a number",
                    path.display(),
                    n + 2
                )
            })?;
            row.insert(f.to_string(), json!(v));
        }
        rows.push(Value::Object(row));
    }
    if rows.is_empty() {
        bail!("{}: no rows", path.display());
    }
    Ok(rows)
}

/// Telemetry records the fleet received from `device`.
fn telemetry_received(devices: Option<&Value>, device: &str) -> u64 {
    devices
        .and_then(|v| v["devices"].as_array())
        .and_then(|d| d.iter().find(|d| d["id"] == device))
        .and_then(|d| d["ingest"]["received"]["telemetry"].as_u64())
        .unwrap_or(0)
}

fn done(devices: Option<&Value>, counters: &[Arc<Counters>]) -> bool {
    AGENTS.iter().zip(counters).all(|(id, c)| {
        c.release2.load(Ordering::Relaxed) >= 5 && telemetry_received(devices, id) > 0
    })
}

/// One line: rollout state and wave, then per device: release, rollout state, predictions.
fn summary(
    rollout: Option<&Value>,
    devices: Option<&Value>,
    counters: &[Arc<Counters>],
    started: Instant,
) -> String {
    let mut line = format!("[{:>4}s]", started.elapsed().as_secs());
    if let Some(r) = rollout {
        let wave = r["current_wave"].as_u64().map_or(0, |w| w + 1);
        let waves = r["waves"].as_array().map_or(0, Vec::len);
        line.push_str(&format!(
            " rollout {} wave {wave}/{waves} |",
            r["state"].as_str().unwrap_or("?")
        ));
    }
    for (id, c) in AGENTS.iter().zip(counters) {
        let dev = devices
            .and_then(|v| v["devices"].as_array())
            .and_then(|d| d.iter().find(|d| d["id"] == *id));
        let release = dev
            .and_then(|d| d["models"].as_array())
            .and_then(|m| m.iter().find(|m| m["name"] == MODEL))
            .map(|m| format!("r{} {}", m["release"], m["phase"].as_str().unwrap_or("")))
            .unwrap_or_else(|| "-".into());
        let online = dev.is_some_and(|d| d["online"] == true);
        let in_rollout = rollout
            .and_then(|r| r["devices"][id]["state"].as_str())
            .unwrap_or("-");
        line.push_str(&format!(
            " {id}: {release}{} rollout={in_rollout} predictions={}+{} errors={} telemetry={} |",
            if online { "" } else { " OFFLINE" },
            c.release1.load(Ordering::Relaxed),
            c.release2.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
            telemetry_received(devices, id),
        ));
    }
    line.pop();
    line
}
