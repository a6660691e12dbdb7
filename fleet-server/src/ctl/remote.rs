//! `fleetctl`'s remote commands: devices, bundles on the server, rollouts, fleet-wide
//! rollback and the audit log, through the fleet server's admin REST API (see
//! `docs/openapi.yaml`). Flags are checked locally before anything is sent; `--json` prints
//! the server's JSON as it came, otherwise a table or summary; failures map to the exit codes
//! listed in [`EXIT_CODES_HELP`].

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::client::{encode, Client, ClientError, Reply, ServerUrl};
use super::Output;

/// Exit code when the server refused the token (HTTP 401) or its role (HTTP 403) (EX_NOPERM).
pub const EXIT_NO_PERM: i32 = 77;
/// Exit code when the server does not know the device, bundle, rollout or path (HTTP 404).
pub const EXIT_NOT_FOUND: i32 = 66;
/// Exit code when the server cannot be reached or does not answer in time (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: i32 = 69;
/// Exit code for a server-side failure (HTTP 5xx) (EX_SOFTWARE).
pub const EXIT_SERVER: i32 = 70;
/// Exit code for an answer that is not the API's (not HTTP, not JSON, too large) (EX_PROTOCOL).
pub const EXIT_PROTOCOL: i32 = 76;
/// Exit code of `rollout status --watch` when the rollout ends other than `completed`.
pub const EXIT_ROLLOUT_ENDED: i32 = 2;
/// Largest token file read (bytes).
const MAX_TOKEN_FILE: u64 = 4096;

/// The exit codes, for `fleetctl --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   success
  1   signoff requirement not met (bundle build)
  2   rollout status --watch: the rollout ended halted, aborted or rolled back
  64  usage: bad command line, flag value or --server URL (the flag is named)
  65  bad data: rejected bundle or file; the server refused the request (HTTP 400, 409,
      422, ...: its error is printed); audit verify: the chain does not verify
  66  input not found: a local file, or HTTP 404 (unknown device, bundle, rollout)
  69  the fleet server cannot be reached or did not answer in time (the URL is named)
  70  the fleet server failed (HTTP 5xx)
  73  an output file cannot be written
  76  the answer is not the admin API's (not HTTP, not JSON, too large)
  77  permission denied: HTTP 401 (missing or unknown token) or 403 (role too low)

Server and token: --server URL or $FLEET_SERVER (default http://127.0.0.1:8080);
--token T, --token-file PATH (e.g. <state-dir>/admin-token) or $FLEET_TOKEN.";

/// Everything that stops a remote command.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{flag} {value:?}: {reason}")]
    Flag {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{}: {message}", .path.display())]
    TokenFile { path: PathBuf, message: String },
    #[error("{}: {message}", .path.display())]
    NoInput { path: PathBuf, message: String },
    #[error("audit log does not verify: {problem}")]
    AuditBroken {
        problem: String,
        /// The server's verify answer, if it came from the server.
        report: Option<Value>,
    },
    #[error("rollout {id} ended {state}{}", .reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    RolloutEnded {
        id: String,
        state: String,
        reason: Option<String>,
    },
    #[error("{url}: unexpected answer: {reason}")]
    Shape { url: String, reason: String },
}

impl RemoteError {
    pub fn exit_code(&self) -> i32 {
        match self {
            RemoteError::Flag { .. } => super::EXIT_USAGE,
            RemoteError::Client(c) => match c {
                ClientError::BadUrl { .. } => super::EXIT_USAGE,
                ClientError::Unreachable { .. } | ClientError::Timeout { .. } => EXIT_UNAVAILABLE,
                ClientError::Protocol { .. } => EXIT_PROTOCOL,
                ClientError::File { .. } => super::EXIT_NO_INPUT,
                ClientError::Status { status, .. } => match status {
                    401 | 403 => EXIT_NO_PERM,
                    404 => EXIT_NOT_FOUND,
                    500.. => EXIT_SERVER,
                    _ => super::EXIT_DATA,
                },
            },
            RemoteError::TokenFile { .. } | RemoteError::NoInput { .. } => super::EXIT_NO_INPUT,
            RemoteError::AuditBroken { .. } => super::EXIT_DATA,
            RemoteError::RolloutEnded { .. } => EXIT_ROLLOUT_ENDED,
            RemoteError::Shape { .. } => EXIT_PROTOCOL,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            RemoteError::Flag { .. } => "usage",
            RemoteError::Client(c) => match c {
                ClientError::BadUrl { .. } => "usage",
                ClientError::Unreachable { .. } | ClientError::Timeout { .. } => "unavailable",
                ClientError::Protocol { .. } => "protocol",
                ClientError::File { .. } => "no_input",
                ClientError::Status { status, .. } => match status {
                    401 => "unauthorized",
                    403 => "forbidden",
                    404 => "not_found",
                    409 => "conflict",
                    500.. => "server",
                    _ => "refused",
                },
            },
            RemoteError::TokenFile { .. } | RemoteError::NoInput { .. } => "no_input",
            RemoteError::AuditBroken { .. } => "audit_broken",
            RemoteError::RolloutEnded { .. } => "rollout_ended",
            RemoteError::Shape { .. } => "protocol",
        }
    }

    /// `{"error": {"kind", "message", ...}}`, with the HTTP status and the server's body for
    /// refusals and the verify report for a broken audit chain.
    pub fn to_json(&self) -> Value {
        let mut err = json!({"kind": self.kind(), "message": self.to_string()});
        match self {
            RemoteError::Client(ClientError::Status { status, body, .. }) => {
                err["status"] = json!(status);
                err["server"] = body.clone().unwrap_or(Value::Null);
            }
            RemoteError::AuditBroken { report, .. } => {
                err["verify"] = report.clone().unwrap_or(Value::Null);
            }
            RemoteError::RolloutEnded { id, state, .. } => {
                err["rollout"] = json!(id);
                err["state"] = json!(state);
            }
            _ => {}
        }
        json!({ "error": err })
    }
}

/// Where the server is and how to authenticate (global options).
#[derive(Debug, Clone, Args)]
pub struct RemoteOpts {
    /// Base URL of the fleet server's admin API (http only).
    #[arg(
        long,
        global = true,
        help_heading = "Server options",
        env = "FLEET_SERVER",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL"
    )]
    pub server: String,
    /// Bearer token for the admin API (default: $FLEET_TOKEN). Other local users can see
    /// command lines: prefer --token-file.
    #[arg(
        long,
        global = true,
        help_heading = "Server options",
        value_name = "TOKEN",
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// Read the bearer token from a file, e.g. <state-dir>/admin-token.
    #[arg(
        long,
        global = true,
        help_heading = "Server options",
        value_name = "PATH"
    )]
    pub token_file: Option<PathBuf>,
    /// Seconds one request may take (connect, upload, answer).
    #[arg(long, global = true,
        help_heading = "Server options", value_name = "SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// List devices with their models and ingest counters.
    List {
        /// Only devices whose tags match every KEY=VALUE, e.g. 'site=plant-a,line=3'.
        #[arg(long, value_name = "KEY=VALUE,...")]
        selector: Option<String>,
        /// Only devices online now.
        #[arg(long, conflicts_with = "offline")]
        online: bool,
        /// Only devices offline now.
        #[arg(long)]
        offline: bool,
    },
    /// Show one device: tags, models, health, ingest counters (received per class,
    /// duplicates ignored, highest contiguous seq, gaps, drops the device reported).
    Show {
        #[arg(value_name = "ID")]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a staged rollout of a bundle to the devices a selector matches.
    Create(CreateArgs),
    /// List rollouts.
    List,
    /// Show a rollout: its waves and every device's state.
    Status {
        #[arg(value_name = "ID")]
        id: String,
        /// Poll until the rollout is completed (exit 0), or halted, aborted or rolled back
        /// (exit 2), printing each change.
        #[arg(long)]
        watch: bool,
        /// Time between polls with --watch: 5s, 1m, ...
        #[arg(
            long,
            value_name = "DURATION",
            default_value = "2s",
            requires = "watch"
        )]
        interval: String,
    },
    /// Pause a running rollout (devices already sent a directive continue).
    Pause {
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Resume a paused rollout.
    Resume {
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Stop a rollout for good (devices keep what they run).
    Abort {
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Roll the rollout's devices back to the version they ran before.
    Rollback {
        #[arg(value_name = "ID")]
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The bundle to roll out, as stored on the server.
    #[arg(long, value_name = "NAME@VERSION")]
    pub bundle: String,
    /// The devices targeted: tags KEY=VALUE, comma-separated, all must match.
    #[arg(long, value_name = "KEY=VALUE,...")]
    pub target: String,
    /// Cumulative wave sizes, increasing: N% of the targeted devices or N devices; the first
    /// is the canary. E.g. 1%,10%,50%,100% or 1,10,50,100.
    #[arg(long, value_name = "SIZE,...", value_delimiter = ',', required = true)]
    pub waves: Vec<String>,
    /// Share of a wave's devices that must commit for it to be promoted: 95% or 0.95.
    #[arg(long, value_name = "SHARE")]
    pub success_threshold: String,
    /// Share of failed devices that halts the rollout: 5% or 0.05.
    #[arg(long, value_name = "SHARE")]
    pub failure_threshold: String,
    /// Time a wave may take before its silent devices count as failed: 90s, 30m, 2h
    /// (default: the server's `rollouts.default_wave_timeout_secs`).
    #[arg(long, value_name = "DURATION")]
    pub wave_timeout: Option<String>,
}

#[derive(Debug, Args)]
pub struct FleetRollbackArgs {
    /// The model to roll back to its previous version.
    #[arg(long, value_name = "NAME")]
    pub model: String,
    /// Only devices whose tags match (default: every device running the model).
    #[arg(long, value_name = "KEY=VALUE,...")]
    pub target: Option<String>,
    /// Why (kept in the audit log).
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit records (oldest first) and the chain's head.
    List {
        /// Only records with a seq greater than N.
        #[arg(long, value_name = "N")]
        after: Option<u64>,
        /// At most N records.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
    },
    /// Verify the hash chain (exit 0 when it verifies, 65 naming the problem otherwise).
    Verify {
        /// Verify a local audit.jsonl (and its .head) instead of asking the server.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// Also check the log against a head saved earlier (`audit list` prints it): the
        /// record at SEQ must still have HASH. This detects a rewrite of the log together
        /// with its head file.
        #[arg(long, value_name = "SEQ:HASH")]
        anchor: Option<String>,
    },
}

// ---------------------------------------------------------------------------------------
// Connection

/// The token: --token, else --token-file, else $FLEET_TOKEN, else none.
fn token(o: &RemoteOpts) -> Result<Option<String>, RemoteError> {
    if let Some(t) = &o.token {
        let t = t.trim();
        if t.is_empty() {
            return Err(flag_err("--token", t, "empty"));
        }
        return Ok(Some(t.to_string()));
    }
    if let Some(path) = &o.token_file {
        let file_err = |m: String| RemoteError::TokenFile {
            path: path.clone(),
            message: m,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_TOKEN_FILE + 1).read_to_string(&mut text))
            .map_err(|e| file_err(e.to_string()))?;
        if text.len() as u64 > MAX_TOKEN_FILE {
            return Err(file_err(format!(
                "larger than {MAX_TOKEN_FILE} bytes: not a token file"
            )));
        }
        let t = text.trim();
        if t.is_empty() {
            return Err(file_err("empty: no token in it".into()));
        }
        return Ok(Some(t.to_string()));
    }
    Ok(std::env::var("FLEET_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

fn connect(o: &RemoteOpts) -> Result<Api, RemoteError> {
    let server = ServerUrl::parse(&o.server)?;
    let token = token(o)?;
    let client = Client::new(server, token, Duration::from_secs(o.timeout))?;
    Ok(Api { client })
}

/// The client plus the error polish every command wants.
struct Api {
    client: Client,
}

impl Api {
    fn get(&self, path: &str) -> Result<Reply, RemoteError> {
        self.polish(self.client.get(path))
    }

    fn post(&self, path: &str, body: &Value) -> Result<Reply, RemoteError> {
        self.polish(self.client.post_json(path, body))
    }

    fn post_file(&self, path: &str, file: &Path) -> Result<Reply, RemoteError> {
        self.polish(self.client.post_file(path, file))
    }

    fn url(&self, path: &str) -> String {
        self.client.server().url(path)
    }

    /// Adds a hint to a 401 when no token was given.
    fn polish(&self, r: Result<Reply, ClientError>) -> Result<Reply, RemoteError> {
        match r {
            Err(ClientError::Status {
                method,
                url,
                status: 401,
                message,
                body,
            }) if !self.client.has_token() => Err(ClientError::Status {
                method,
                url,
                status: 401,
                message: format!(
                    "{message} (no token given: use --token, --token-file or $FLEET_TOKEN)"
                ),
                body,
            }
            .into()),
            other => Ok(other?),
        }
    }
}

fn flag_err(flag: &'static str, value: &str, reason: impl Into<String>) -> RemoteError {
    RemoteError::Flag {
        flag,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn output(human: String, json: Value) -> Output {
    Output { human, json }
}

/// The array under `key` of an answer, or a shape error naming the URL.
fn array<'v>(api: &Api, path: &str, v: &'v Value, key: &str) -> Result<&'v [Value], RemoteError> {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .ok_or_else(|| RemoteError::Shape {
            url: api.url(path),
            reason: format!("no {key:?} array in the answer"),
        })
}

// ---------------------------------------------------------------------------------------
// Local checks of flag values

/// Checks `NAME@VERSION`; returns the two parts.
pub fn parse_spec(flag: &'static str, s: &str) -> Result<(String, String), RemoteError> {
    match s.trim().rsplit_once('@') {
        Some((n, v)) if !n.is_empty() && !v.is_empty() => Ok((n.to_string(), v.to_string())),
        _ => Err(flag_err(
            flag,
            s,
            "expected NAME@VERSION, e.g. pdm-failure@1.2.0",
        )),
    }
}

/// Checks a tag selector `KEY=VALUE[,KEY=VALUE...]`; returns it with spaces around the
/// parts removed.
pub fn check_selector(flag: &'static str, s: &str) -> Result<String, RemoteError> {
    let mut parts = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (k, v) = part.split_once('=').ok_or_else(|| {
            flag_err(
                flag,
                s,
                format!("{part:?} is not KEY=VALUE (e.g. site=plant-a,line=3)"),
            )
        })?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || v.is_empty() || v.contains('=') {
            return Err(flag_err(
                flag,
                s,
                format!("{part:?} is not KEY=VALUE (e.g. site=plant-a,line=3)"),
            ));
        }
        if parts
            .iter()
            .any(|p: &String| p.split_once('=').is_some_and(|(pk, _)| pk == k))
        {
            return Err(flag_err(flag, s, format!("key {k:?} appears twice")));
        }
        parts.push(format!("{k}={v}"));
    }
    Ok(parts.join(","))
}

/// A wave size: a percent of the targeted devices or a device count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WaveSize {
    Percent(f64),
    Count(u64),
}

/// Checks `--waves`: each `N%` (0 < N <= 100) or a count N >= 1, increasing within each kind.
pub fn check_waves(waves: &[String]) -> Result<Vec<WaveSize>, RemoteError> {
    let all = waves.join(",");
    let bad = |reason: String| flag_err("--waves", &all, reason);
    if waves.is_empty() {
        return Err(bad("no waves".into()));
    }
    if waves.len() > 100 {
        return Err(bad("more than 100 waves".into()));
    }
    let mut out: Vec<WaveSize> = Vec::new();
    for w in waves {
        let w = w.trim();
        let size = if let Some(p) = w.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| bad(format!("{w:?} is neither N% nor a device count")))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad(format!(
                    "{w:?}: a percentage must be above 0 and at most 100"
                )));
            }
            WaveSize::Percent(p)
        } else {
            let n: u64 = w
                .parse()
                .map_err(|_| bad(format!("{w:?} is neither N% nor a device count")))?;
            if n == 0 {
                return Err(bad(format!("{w:?}: a wave needs at least one device")));
            }
            WaveSize::Count(n)
        };
        let increasing = match (out.last(), size) {
            (Some(WaveSize::Percent(a)), WaveSize::Percent(b)) => b > *a,
            (Some(WaveSize::Count(a)), WaveSize::Count(b)) => b > *a,
            _ => true,
        };
        if !increasing {
            return Err(bad(format!(
                "{w:?} is not larger than the wave before it (sizes are cumulative)"
            )));
        }
        out.push(size);
    }
    Ok(out)
}

/// Checks a share: `95%` or `0.95`, within 0..=1; returns it as a fraction.
pub fn parse_share(flag: &'static str, s: &str) -> Result<f64, RemoteError> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| flag_err(flag, s, "expected a percentage (95%) or a fraction (0.95)"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(flag_err(flag, s, "must be between 0% and 100%"));
    }
    Ok(v)
}

/// Checks a duration `90s`, `30m`, `2h` (above zero); returns seconds.
pub fn parse_duration(flag: &'static str, s: &str) -> Result<u64, RemoteError> {
    let t = s.trim();
    let bad = || flag_err(flag, s, "expected a duration such as 90s, 30m or 2h");
    let unit = match t.chars().last() {
        Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        _ => return Err(bad()),
    };
    let n: u64 = t[..t.len() - 1].parse().map_err(|_| bad())?;
    let secs = n.checked_mul(unit).ok_or_else(bad)?;
    if secs == 0 {
        return Err(flag_err(flag, s, "must be above zero"));
    }
    Ok(secs)
}

// ---------------------------------------------------------------------------------------
// Commands

/// `fleetctl health`: the server answers `GET /v1/health`; with a token, also that the
/// token is accepted (`GET /metrics`, role viewer).
pub fn health(o: &RemoteOpts) -> Result<Output, RemoteError> {
    let api = connect(o)?;
    let reply = api.get("/v1/health")?;
    let status = reply
        .json
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    let token_accepted = if api.client.has_token() {
        api.polish(api.client.get_text("/metrics").map(|_| Reply {
            status: 200,
            json: Value::Null,
        }))?;
        Some(true)
    } else {
        None
    };
    let human = format!(
        "{}: {status}{}",
        api.client.server().base(),
        if token_accepted.is_some() {
            "; token accepted"
        } else {
            ""
        }
    );
    let mut json = reply.json;
    if let Value::Object(m) = &mut json {
        m.insert("server".into(), json!(api.client.server().base()));
        m.insert("token_accepted".into(), json!(token_accepted));
    }
    Ok(output(human, json))
}

/// `fleetctl devices ...`.
pub fn devices(o: &RemoteOpts, cmd: DevicesCommand) -> Result<Output, RemoteError> {
    match cmd {
        DevicesCommand::List {
            selector,
            online,
            offline,
        } => {
            let mut query = Vec::new();
            if let Some(s) = &selector {
                query.push(format!(
                    "selector={}",
                    encode(&check_selector("--selector", s)?)
                ));
            }
            if online || offline {
                query.push(format!("online={online}"));
            }
            let path = if query.is_empty() {
                "/v1/devices".to_string()
            } else {
                format!("/v1/devices?{}", query.join("&"))
            };
            let api = connect(o)?;
            let reply = api.get(&path)?;
            let list = array(&api, &path, &reply.json, "devices")?;
            Ok(output(render_device_list(list), reply.json.clone()))
        }
        DevicesCommand::Show { id } => {
            let api = connect(o)?;
            let reply = api.get(&format!("/v1/devices/{}", encode(&id)))?;
            Ok(output(render_device(&reply.json), reply.json))
        }
    }
}

/// `fleetctl bundle push FILE`.
pub fn bundle_push(o: &RemoteOpts, file: &Path) -> Result<Output, RemoteError> {
    if !file.is_file() {
        return Err(RemoteError::NoInput {
            path: file.to_path_buf(),
            message: "no such file".into(),
        });
    }
    let api = connect(o)?;
    let reply = api.post_file("/v1/bundles", file).map_err(|e| match e {
        RemoteError::Client(ClientError::File { message, .. }) => RemoteError::NoInput {
            path: file.to_path_buf(),
            message,
        },
        other => other,
    })?;
    let b = &reply.json;
    let verb = if reply.status == 200 {
        "already stored"
    } else {
        "stored"
    };
    let mut human = format!(
        "{verb} {}@{} (release {}, {} bytes, sha256 {}), signed by {}",
        s(b, "name"),
        s(b, "version"),
        s(b, "release"),
        s(b, "bytes"),
        s(b, "sha256"),
        s(b, "signer")
    );
    human.push('\n');
    human.push_str(&signoff_summary(b));
    Ok(output(human, reply.json))
}

/// `fleetctl bundle list`.
pub fn bundle_list(o: &RemoteOpts) -> Result<Output, RemoteError> {
    let api = connect(o)?;
    let reply = api.get("/v1/bundles")?;
    let list = array(&api, "/v1/bundles", &reply.json, "bundles")?;
    let rows = list
        .iter()
        .map(|b| {
            vec![
                s(b, "name"),
                s(b, "version"),
                s(b, "release"),
                s(&b["signoff"], "state"),
                s(b, "signer"),
                s(b, "uploaded_by"),
                ms_time(&b["uploaded_at_ms"]),
                short_hash(&b["sha256"]),
                s(b, "bytes"),
            ]
        })
        .collect();
    let mut human = table(
        &[
            "NAME",
            "VERSION",
            "RELEASE",
            "STATE",
            "SIGNER",
            "UPLOADED BY",
            "UPLOADED",
            "SHA256",
            "BYTES",
        ],
        rows,
    );
    human.push_str(&format!("{} bundle(s)", list.len()));
    Ok(output(human, reply.json.clone()))
}

/// `fleetctl bundle show NAME@VERSION`.
pub fn bundle_show(o: &RemoteOpts, spec: &str) -> Result<Output, RemoteError> {
    let (name, version) = parse_spec("NAME@VERSION", spec)?;
    let api = connect(o)?;
    let reply = api.get(&format!(
        "/v1/bundles/{}/{}",
        encode(&name),
        encode(&version)
    ))?;
    Ok(output(render_bundle(&reply.json), reply.json))
}

/// `fleetctl bundle approve NAME@VERSION`.
pub fn bundle_approve(o: &RemoteOpts, spec: &str) -> Result<Output, RemoteError> {
    let (name, version) = parse_spec("NAME@VERSION", spec)?;
    let api = connect(o)?;
    let reply = api.post(
        &format!("/v1/bundles/{}/{}/approve", encode(&name), encode(&version)),
        &json!({}),
    )?;
    let b = &reply.json;
    let human = format!(
        "approved {}@{}\n{}",
        s(b, "name"),
        s(b, "version"),
        signoff_summary(b)
    );
    Ok(output(human, reply.json))
}

/// `fleetctl rollout ...`; `json` selects how `--watch` prints intermediate states.
pub fn rollout(o: &RemoteOpts, json_out: bool, cmd: RolloutCommand) -> Result<Output, RemoteError> {
    match cmd {
        RolloutCommand::Create(a) => {
            parse_spec("--bundle", &a.bundle)?;
            let target = check_selector("--target", &a.target)?;
            check_waves(&a.waves)?;
            parse_share("--success-threshold", &a.success_threshold)?;
            parse_share("--failure-threshold", &a.failure_threshold)?;
            let mut body = json!({
                "bundle": a.bundle.trim(),
                "target": target,
                "waves": a.waves.iter().map(|w| w.trim()).collect::<Vec<_>>(),
                "success_threshold": a.success_threshold.trim(),
                "failure_threshold": a.failure_threshold.trim(),
            });
            if let Some(t) = &a.wave_timeout {
                parse_duration("--wave-timeout", t)?;
                body["wave_timeout"] = json!(t.trim());
            }
            let api = connect(o)?;
            let reply = api.post("/v1/rollouts", &body)?;
            let human = format!(
                "created rollout {}\n{}",
                s(&reply.json, "id"),
                render_rollout(&reply.json)
            );
            Ok(output(human, reply.json))
        }
        RolloutCommand::List => {
            let api = connect(o)?;
            let reply = api.get("/v1/rollouts")?;
            let list = array(&api, "/v1/rollouts", &reply.json, "rollouts")?;
            let rows = list
                .iter()
                .map(|r| {
                    vec![
                        s(r, "id"),
                        s(r, "state"),
                        format!("{}@{}", s(&r["bundle"], "name"), s(&r["bundle"], "version")),
                        s(r, "target"),
                        format!(
                            "{}/{}",
                            s(r, "current_wave"),
                            r["waves"].as_array().map_or(0, Vec::len)
                        ),
                        r["devices"].as_object().map_or(0, |m| m.len()).to_string(),
                        s(r, "created_by"),
                        ms_time(&r["created_at_ms"]),
                    ]
                })
                .collect();
            let mut human = table(
                &[
                    "ID",
                    "STATE",
                    "BUNDLE",
                    "TARGET",
                    "WAVE/OF",
                    "DEVICES",
                    "CREATED BY",
                    "CREATED",
                ],
                rows,
            );
            human.push_str(&format!("{} rollout(s)", list.len()));
            Ok(output(human, reply.json.clone()))
        }
        RolloutCommand::Status {
            id,
            watch,
            interval,
        } => {
            let every = if watch {
                Some(parse_duration("--interval", &interval)?)
            } else {
                None
            };
            let api = connect(o)?;
            let path = format!("/v1/rollouts/{}", encode(&id));
            let Some(every) = every else {
                let reply = api.get(&path)?;
                return Ok(output(render_rollout(&reply.json), reply.json));
            };
            watch_rollout(&api, &path, &id, Duration::from_secs(every), json_out)
        }
        RolloutCommand::Pause { id } => rollout_action(o, &id, "pause"),
        RolloutCommand::Resume { id } => rollout_action(o, &id, "resume"),
        RolloutCommand::Abort { id } => rollout_action(o, &id, "abort"),
        RolloutCommand::Rollback { id } => rollout_action(o, &id, "rollback"),
    }
}

fn rollout_action(o: &RemoteOpts, id: &str, action: &str) -> Result<Output, RemoteError> {
    let api = connect(o)?;
    let reply = api.post(&format!("/v1/rollouts/{}/{action}", encode(id)), &json!({}))?;
    let r = &reply.json;
    let mut human = format!(
        "rollout {}: {action} accepted, state {}",
        s(r, "id"),
        s(r, "state")
    );
    if let Some(why) = r["halt_reason"].as_str() {
        human.push_str(&format!(" ({why})"));
    }
    Ok(output(human, reply.json))
}

/// Rollout states after which nothing changes by itself.
fn finished(state: &str) -> bool {
    matches!(state, "completed" | "halted" | "aborted" | "rolled_back")
}

fn watch_rollout(
    api: &Api,
    path: &str,
    id: &str,
    every: Duration,
    json_out: bool,
) -> Result<Output, RemoteError> {
    let show = |r: &Value| {
        let text = if json_out {
            serde_json::to_string_pretty(r).unwrap_or_default()
        } else {
            format!("{}\n", render_rollout(r))
        };
        let _ = writeln!(std::io::stdout().lock(), "{text}");
    };
    let mut last: Option<Value> = None;
    loop {
        let reply = api.get(path)?;
        let state = reply.json["state"].as_str().unwrap_or("").to_string();
        if finished(&state) {
            if state == "completed" {
                return Ok(output(render_rollout(&reply.json), reply.json));
            }
            show(&reply.json);
            return Err(RemoteError::RolloutEnded {
                id: id.to_string(),
                state,
                reason: reply.json["halt_reason"].as_str().map(str::to_string),
            });
        }
        if last.as_ref() != Some(&reply.json) {
            show(&reply.json);
            last = Some(reply.json);
        }
        std::thread::sleep(every);
    }
}

/// `fleetctl rollback --model M [--target SEL] --reason TEXT`.
pub fn fleet_rollback(o: &RemoteOpts, a: &FleetRollbackArgs) -> Result<Output, RemoteError> {
    if a.model.trim().is_empty() {
        return Err(flag_err("--model", &a.model, "empty"));
    }
    if a.reason.trim().is_empty() {
        return Err(flag_err(
            "--reason",
            &a.reason,
            "say why (it goes into the audit log)",
        ));
    }
    let mut body = json!({"model": a.model.trim(), "reason": a.reason.trim()});
    if let Some(t) = &a.target {
        body["target"] = json!(check_selector("--target", t)?);
    }
    let api = connect(o)?;
    let reply = api.post("/v1/rollback", &body)?;
    let devices: Vec<String> = reply.json["devices"]
        .as_array()
        .map(|d| d.iter().map(plain).collect())
        .unwrap_or_default();
    let human = format!(
        "rollback of {} to its previous version sent to {} device(s){}{}",
        s(&reply.json, "model"),
        devices.len(),
        if devices.is_empty() { "" } else { ": " },
        devices.join(", ")
    );
    Ok(output(human, reply.json))
}

/// `fleetctl audit ...`.
pub fn audit(o: &RemoteOpts, cmd: AuditCommand) -> Result<Output, RemoteError> {
    match cmd {
        AuditCommand::List { after, limit } => {
            let mut query = Vec::new();
            if let Some(a) = after {
                query.push(format!("after={a}"));
            }
            if let Some(l) = limit {
                query.push(format!("limit={l}"));
            }
            let path = if query.is_empty() {
                "/v1/audit".to_string()
            } else {
                format!("/v1/audit?{}", query.join("&"))
            };
            let api = connect(o)?;
            let reply = api.get(&path)?;
            let records = array(&api, &path, &reply.json, "records")?;
            let rows = records
                .iter()
                .map(|r| {
                    vec![
                        s(r, "seq"),
                        s(r, "at"),
                        s(r, "actor"),
                        s(r, "role"),
                        s(r, "action"),
                        s(r, "target"),
                        s(r, "result"),
                        short_hash(&r["bundle_sha256"]),
                    ]
                })
                .collect();
            let mut human = table(
                &[
                    "SEQ", "AT", "ACTOR", "ROLE", "ACTION", "TARGET", "RESULT", "BUNDLE",
                ],
                rows,
            );
            human.push_str(&format!(
                "{} record(s); head seq {} hash {}",
                records.len(),
                s(&reply.json["head"], "seq"),
                s(&reply.json["head"], "hash")
            ));
            Ok(output(human, reply.json.clone()))
        }
        AuditCommand::Verify {
            file: Some(path),
            anchor,
        } => verify_file(&path, anchor.as_deref().map(parse_anchor).transpose()?),
        AuditCommand::Verify { file: None, anchor } => {
            let path = match anchor.as_deref().map(parse_anchor).transpose()? {
                Some(a) => format!("/v1/audit/verify?seq={}&hash={}", a.seq, encode(&a.hash)),
                None => "/v1/audit/verify".to_string(),
            };
            let api = connect(o)?;
            let reply = api.get(&path)?;
            let v = reply.json;
            if v["ok"].as_bool() != Some(true) {
                return Err(RemoteError::AuditBroken {
                    problem: v["problem"]
                        .as_str()
                        .unwrap_or("the server says it does not verify")
                        .to_string(),
                    report: Some(v),
                });
            }
            let human = format!(
                "audit log verified: {} record(s), head seq {} hash {}",
                s(&v, "records"),
                s(&v["head"], "seq"),
                s(&v["head"], "hash")
            );
            Ok(output(human, v))
        }
    }
}

/// Checks `--anchor SEQ:HASH` (HASH: 64 lowercase hex digits).
pub fn parse_anchor(s: &str) -> Result<crate::audit::Head, RemoteError> {
    let bad = || {
        flag_err(
            "--anchor",
            s,
            "expected SEQ:HASH (a head seq and its 64-hex-digit hash)",
        )
    };
    let (seq, hash) = s.trim().split_once(':').ok_or_else(bad)?;
    let seq: u64 = seq.parse().map_err(|_| bad())?;
    if hash.len() != 64
        || !hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    Ok(crate::audit::Head {
        seq,
        hash: hash.to_string(),
    })
}

/// `fleetctl audit verify --file PATH [--anchor SEQ:HASH]`: the local log and its `.head`,
/// no server.
fn verify_file(path: &Path, anchor: Option<crate::audit::Head>) -> Result<Output, RemoteError> {
    if !path.is_file() {
        return Err(RemoteError::NoInput {
            path: path.to_path_buf(),
            message: "no such file".into(),
        });
    }
    let verified = match &anchor {
        Some(a) => crate::audit::verify_with_anchor(path, a),
        None => crate::audit::verify(path),
    };
    match verified {
        Ok(r) => {
            let mut human = format!(
                "{}: audit log verified: {} record(s), head seq {} hash {}",
                path.display(),
                r.records,
                r.head.seq,
                r.head.hash
            );
            if let Some(a) = &anchor {
                human.push_str(&format!(
                    "\nthe record at seq {} still has the anchor's hash",
                    a.seq
                ));
            }
            if r.unanchored > 0 {
                human.push_str(&format!(
                    "\n{} record(s) after the head (an append in flight, or left by a crash: the server re-anchors them on start)",
                    r.unanchored
                ));
            }
            if r.torn_tail_bytes > 0 {
                human.push_str(&format!(
                    "\n{} byte(s) of an unfinished last line ignored",
                    r.torn_tail_bytes
                ));
            }
            Ok(output(
                human,
                json!({
                    "ok": true,
                    "records": r.records,
                    "head": r.head,
                    "last": r.last,
                    "unanchored": r.unanchored,
                    "torn_tail_bytes": r.torn_tail_bytes,
                    "first_at": r.first_at,
                    "last_at": r.last_at,
                    "problem": null,
                }),
            ))
        }
        Err(e) => Err(RemoteError::AuditBroken {
            problem: e.to_string(),
            report: Some(json!({"ok": false, "problem": e.to_string()})),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Rendering (tolerant: a missing field shows as "-")

/// A JSON value for a table cell: strings bare, null or missing as `-`.
fn plain(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn s(v: &Value, key: &str) -> String {
    plain(v.get(key).unwrap_or(&Value::Null))
}

fn short_hash(v: &Value) -> String {
    match v.as_str() {
        Some(h) if h.len() > 12 => h.get(..12).unwrap_or(h).to_string(),
        Some(h) => h.to_string(),
        None => "-".into(),
    }
}

/// Milliseconds since the epoch as `2026-11-26T18:42:09Z`.
fn ms_time(v: &Value) -> String {
    let Some(ms) = v.as_i64() else {
        return "-".into();
    };
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

fn pct(v: &Value) -> String {
    match v.as_f64() {
        Some(f) => {
            let p = format!("{:.2}", f * 100.0);
            format!("{}%", p.trim_end_matches('0').trim_end_matches('.'))
        }
        None => "-".into(),
    }
}

fn secs_text(v: &Value) -> String {
    match v.as_u64() {
        Some(0) => "0s".into(),
        Some(n) if n % 3600 == 0 => format!("{}h", n / 3600),
        Some(n) if n % 60 == 0 => format!("{}m", n / 60),
        Some(n) => format!("{n}s"),
        None => "-".into(),
    }
}

fn tags(v: &Value) -> String {
    match v.as_object() {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k}={}", plain(v)))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

/// Columns padded to the widest cell; two spaces between; the last column not padded.
/// Ends with a newline.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(c);
                let pad = widths
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(c.chars().count());
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn models(d: &Value) -> String {
    match d["models"].as_array() {
        Some(ms) if !ms.is_empty() => ms
            .iter()
            .map(|m| {
                let mut t = format!("{}@{}", s(m, "name"), s(m, "version"));
                if let Some(p) = m["phase"].as_str() {
                    t.push_str(&format!(" ({p})"));
                }
                t
            })
            .collect::<Vec<_>>()
            .join(", "),
        _ => "-".into(),
    }
}

const CLASSES: [&str; 4] = ["telemetry", "drift", "health", "event"];
/// Why a device drops records (outbox full, too old, storage error).
const DROP_REASONS: [&str; 3] = ["cap", "ttl", "io"];

/// Total of the numbers at the leaves of a JSON value.
fn leaf_sum(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::Object(m) => m.values().map(leaf_sum).sum(),
        _ => 0,
    }
}

fn render_device_list(list: &[Value]) -> String {
    let rows = list
        .iter()
        .map(|d| {
            let ing = &d["ingest"];
            let (recv, dup, seq, gaps, dropped) = if ing.is_object() {
                (
                    CLASSES
                        .iter()
                        .map(|c| s(&ing["received"], c))
                        .collect::<Vec<_>>()
                        .join("/"),
                    s(ing, "duplicates"),
                    s(ing, "last_seq"),
                    s(ing, "gaps"),
                    leaf_sum(&ing["dropped_reported"]).to_string(),
                )
            } else {
                ("-".into(), "-".into(), "-".into(), "-".into(), "-".into())
            };
            vec![
                s(d, "id"),
                yes_no(&d["online"]),
                ms_time(&d["last_seen_ms"]),
                s(d, "agent_version"),
                models(d),
                tags(&d["tags"]),
                recv,
                dup,
                seq,
                gaps,
                dropped,
            ]
        })
        .collect();
    let online = list
        .iter()
        .filter(|d| d["online"] == Value::Bool(true))
        .count();
    let mut out = table(
        &[
            "ID",
            "ONLINE",
            "LAST SEEN",
            "AGENT",
            "MODELS",
            "TAGS",
            "RECEIVED",
            "DUPS",
            "SEQ",
            "GAPS",
            "DROPPED",
        ],
        rows,
    );
    out.push_str(&format!(
        "{} device(s), {online} online. RECEIVED: telemetry/drift/health/event records; SEQ: highest contiguous seq; DROPPED: records the device reported dropped",
        list.len()
    ));
    out
}

fn yes_no(v: &Value) -> String {
    match v.as_bool() {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => "-".into(),
    }
}

fn render_device(d: &Value) -> String {
    let mut out = String::new();
    let mut kv = |k: &str, v: String| out.push_str(&format!("{k:<12}{v}\n"));
    kv("device", s(d, "id"));
    let online = match d["online"].as_bool() {
        Some(true) => format!("yes, since {}", ms_time(&d["online_since_ms"])),
        other => yes_no(&other.map_or(Value::Null, Value::Bool)),
    };
    kv("online", online);
    kv("last seen", ms_time(&d["last_seen_ms"]));
    kv("agent", s(d, "agent_version"));
    kv("tags", tags(&d["tags"]));
    kv(
        "health",
        match &d["health"] {
            Value::Null => "-".into(),
            h => h.to_string(),
        },
    );
    let model_rows: Vec<Vec<String>> = d["models"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    vec![
                        s(m, "name"),
                        s(m, "version"),
                        s(m, "release"),
                        s(m, "role"),
                        s(m, "phase"),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out.push_str("models\n");
    if model_rows.is_empty() {
        out.push_str("  none reported\n");
    } else {
        for l in table(&["NAME", "VERSION", "RELEASE", "ROLE", "PHASE"], model_rows).lines() {
            out.push_str(&format!("  {l}\n"));
        }
    }
    let ing = &d["ingest"];
    if !ing.is_object() {
        out.push_str("ingest      no records received yet");
        return out;
    }
    out.push_str(&format!("ingest (outbox epoch {})\n", s(ing, "epoch")));
    let received: Vec<String> = CLASSES
        .iter()
        .map(|c| format!("{c} {}", s(&ing["received"], c)))
        .collect();
    out.push_str(&format!("  received            {}\n", received.join(", ")));
    out.push_str(&format!("  duplicates ignored  {}\n", s(ing, "duplicates")));
    out.push_str(&format!(
        "  highest contiguous  seq {}\n",
        s(ing, "last_seq")
    ));
    out.push_str(&format!("  gaps                {}\n", s(ing, "gaps")));
    let dropped = match ing["dropped_reported"].as_object() {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(class, reasons)| {
                let r = match reasons.as_object() {
                    Some(rs) => {
                        // the agent's reasons in its order, then any others
                        let mut keys: Vec<&String> = rs.keys().collect();
                        keys.sort_by_key(|k| {
                            (
                                DROP_REASONS
                                    .iter()
                                    .position(|r| r == k)
                                    .unwrap_or(usize::MAX),
                                *k,
                            )
                        });
                        keys.iter()
                            .map(|k| format!("{k} {}", plain(&rs[k.as_str()])))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                    None => plain(reasons),
                };
                format!("{class}: {r}")
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => "none".into(),
    };
    out.push_str(&format!("  dropped (reported)  {dropped}"));
    out
}

fn signoff_summary(b: &Value) -> String {
    let so = &b["signoff"];
    let state = s(so, "state");
    let mut out = format!("signoff: {state}");
    if let Some(n) = so["approvals_needed"].as_u64() {
        let by: Vec<String> = so["approved_by"]
            .as_array()
            .map(|a| a.iter().map(plain).collect())
            .unwrap_or_default();
        if n > 0 || !by.is_empty() {
            out.push_str(&format!(
                "; approvals needed {n}, approved by {}",
                if by.is_empty() {
                    "nobody yet".into()
                } else {
                    by.join(", ")
                }
            ));
        }
    }
    if let Some(ps) = so["problems"].as_array() {
        for p in ps {
            out.push_str(&format!("\n  problem: {}", plain(p)));
        }
    }
    if state == "awaiting_approval" {
        out.push_str(&format!(
            "\n  an admin other than the uploader approves it with: fleetctl bundle approve {}@{}",
            s(b, "name"),
            s(b, "version")
        ));
    }
    out
}

fn render_bundle(b: &Value) -> String {
    let mut out = String::new();
    for (k, v) in [
        ("bundle", format!("{}@{}", s(b, "name"), s(b, "version"))),
        ("release", s(b, "release")),
        ("sha256", s(b, "sha256")),
        ("bytes", s(b, "bytes")),
        ("signer", s(b, "signer")),
        (
            "uploaded",
            format!(
                "by {} at {}",
                s(b, "uploaded_by"),
                ms_time(&b["uploaded_at_ms"])
            ),
        ),
    ] {
        out.push_str(&format!("{k:<10}{v}\n"));
    }
    let reqs: Vec<Vec<String>> = b["signoff"]["requirements"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    vec![
                        s(r, "requirement"),
                        r["measured"].as_f64().map_or("-".into(), super::fmt_metric),
                        yes_no(&r["met"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if !reqs.is_empty() {
        out.push_str("requirements\n");
        for l in table(&["REQUIREMENT", "MEASURED", "MET"], reqs).lines() {
            out.push_str(&format!("  {l}\n"));
        }
    }
    out.push_str(&signoff_summary(b));
    out
}

fn render_rollout(r: &Value) -> String {
    let mut out = String::new();
    let b = &r["bundle"];
    let mut kv = |k: &str, v: String| out.push_str(&format!("{k:<11}{v}\n"));
    kv("rollout", format!("{}: {}", s(r, "id"), s(r, "state")));
    if let Some(why) = r["halt_reason"].as_str() {
        kv("halted", why.to_string());
    }
    kv(
        "bundle",
        format!(
            "{}@{} (release {}, sha256 {})",
            s(b, "name"),
            s(b, "version"),
            s(b, "release"),
            short_hash(&b["sha256"])
        ),
    );
    kv("target", s(r, "target"));
    kv(
        "thresholds",
        format!(
            "success {}, failure {}; wave timeout {}",
            pct(&r["success_threshold"]),
            pct(&r["failure_threshold"]),
            secs_text(&r["wave_timeout_secs"])
        ),
    );
    kv(
        "created",
        format!(
            "by {} at {}; updated {}",
            s(r, "created_by"),
            ms_time(&r["created_at_ms"]),
            ms_time(&r["updated_at_ms"])
        ),
    );
    kv("wave", format!("{} is current", s(r, "current_wave")));
    let waves: Vec<Vec<String>> = r["waves"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    vec![
                        s(w, "index"),
                        s(w, "size"),
                        s(w, "state"),
                        s(w, "succeeded"),
                        s(w, "failed"),
                        s(w, "in_progress"),
                        ms_time(&w["started_at_ms"]),
                        ms_time(&w["deadline_ms"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out.push('\n');
    out.push_str(&table(
        &[
            "WAVE",
            "SIZE",
            "STATE",
            "SUCCEEDED",
            "FAILED",
            "IN PROGRESS",
            "STARTED",
            "DEADLINE",
        ],
        waves,
    ));
    let mut devices: Vec<(&String, &Value)> = r["devices"]
        .as_object()
        .map(|m| m.iter().collect())
        .unwrap_or_default();
    devices.sort_by_key(|(id, d)| (d["wave"].as_u64().unwrap_or(u64::MAX), id.as_str()));
    let rows = devices
        .iter()
        .map(|(id, d)| {
            vec![
                id.to_string(),
                s(d, "wave"),
                s(d, "state"),
                ms_time(&d["updated_at_ms"]),
                s(d, "directive"),
                s(d, "reason"),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &["DEVICE", "WAVE", "STATE", "UPDATED", "DIRECTIVE", "REASON"],
        rows,
    ));
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    //! The remote commands against an in-process mock of the admin API serving fixed JSON
    //! shaped like the contract: requests sent, tables rendered, exit codes.

    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    use clap::Parser;

    use super::*;
    use crate::ctl::{execute, Cli, CtlError};

    /// A request the mock received.
    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        target: String,
        auth: Option<String>,
        content_type: Option<String>,
        expect: bool,
        body: Vec<u8>,
    }

    type Route = dyn Fn(&Seen) -> (u16, String) + Send + Sync;

    /// A tiny HTTP/1.1 server on a free port: one request per connection, answered by `route`.
    struct Mock {
        url: String,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Mock {
        fn start(route: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static) -> Mock {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let seen = Arc::new(Mutex::new(Vec::new()));
            let log = seen.clone();
            let route: Arc<Route> = Arc::new(route);
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { continue };
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or("").to_string();
                    let target = parts.next().unwrap_or("").to_string();
                    let (mut len, mut auth, mut content_type, mut expect) =
                        (0usize, None, None, false);
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let (k, v) = h.split_once(':').unwrap();
                        match k.to_ascii_lowercase().as_str() {
                            "content-length" => len = v.trim().parse().unwrap(),
                            "authorization" => auth = Some(v.trim().to_string()),
                            "content-type" => content_type = Some(v.trim().to_string()),
                            "expect" => expect = v.trim().eq_ignore_ascii_case("100-continue"),
                            _ => {}
                        }
                    }
                    if expect {
                        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
                    }
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    let req = Seen {
                        method,
                        target,
                        auth,
                        content_type,
                        expect,
                        body,
                    };
                    let (status, text) = route(&req);
                    log.lock().unwrap().push(req);
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                        text.len()
                    );
                }
            });
            Mock { url, seen }
        }

        /// Always answers `status` with `body`.
        fn fixed(status: u16, body: Value) -> Mock {
            let text = body.to_string();
            Mock::start(move |_| (status, text.clone()))
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }

        /// Runs `fleetctl --server <mock> --token t ARGS`.
        fn run(&self, args: &[&str]) -> Result<Output, CtlError> {
            self.run_with(&["--token", "t"], args)
        }

        fn run_with(&self, global: &[&str], args: &[&str]) -> Result<Output, CtlError> {
            let mut argv = vec!["fleetctl", "--server", &self.url];
            argv.extend_from_slice(global);
            argv.extend_from_slice(args);
            execute(Cli::try_parse_from(argv).unwrap())
        }
    }

    fn code(r: Result<Output, CtlError>) -> (i32, String) {
        let e = r.unwrap_err();
        (e.exit_code(), e.render())
    }

    fn device() -> Value {
        json!({
            "id": "dev-001", "tags": {"site": "plant-a", "line": "3"}, "agent_version": "0.1.0",
            "models": [{"name": "pdm", "version": "1.2.0", "release": 7, "role": "active", "phase": "committed"}],
            "online": true, "last_seen_ms": 1_764_182_529_000u64, "online_since_ms": 1_764_180_000_000u64,
            "health": {"cpu": 0.25},
            "ingest": {"received": {"telemetry": 120, "drift": 3, "health": 10, "event": 4},
                       "duplicates": 5, "last_seq": 137, "gaps": 1,
                       "dropped_reported": {"telemetry": {"cap": 3, "ttl": 1, "io": 0}}, "epoch": 2}
        })
    }

    fn quiet_device() -> Value {
        json!({
            "id": "dev-002", "tags": {"site": "plant-a"}, "agent_version": "0.1.0", "models": [],
            "online": false, "last_seen_ms": null, "online_since_ms": null, "health": null, "ingest": null
        })
    }

    fn bundle(state: &str) -> Value {
        json!({
            "name": "pdm", "version": "1.2.0", "release": 7, "sha256": "ab".repeat(32), "bytes": 4096,
            "signer": "k-7f3a", "uploaded_by": "ci", "uploaded_at_ms": 1_764_182_529_000u64,
            "signoff": {"requirements": [{"requirement": "accuracy>=0.9", "measured": 0.93, "met": true},
                                         {"requirement": "recall>=0.8", "measured": 0.75, "met": false}],
                        "approvals_needed": 1, "approved_by": [], "state": state,
                        "problems": if state == "blocked" { json!(["recall>=0.8: measured 0.7500"]) } else { json!([]) }}
        })
    }

    fn rollout(state: &str) -> Value {
        json!({
            "id": "r-1", "bundle": {"name": "pdm", "version": "1.2.0", "release": 7, "sha256": "cd".repeat(32)},
            "target": "site=plant-a", "state": state,
            "halt_reason": if state == "halted" { json!("wave 0: 1 of 1 devices failed (threshold 5%)") } else { Value::Null },
            "waves": [
                {"index": 0, "size": 1, "devices": ["dev-001"], "state": "promoted", "started_at_ms": 1_764_182_529_000u64,
                 "deadline_ms": 1_764_184_329_000u64, "succeeded": 1, "failed": 0, "in_progress": 0},
                {"index": 1, "size": 2, "devices": ["dev-002", "dev-003"], "state": "running", "started_at_ms": 1_764_182_600_000u64,
                 "deadline_ms": 1_764_184_400_000u64, "succeeded": 0, "failed": 1, "in_progress": 1}
            ],
            "current_wave": 1, "success_threshold": 0.95, "failure_threshold": 0.05, "wave_timeout_secs": 1800,
            "created_by": "ops", "created_at_ms": 1_764_182_500_000u64, "updated_at_ms": 1_764_182_700_000u64,
            "devices": {
                "dev-003": {"wave": 1, "state": "downloading", "reason": null, "directive": "d-3", "updated_at_ms": 1_764_182_650_000u64},
                "dev-001": {"wave": 0, "state": "committed", "reason": null, "directive": "d-1", "updated_at_ms": 1_764_182_560_000u64},
                "dev-002": {"wave": 1, "state": "failed", "reason": "install_rejected: golden mismatch", "directive": "d-2", "updated_at_ms": 1_764_182_640_000u64}
            }
        })
    }

    #[test]
    fn devices_list_sends_the_filters_and_renders_counters() {
        let mock = Mock::fixed(200, json!({"devices": [device(), quiet_device()]}));
        let out = mock
            .run(&[
                "devices",
                "list",
                "--selector",
                "site=plant-a, line=3",
                "--online",
            ])
            .unwrap();
        let req = &mock.seen()[0];
        assert_eq!(req.method, "GET");
        assert_eq!(
            req.target,
            "/v1/devices?selector=site%3Dplant-a%2Cline%3D3&online=true"
        );
        assert_eq!(req.auth.as_deref(), Some("Bearer t"));
        assert_eq!(
            out.json["devices"][0],
            device(),
            "--json prints the server's JSON"
        );
        let lines: Vec<&str> = out.human.lines().collect();
        assert!(
            lines[0].starts_with("ID       ONLINE  LAST SEEN"),
            "{}",
            out.human
        );
        for want in [
            "dev-001",
            "yes",
            "2025-11-26T18:42:09Z",
            "pdm@1.2.0 (committed)",
            "line=3,site=plant-a",
            "120/3/10/4",
            "137",
            " 4",
        ] {
            assert!(lines[1].contains(want), "{want:?} in {:?}", lines[1]);
        }
        assert!(lines[2].starts_with("dev-002  no "), "{:?}", lines[2]);
        assert!(
            lines[3].starts_with("2 device(s), 1 online."),
            "{:?}",
            lines[3]
        );
        // the columns line up
        let col = lines[0].find("RECEIVED").unwrap();
        assert_eq!(&lines[1][col..col + 10], "120/3/10/4");

        mock.run(&["devices", "list", "--offline"]).unwrap();
        assert_eq!(mock.seen()[1].target, "/v1/devices?online=false");
    }

    #[test]
    fn devices_show_names_every_ingest_counter() {
        let mock = Mock::fixed(200, device());
        let out = mock.run(&["devices", "show", "dev/001"]).unwrap();
        assert_eq!(mock.seen()[0].target, "/v1/devices/dev%2F001");
        let h = &out.human;
        for want in [
            "device      dev-001\n",
            "online      yes, since 2025-11-26T18:00:00Z\n",
            "health      {\"cpu\":0.25}\n",
            "  pdm   1.2.0    7        active  committed\n",
            "ingest (outbox epoch 2)\n",
            "  received            telemetry 120, drift 3, health 10, event 4\n",
            "  duplicates ignored  5\n",
            "  highest contiguous  seq 137\n",
            "  gaps                1\n",
            "  dropped (reported)  telemetry: cap 3, ttl 1, io 0",
        ] {
            assert!(h.contains(want), "{want:?} in\n{h}");
        }
        let quiet = Mock::fixed(200, quiet_device());
        let h = quiet.run(&["devices", "show", "dev-002"]).unwrap().human;
        assert!(
            h.contains("online      no\n")
                && h.contains("  none reported\n")
                && h.ends_with("no records received yet"),
            "{h}"
        );
    }

    #[test]
    fn http_errors_map_to_exit_codes_with_the_servers_message() {
        for (status, want_code, kind) in [
            (401, EXIT_NO_PERM, "unauthorized"),
            (403, EXIT_NO_PERM, "forbidden"),
            (404, EXIT_NOT_FOUND, "not_found"),
            (409, crate::ctl::EXIT_DATA, "conflict"),
            (422, crate::ctl::EXIT_DATA, "refused"),
            (500, EXIT_SERVER, "server"),
        ] {
            let msg = format!("status {status} because of device \"dev-9\"");
            let mock = Mock::fixed(status, json!({"error": msg}));
            let err = mock.run(&["devices", "show", "dev-9"]).unwrap_err();
            assert_eq!(err.exit_code(), want_code, "{status}");
            let text = err.render();
            assert!(
                text.contains(&msg)
                    && text.contains(&format!("HTTP {status}"))
                    && text.contains(&mock.url),
                "{text}"
            );
            let j = err.to_json();
            assert_eq!(j["error"]["kind"], kind);
            assert_eq!(j["error"]["status"], status);
            assert_eq!(j["error"]["server"]["error"], msg.as_str());
        }
        // a 401 without any token says how to give one
        let mock = Mock::fixed(401, json!({"error": "missing bearer token"}));
        let (c, text) = code(mock.run_with(&[], &["bundle", "list"]));
        assert_eq!(c, EXIT_NO_PERM);
        assert!(
            text.contains("missing bearer token") && text.contains("--token-file"),
            "{text}"
        );
        // an answer that is not JSON, or a JSON answer without the expected list
        let mock = Mock::start(|_| (200, "<html>proxy</html>".into()));
        let (c, text) = code(mock.run(&["devices", "list"]));
        assert_eq!(c, EXIT_PROTOCOL, "{text}");
        assert!(
            text.contains("not JSON") && text.contains("<html>proxy</html>"),
            "{text}"
        );
        let mock = Mock::fixed(200, json!({"items": []}));
        let (c, text) = code(mock.run(&["rollout", "list"]));
        assert_eq!(c, EXIT_PROTOCOL);
        assert!(text.contains("\"rollouts\""), "{text}");
    }

    #[test]
    fn unreachable_server_is_69_naming_the_url_and_bad_urls_are_usage_errors() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let cli = Cli::try_parse_from(["fleetctl", "--server", &url, "devices", "list"]).unwrap();
        let (c, text) = code(execute(cli));
        assert_eq!(c, EXIT_UNAVAILABLE);
        assert!(text.contains(&url), "{text}");
        let cli =
            Cli::try_parse_from(["fleetctl", "--server", "ftp://x", "bundle", "list"]).unwrap();
        let (c, text) = code(execute(cli));
        assert_eq!(c, crate::ctl::EXIT_USAGE);
        assert!(text.contains("--server \"ftp://x\""), "{text}");
    }

    #[test]
    fn token_comes_from_the_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin-token");
        std::fs::write(&file, "s3cret-token\n").unwrap();
        let mock = Mock::fixed(200, json!({"bundles": []}));
        mock.run_with(
            &["--token-file", file.to_str().unwrap()],
            &["bundle", "list"],
        )
        .unwrap();
        assert_eq!(mock.seen()[0].auth.as_deref(), Some("Bearer s3cret-token"));
        let missing = dir.path().join("nope");
        let (c, text) = code(mock.run_with(
            &["--token-file", missing.to_str().unwrap()],
            &["bundle", "list"],
        ));
        assert_eq!(c, crate::ctl::EXIT_NO_INPUT);
        assert!(text.contains("nope"), "{text}");
        std::fs::write(&file, "  \n").unwrap();
        let (c, text) = code(mock.run_with(
            &["--token-file", file.to_str().unwrap()],
            &["bundle", "list"],
        ));
        assert_eq!(c, crate::ctl::EXIT_NO_INPUT);
        assert!(text.contains("empty"), "{text}");
        assert_eq!(mock.seen().len(), 1, "nothing sent without a usable token");
    }

    #[test]
    fn bundle_push_streams_the_file_and_reports_the_signoff_state() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pdm.bundle");
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&file, &bytes).unwrap();
        let mock = Mock::fixed(201, bundle("awaiting_approval"));
        let out = mock
            .run(&["bundle", "push", file.to_str().unwrap()])
            .unwrap();
        let req = &mock.seen()[0];
        assert_eq!(
            (req.method.as_str(), req.target.as_str()),
            ("POST", "/v1/bundles")
        );
        assert_eq!(
            req.content_type.as_deref(),
            Some("application/octet-stream")
        );
        assert!(req.body == bytes, "the body is the file, byte for byte");
        assert!(req.expect, "uploads wait for 100 Continue");
        assert!(
            out.human
                .starts_with("stored pdm@1.2.0 (release 7, 4096 bytes, sha256 abab"),
            "{}",
            out.human
        );
        assert!(
            out.human
                .contains("signoff: awaiting_approval; approvals needed 1, approved by nobody yet"),
            "{}",
            out.human
        );
        assert!(
            out.human.contains("fleetctl bundle approve pdm@1.2.0"),
            "{}",
            out.human
        );

        let again = Mock::fixed(200, bundle("ready"));
        let out = again
            .run(&["bundle", "push", file.to_str().unwrap()])
            .unwrap();
        assert!(
            out.human.starts_with("already stored pdm@1.2.0"),
            "{}",
            out.human
        );

        let (c, text) = code(again.run(&["bundle", "push", "/no/such.bundle"]));
        assert_eq!(c, crate::ctl::EXIT_NO_INPUT);
        assert!(text.contains("/no/such.bundle"), "{text}");
        assert_eq!(again.seen().len(), 1);
    }

    /// A hand-written HTTP/1.1 server on loopback (its URL): for every connection it reads
    /// the request head and calls `answer` with the connection, the reader positioned at
    /// the body, and the body's Content-Length.
    fn raw_server(
        answer: impl Fn(&mut std::net::TcpStream, &mut BufReader<std::net::TcpStream>, usize)
            + Send
            + 'static,
    ) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                answer(&mut conn, &mut reader, len);
            }
        });
        url
    }

    #[test]
    fn an_early_refusal_during_an_upload_is_reported() {
        // the server answers 403 after the headers, without reading the 8 MiB body, and
        // closes its side (then discards what still arrives, as real servers linger, so the
        // answer is not lost to a reset)
        let url = raw_server(|conn, reader, _| {
            let body =
                r#"{"error":"token \"viewer\" has role \"viewer\"; this needs \"operator\""}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.shutdown(std::net::Shutdown::Write);
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(10)));
            let _ = std::io::copy(reader, &mut std::io::sink());
        });
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.bundle");
        std::fs::write(&file, vec![7u8; 8 << 20]).unwrap();
        let cli = Cli::try_parse_from([
            "fleetctl",
            "--server",
            &url,
            "--token",
            "v",
            "bundle",
            "push",
            file.to_str().unwrap(),
        ])
        .unwrap();
        let (c, text) = code(execute(cli));
        assert_eq!(c, EXIT_NO_PERM, "{text}");
        assert!(text.contains("needs \"operator\""), "{text}");
    }

    #[test]
    fn a_refusal_whose_body_is_cut_off_is_still_a_refusal() {
        // 403 with a body shorter than its Content-Length, then the connection closes
        let url = raw_server(|conn, _, _| {
            let _ = write!(
                conn,
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"err"
            );
        });
        let cli = Cli::try_parse_from([
            "fleetctl", "--server", &url, "--token", "v", "devices", "list",
        ])
        .unwrap();
        let (c, text) = code(execute(cli));
        assert_eq!(c, EXIT_NO_PERM, "{text}");
        assert!(text.contains("403"), "{text}");
    }

    #[test]
    fn an_upload_goes_ahead_when_the_server_ignores_expect() {
        // an HTTP/1.0-style server: never sends 100 Continue, reads the body, answers 201
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let url = raw_server(move |conn, reader, len| {
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            *sink.lock().unwrap() = body;
            let b = bundle("ready").to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 201 Created\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            );
        });
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pdm.bundle");
        std::fs::write(&file, b"bundle bytes").unwrap();
        let cli = Cli::try_parse_from([
            "fleetctl",
            "--server",
            &url,
            "--token",
            "t",
            "bundle",
            "push",
            file.to_str().unwrap(),
        ])
        .unwrap();
        let out = execute(cli).unwrap();
        assert!(out.human.starts_with("stored pdm@1.2.0"), "{}", out.human);
        assert_eq!(got.lock().unwrap().as_slice(), b"bundle bytes");
    }

    #[test]
    fn bundle_list_show_and_approve() {
        let mock = Mock::start(|r| match (r.method.as_str(), r.target.as_str()) {
            ("GET", "/v1/bundles") => (
                200,
                json!({"bundles": [bundle("ready"), bundle("blocked")]}).to_string(),
            ),
            ("GET", "/v1/bundles/pdm/1.2.0") => (200, bundle("blocked").to_string()),
            ("POST", "/v1/bundles/pdm/1.2.0/approve") => {
                let mut b = bundle("ready");
                b["signoff"]["approved_by"] = json!(["alice"]);
                (200, b.to_string())
            }
            _ => (404, json!({"error": "no such bundle"}).to_string()),
        });
        let out = mock.run(&["bundle", "list"]).unwrap();
        let lines: Vec<&str> = out.human.lines().collect();
        assert!(
            lines[0].starts_with("NAME  VERSION  RELEASE  STATE    SIGNER"),
            "{}",
            out.human
        );
        assert!(lines[1].starts_with("pdm   1.2.0    7        ready    k-7f3a  ci           2025-11-26T18:42:09Z  abababababab  4096"), "{}", out.human);
        assert!(lines[2].contains("blocked"));
        assert_eq!(lines[3], "2 bundle(s)");

        let out = mock.run(&["bundle", "show", "pdm@1.2.0"]).unwrap();
        for want in [
            "bundle    pdm@1.2.0\n",
            "  accuracy>=0.9  0.9300    yes\n",
            "  recall>=0.8    0.7500    no\n",
            "signoff: blocked",
            "problem: recall>=0.8: measured 0.7500",
        ] {
            assert!(out.human.contains(want), "{want:?} in\n{}", out.human);
        }
        let out = mock.run(&["bundle", "approve", "pdm@1.2.0"]).unwrap();
        assert!(
            out.human.starts_with(
                "approved pdm@1.2.0\nsignoff: ready; approvals needed 1, approved by alice"
            ),
            "{}",
            out.human
        );
        assert_eq!(mock.seen()[2].method, "POST");

        let (c, text) = code(mock.run(&["bundle", "show", "pdm"]));
        assert_eq!(c, crate::ctl::EXIT_USAGE);
        assert!(text.contains("NAME@VERSION"), "{text}");
        let (c, _) = code(mock.run(&["bundle", "show", "other@1"]));
        assert_eq!(c, EXIT_NOT_FOUND);
        assert_eq!(mock.seen().len(), 4, "the bad spec was not sent");
    }

    #[test]
    fn rollout_create_checks_flags_locally_then_sends_the_contract_body() {
        let mock = Mock::fixed(201, rollout("running"));
        let good = [
            "rollout",
            "create",
            "--bundle",
            "pdm@1.2.0",
            "--target",
            "site=plant-a,line=3",
            "--waves",
            "1%,10%,50%,100%",
            "--success-threshold",
            "95%",
            "--failure-threshold",
            "0.05",
            "--wave-timeout",
            "30m",
        ];
        let out = mock.run(&good).unwrap();
        let req = &mock.seen()[0];
        assert_eq!(
            (req.method.as_str(), req.target.as_str()),
            ("POST", "/v1/rollouts")
        );
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(
            body,
            json!({"bundle": "pdm@1.2.0", "target": "site=plant-a,line=3", "waves": ["1%", "10%", "50%", "100%"],
                   "success_threshold": "95%", "failure_threshold": "0.05", "wave_timeout": "30m"})
        );
        assert!(
            out.human
                .starts_with("created rollout r-1\nrollout    r-1: running\n"),
            "{}",
            out.human
        );

        for (flag, value, why) in [
            ("--bundle", "pdm", "NAME@VERSION"),
            ("--target", "site", "not KEY=VALUE"),
            ("--target", "site=a,site=b", "appears twice"),
            ("--waves", "10%,5%", "not larger"),
            ("--waves", "0,5", "at least one device"),
            ("--waves", "150%", "at most 100"),
            ("--waves", "ten", "neither N% nor a device count"),
            ("--success-threshold", "120%", "between 0% and 100%"),
            ("--failure-threshold", "lots", "percentage"),
            ("--wave-timeout", "30", "90s, 30m or 2h"),
            ("--wave-timeout", "0s", "above zero"),
        ] {
            let mut args: Vec<&str> = good.to_vec();
            let i = args.iter().position(|a| *a == flag).unwrap();
            args[i + 1] = value;
            let (c, text) = code(mock.run(&args));
            assert_eq!(c, crate::ctl::EXIT_USAGE, "{flag} {value}: {text}");
            assert!(
                text.starts_with(flag) && text.contains(why),
                "{flag} {value}: {text}"
            );
        }
        assert_eq!(mock.seen().len(), 1, "nothing sent for bad flags");
        // a missing required flag is clap's usage error
        assert!(Cli::try_parse_from(["fleetctl", "rollout", "create", "--bundle", "a@1"]).is_err());
    }

    #[test]
    fn rollout_status_list_and_actions() {
        let mock = Mock::start(|r| match (r.method.as_str(), r.target.as_str()) {
            ("GET", "/v1/rollouts") => (200, json!({"rollouts": [rollout("running")]}).to_string()),
            ("GET", "/v1/rollouts/r-1") => (200, rollout("running").to_string()),
            ("POST", "/v1/rollouts/r-1/pause") => (200, rollout("paused").to_string()),
            ("POST", "/v1/rollouts/r-1/resume") => (
                409,
                json!({"error": "rollout r-1 is running, not paused"}).to_string(),
            ),
            ("POST", "/v1/rollouts/r-1/abort") => (200, rollout("aborted").to_string()),
            ("POST", "/v1/rollouts/r-1/rollback") => (200, rollout("rolled_back").to_string()),
            _ => (404, json!({"error": "no rollout"}).to_string()),
        });
        let out = mock.run(&["rollout", "status", "r-1"]).unwrap();
        let h = &out.human;
        for want in [
            "bundle     pdm@1.2.0 (release 7, sha256 cdcdcdcdcdcd)\n",
            "thresholds success 95%, failure 5%; wave timeout 30m\n",
            "WAVE  SIZE  STATE     SUCCEEDED  FAILED  IN PROGRESS  STARTED               DEADLINE\n",
            "1     2     running   0          1       1            ",
            "DEVICE   WAVE  STATE        UPDATED               DIRECTIVE  REASON\n",
            "dev-002  1     failed       2025-11-26T18:44:00Z  d-2        install_rejected: golden mismatch\n",
        ] {
            assert!(h.contains(want), "{want:?} in\n{h}");
        }
        let order: Vec<usize> = ["dev-001  0", "dev-002  1", "dev-003  1"]
            .iter()
            .map(|d| h.find(d).unwrap())
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "devices sorted by wave then id\n{h}"
        );

        let out = mock.run(&["rollout", "list"]).unwrap();
        assert!(
            out.human
                .lines()
                .nth(1)
                .unwrap()
                .starts_with("r-1  running  pdm@1.2.0  site=plant-a  1/2      3 "),
            "{}",
            out.human
        );

        assert_eq!(
            mock.run(&["rollout", "pause", "r-1"]).unwrap().human,
            "rollout r-1: pause accepted, state paused"
        );
        let (c, text) = code(mock.run(&["rollout", "resume", "r-1"]));
        assert_eq!(c, crate::ctl::EXIT_DATA);
        assert!(text.contains("not paused"), "{text}");
        assert!(mock
            .run(&["rollout", "abort", "r-1"])
            .unwrap()
            .human
            .ends_with("state aborted"));
        assert!(mock
            .run(&["rollout", "rollback", "r-1"])
            .unwrap()
            .human
            .ends_with("state rolled_back"));
        let posts: Vec<String> = mock
            .seen()
            .iter()
            .filter(|s| s.method == "POST")
            .map(|s| s.target.clone())
            .collect();
        assert_eq!(
            posts,
            [
                "/v1/rollouts/r-1/pause",
                "/v1/rollouts/r-1/resume",
                "/v1/rollouts/r-1/abort",
                "/v1/rollouts/r-1/rollback"
            ]
        );
    }

    #[test]
    fn rollout_watch_ends_with_the_rollout() {
        let polls = Arc::new(Mutex::new(0));
        let p = polls.clone();
        let mock = Mock::start(move |_| {
            let mut n = p.lock().unwrap();
            *n += 1;
            let state = if *n < 3 { "running" } else { "completed" };
            (200, rollout(state).to_string())
        });
        let out = mock
            .run(&["rollout", "status", "r-1", "--watch", "--interval", "1s"])
            .unwrap();
        assert_eq!(out.json["state"], "completed");
        assert_eq!(*polls.lock().unwrap(), 3);

        let halted = Mock::fixed(200, rollout("halted"));
        let (c, text) = code(halted.run(&["rollout", "status", "r-1", "--watch"]));
        assert_eq!(c, EXIT_ROLLOUT_ENDED);
        assert!(
            text.contains("rollout r-1 ended halted: wave 0: 1 of 1 devices failed"),
            "{text}"
        );
        // without --watch a halted rollout is just shown
        assert!(halted.run(&["rollout", "status", "r-1"]).is_ok());
        assert!(
            Cli::try_parse_from(["fleetctl", "rollout", "status", "r-1", "--interval", "1s"])
                .is_err(),
            "--interval needs --watch"
        );
    }

    #[test]
    fn fleet_rollback_sends_model_target_and_reason() {
        let mock = Mock::fixed(
            200,
            json!({"model": "pdm", "devices": ["dev-001", "dev-002"]}),
        );
        let out = mock
            .run(&[
                "rollback",
                "--model",
                "pdm",
                "--target",
                "site=plant-a",
                "--reason",
                "drift on line 3",
            ])
            .unwrap();
        let req = &mock.seen()[0];
        assert_eq!(req.target, "/v1/rollback");
        assert_eq!(
            serde_json::from_slice::<Value>(&req.body).unwrap(),
            json!({"model": "pdm", "target": "site=plant-a", "reason": "drift on line 3"})
        );
        assert_eq!(
            out.human,
            "rollback of pdm to its previous version sent to 2 device(s): dev-001, dev-002"
        );
        let (c, text) = code(mock.run(&["rollback", "--model", "pdm", "--reason", " "]));
        assert_eq!(c, crate::ctl::EXIT_USAGE);
        assert!(text.starts_with("--reason"), "{text}");
        assert_eq!(mock.seen().len(), 1);
    }

    #[test]
    fn audit_list_and_server_verify() {
        let rec = json!({"v": 1, "seq": 6, "at": "2026-11-26T18:00:00.000Z", "actor": "ci", "role": "operator",
                         "action": "bundle.push", "target": "pdm@1.2.0", "bundle_sha256": "ef".repeat(32),
                         "result": "ok", "details": null, "prev": "0".repeat(64), "hash": "1".repeat(64)});
        let head = json!({"seq": 9, "hash": "9".repeat(64)});
        let ok = json!({"ok": true, "records": 9, "head": head, "problem": null});
        let body = json!({"records": [rec], "head": head}).to_string();
        let mock = Mock::start(move |r| match r.target.as_str() {
            "/v1/audit/verify" => (200, ok.to_string()),
            _ => (200, body.clone()),
        });
        let out = mock
            .run(&["audit", "list", "--after", "5", "--limit", "1"])
            .unwrap();
        assert_eq!(mock.seen()[0].target, "/v1/audit?after=5&limit=1");
        let lines: Vec<&str> = out.human.lines().collect();
        assert_eq!(lines[0], "SEQ  AT                        ACTOR  ROLE      ACTION       TARGET     RESULT  BUNDLE");
        assert_eq!(lines[1], "6    2026-11-26T18:00:00.000Z  ci     operator  bundle.push  pdm@1.2.0  ok      efefefefefef");
        assert_eq!(
            lines[2],
            format!("1 record(s); head seq 9 hash {}", "9".repeat(64))
        );
        let out = mock.run(&["audit", "verify"]).unwrap();
        assert!(
            out.human
                .starts_with("audit log verified: 9 record(s), head seq 9"),
            "{}",
            out.human
        );

        let bad = Mock::fixed(
            200,
            json!({"ok": false, "records": 4, "head": head, "problem": "line 3 (seq 3): the record was edited"}),
        );
        let err = bad.run(&["audit", "verify"]).unwrap_err();
        assert_eq!(err.exit_code(), crate::ctl::EXIT_DATA);
        assert!(
            err.render()
                .contains("line 3 (seq 3): the record was edited"),
            "{}",
            err.render()
        );
        assert_eq!(err.to_json()["error"]["verify"]["records"], 4);
    }

    #[test]
    fn audit_verify_anchor_locally_and_on_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.jsonl");
        let (w, _) = crate::audit::AuditLog::open(&log).unwrap();
        let first = w
            .append(&crate::audit::NewRecord::new(
                "ci",
                "operator",
                "bundle.push",
                "a@1",
                crate::audit::Outcome::Ok,
            ))
            .unwrap();
        w.append(&crate::audit::NewRecord::new(
            "ci",
            "operator",
            "bundle.push",
            "b@1",
            crate::audit::Outcome::Ok,
        ))
        .unwrap();
        drop(w);
        let file = log.to_str().unwrap();
        let good = format!("1:{}", first.hash);
        let mock = Mock::fixed(
            200,
            json!({"ok": true, "records": 2, "head": {"seq": 2, "hash": "0".repeat(64)}, "problem": null}),
        );
        let out = mock
            .run(&["audit", "verify", "--file", file, "--anchor", &good])
            .unwrap();
        assert!(
            out.human.contains("2 record(s)")
                && out.human.contains("seq 1 still has the anchor's hash"),
            "{}",
            out.human
        );
        let other = format!("1:{}", "a".repeat(64));
        let (c, text) = code(mock.run(&["audit", "verify", "--file", file, "--anchor", &other]));
        assert_eq!(c, crate::ctl::EXIT_DATA);
        assert!(text.contains("rewritten"), "{text}");
        let (c, text) = code(mock.run(&["audit", "verify", "--file", file, "--anchor", "1:xyz"]));
        assert_eq!(c, crate::ctl::EXIT_USAGE);
        assert!(text.starts_with("--anchor"), "{text}");
        assert!(mock.seen().is_empty(), "--file asks no server");
        // the server is asked with the anchor as seq and hash
        mock.run(&["audit", "verify", "--anchor", &good]).unwrap();
        assert_eq!(
            mock.seen()[0].target,
            format!("/v1/audit/verify?seq=1&hash={}", first.hash)
        );
    }

    #[test]
    fn flag_parsers() {
        assert_eq!(
            check_selector("--target", " site = a ,line=3").unwrap(),
            "site=a,line=3"
        );
        assert!(check_selector("--target", "a=b=c").is_err());
        assert!(check_selector("--target", "").is_err());
        let w = |s: &str| check_waves(&s.split(',').map(String::from).collect::<Vec<_>>());
        assert_eq!(
            w("1,10%,100%").unwrap(),
            vec![
                WaveSize::Count(1),
                WaveSize::Percent(10.0),
                WaveSize::Percent(100.0)
            ]
        );
        assert!(w("5,5").is_err());
        assert!(w("0%").is_err());
        assert_eq!(parse_share("x", "95%").unwrap(), 0.95);
        assert_eq!(parse_share("x", "0.05").unwrap(), 0.05);
        assert!(parse_share("x", "-1%").is_err());
        assert_eq!(parse_duration("x", "90s").unwrap(), 90);
        assert_eq!(parse_duration("x", "30m").unwrap(), 1800);
        assert_eq!(parse_duration("x", "2h").unwrap(), 7200);
        assert!(parse_duration("x", "1d").is_err());
        assert!(parse_duration("x", "99999999999999999999h").is_err());
        assert_eq!(
            parse_spec("x", "a@b@1").unwrap(),
            ("a@b".into(), "1".into())
        );
        assert_eq!(secs_text(&json!(90)), "90s");
        assert_eq!(pct(&json!(0.955)), "95.5%");
    }
}
