//! The model store: the state directory and the install pipeline (verify, compatibility,
//! load, golden samples, on-device latency, atomic activation) and rollback.
//!
//! Guarantees:
//! - each model name has at most one active version, named by `models/<name>/state.json`,
//!   which is only ever replaced atomically (temporary file, fsync, rename, directory fsync);
//! - a version directory is complete (verified, fsynced) before `state.json` names it;
//! - a crash at any point leaves the previous `state.json`, hence the previous active
//!   version; [`Store::open`] removes staging leftovers and version directories no state
//!   names;
//! - one process changes a store at a time (an exclusive lock on `<state>/lock`).
//!
//! Layout: `lock`, `staging/` (verifier staging), `inbox/`, `events.jsonl` (bounded),
//! `trust-state.json` (highest keyring version seen), `models/<name>/state.json`,
//! `models/<name>/<release>-<sha12>/` (`manifest.json`, `manifest.sig`, the bundle's files).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::Digest;
use shared::bundle::{self, golden, Limits, Manifest};
use shared::engine::Model;
use shared::trust::{format_time, write_atomic, KeyringFile, PublicKey, Trust};
use time::OffsetDateTime;

/// Largest events file before it is rotated (bytes).
const MAX_EVENTS_BYTES: u64 = 4 * 1024 * 1024;
const STATE_FORMAT: u32 = 1;

/// Why an install, rollback or store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("the state directory {0} is in use by another edge-agent process")]
    Locked(String),
    #[error("trust: {0}")]
    Trust(String),
    #[error("rejected: {0}")]
    Rejected(String),
    #[error("incompatible: {0}")]
    Incompatible(String),
    #[error("golden samples failed on this device: {0}")]
    Golden(String),
    #[error("model {0:?} is not installed")]
    UnknownModel(String),
    #[error("model {0:?} has no previous version to roll back to")]
    NoPrevious(String),
    #[error("{path}: corrupt state: {message}")]
    Corrupt { path: String, message: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// One installed version (wire type inside `state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRecord {
    /// Directory name under `models/<name>/`.
    pub dir: String,
    pub release: u64,
    pub version: String,
    /// sha256 of the model file.
    pub model_sha256: String,
    pub installed_at: String,
    pub signer: String,
    /// Single-row latency measured on this device at install (microseconds).
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    /// Resident memory added by loading the model (KiB), when measurable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_kib: Option<u64>,
}

/// A rollback that happened (wire type inside `state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRecord {
    pub at: String,
    pub from_release: u64,
    pub to_release: u64,
    pub reason: String,
}

/// Where a model stands (wire type: `models/<name>/state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelState {
    pub format: u32,
    pub name: String,
    pub active: VersionRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<VersionRecord>,
    /// `health_window` after an activation, `committed` once healthy (or after a rollback).
    pub phase: String,
    pub activated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rollback: Option<RollbackRecord>,
    /// A version installed beside the active one, as a shadow or a traffic split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<CandidateRecord>,
}

/// A candidate version (wire type inside `state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidateRecord {
    /// `shadow` or `split`.
    pub mode: String,
    /// Split: the share of requests (by sticky key) it serves.
    #[serde(default)]
    pub percent: u8,
    pub version: VersionRecord,
}

/// How an install takes part in traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallMode {
    /// Becomes the active version (after validation), with a health window.
    Activate,
    /// Runs beside the active version on the same inputs; outputs only compared.
    Shadow,
    /// Serves this percentage of requests beside the active version.
    Split(u8),
}

/// What an install did.
#[derive(Debug, Clone)]
pub struct InstallReport {
    pub name: String,
    pub release: u64,
    pub version: String,
    pub golden_checked: usize,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    /// The release that was active before, if any.
    pub replaced: Option<u64>,
}

/// A step of the install pipeline, recorded as an event (and a fault-injection point for
/// the crash tests: `EDGE_AGENT_FAULT=<step>` kills the process with SIGKILL there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Verified,
    Compatible,
    Loaded,
    Golden,
    Measured,
    Moved,
    Activated,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Verified => "verified",
            Step::Compatible => "compatible",
            Step::Loaded => "loaded",
            Step::Golden => "golden",
            Step::Measured => "measured",
            Step::Moved => "moved",
            Step::Activated => "activated",
        }
    }
}

fn fault_point(step: Step) {
    fault_point_named(step.name());
}

/// Fault injection for the crash tests: when `EDGE_AGENT_FAULT` equals `name`, the process
/// kills itself with SIGKILL here (install steps use [`Step::name`]; the download worker
/// uses "download").
pub(crate) fn fault_point_named(name: &str) {
    if std::env::var("EDGE_AGENT_FAULT").is_ok_and(|v| v == name) {
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid])
            .status();
        // not reached when kill succeeded
        std::process::abort();
    }
}

/// Where events go besides `events.jsonl` (the service sends them to the outbox).
pub type EventSink = std::sync::Arc<dyn Fn(&str, &str, &serde_json::Value) + Send + Sync>;

/// Rewrites an event's (model, detail) before it is logged and sent (the service adds the
/// fleet directive an install or rollback carries out).
pub type EventTagger =
    std::sync::Arc<dyn Fn(&str, &serde_json::Value) -> (String, serde_json::Value) + Send + Sync>;

/// The state directory, opened and locked.
pub struct Store {
    root: PathBuf,
    trust: Trust,
    limits: Limits,
    latency_runs: u32,
    _lock: File,
    event_sink: Option<EventSink>,
    event_tagger: Option<EventTagger>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// Opening parameters.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub root: PathBuf,
    pub trust_root: PathBuf,
    pub keyring: Option<PathBuf>,
    pub max_bundle_bytes: u64,
    pub latency_runs: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustState {
    keyring_version_seen: u64,
}

fn make_private_dir(path: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(path).map_err(io(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))?;
    }
    Ok(())
}

fn sync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io(path))
}

fn now() -> String {
    format_time(OffsetDateTime::now_utc())
}

fn version_tuple(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.split(['-', '+']).next()?;
    let mut it = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((
        it.next()??,
        it.next().flatten().unwrap_or(0),
        it.next().flatten().unwrap_or(0),
    ))
}

/// Current resident set size of this process (KiB), on Linux.
pub fn rss_kib() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4)
}

impl Store {
    /// Opens (creating) the state directory, takes its lock, loads trust (recording a newer
    /// keyring version, refusing an older one), removes staging leftovers and version
    /// directories no state names.
    pub fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let root = cfg.root.clone();
        make_private_dir(&root)?;
        let lock_path = root.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(root.display().to_string()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        for d in ["staging", "inbox", "models"] {
            make_private_dir(&root.join(d))?;
        }
        let root_key =
            PublicKey::load(&cfg.trust_root).map_err(|e| StoreError::Trust(e.to_string()))?;
        let trust_state_path = root.join("trust-state.json");
        let mut ts: TrustState = match std::fs::read(&trust_state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                path: trust_state_path.display().to_string(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TrustState::default(),
            Err(e) => return Err(io(&trust_state_path)(e)),
        };
        let trust = match &cfg.keyring {
            Some(k) => {
                let file = KeyringFile::load(k).map_err(|e| StoreError::Trust(e.to_string()))?;
                let t = Trust::with_keyring(root_key, &file, ts.keyring_version_seen)
                    .map_err(|e| StoreError::Trust(format!("{}: {e}", k.display())))?;
                let v = t.keyring.as_ref().map_or(0, |r| r.version);
                if v > ts.keyring_version_seen {
                    ts.keyring_version_seen = v;
                    let bytes = serde_json::to_vec(&ts).unwrap_or_default();
                    write_atomic(&trust_state_path, &bytes, false)
                        .map_err(io(&trust_state_path))?;
                }
                t
            }
            None => Trust::root_only(root_key),
        };
        let store = Store {
            root,
            trust,
            limits: Limits {
                max_total_bytes: cfg.max_bundle_bytes,
                ..Limits::default()
            },
            latency_runs: cfg.latency_runs.max(1),
            _lock: lock,
            event_sink: None,
            event_tagger: None,
        };
        store.recover()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes what an interrupted install left: staging directories, temporary files, and
    /// version directories that no `state.json` names.
    fn recover(&self) -> Result<(), StoreError> {
        let staging = self.root.join("staging");
        for e in std::fs::read_dir(&staging).map_err(io(&staging))? {
            let p = e.map_err(io(&staging))?.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
        let models = self.root.join("models");
        for e in std::fs::read_dir(&models).map_err(io(&models))? {
            let dir = e.map_err(io(&models))?.path();
            if !dir.is_dir() {
                continue;
            }
            let state = read_state(&dir.join("state.json"))?;
            let keep: Vec<String> = state
                .iter()
                .flat_map(|s| {
                    std::iter::once(s.active.dir.clone())
                        .chain(s.previous.as_ref().map(|p| p.dir.clone()))
                        .chain(s.candidate.as_ref().map(|c| c.version.dir.clone()))
                })
                .collect();
            for v in std::fs::read_dir(&dir).map_err(io(&dir))? {
                let v = v.map_err(io(&dir))?;
                let name = v.file_name().to_string_lossy().into_owned();
                let p = v.path();
                if p.is_dir() && !keep.contains(&name) {
                    std::fs::remove_dir_all(&p).map_err(io(&p))?;
                } else if name.starts_with(".tmp-") {
                    let _ = std::fs::remove_file(&p);
                }
            }
            if state.is_none()
                && std::fs::read_dir(&dir)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false)
            {
                let _ = std::fs::remove_dir(&dir);
            }
        }
        Ok(())
    }

    /// Sends every later event to `sink` as well.
    pub fn set_event_sink(&mut self, sink: EventSink) {
        self.event_sink = Some(sink);
    }

    /// Rewrites every later event with `tagger` (in `events.jsonl` and for the sink alike).
    pub fn set_event_tagger(&mut self, tagger: EventTagger) {
        self.event_tagger = Some(tagger);
    }

    /// Appends an event to `events.jsonl` (rotated to `events.1.jsonl` beyond 4 MiB) and
    /// hands it to the event sink.
    pub fn event(&self, model: &str, event: &str, detail: serde_json::Value) {
        let (model, detail) = match &self.event_tagger {
            Some(tag) => tag(model, &detail),
            None => (model.to_string(), detail),
        };
        let model = model.as_str();
        if let Some(sink) = &self.event_sink {
            sink(model, event, &detail);
        }
        let path = self.root.join("events.jsonl");
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > MAX_EVENTS_BYTES) {
            let _ = std::fs::rename(&path, self.root.join("events.1.jsonl"));
        }
        let line =
            serde_json::json!({"at": now(), "model": model, "event": event, "detail": detail});
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            let _ = writeln!(f, "{line}");
        }
    }

    /// Every model's state, by name.
    pub fn status(&self) -> Result<Vec<ModelState>, StoreError> {
        status_of(&self.root)
    }

    fn model_dir(&self, name: &str) -> PathBuf {
        self.root.join("models").join(name)
    }

    /// Runs the install pipeline on `bundle`; `source` names where it came from (a path,
    /// `inbox`, `fleet`). On any failure nothing changes but the event log.
    pub fn install(&self, bundle_path: &Path, source: &str) -> Result<InstallReport, StoreError> {
        self.install_as(bundle_path, source, InstallMode::Activate)
    }

    /// [`Store::install`] as a shadow or split candidate, or as the active version.
    pub fn install_as(
        &self,
        bundle_path: &Path,
        source: &str,
        mode: InstallMode,
    ) -> Result<InstallReport, StoreError> {
        let result = self.install_inner(bundle_path, source, mode);
        if let Err(e) = &result {
            self.event("", "install_rejected", serde_json::json!({"bundle": bundle_path.display().to_string(), "source": source, "reason": e.to_string()}));
        }
        result
    }

    fn install_inner(
        &self,
        bundle_path: &Path,
        source: &str,
        mode: InstallMode,
    ) -> Result<InstallReport, StoreError> {
        let staging_parent = self.root.join("staging");
        let verified = bundle::verify(
            bundle_path,
            &self.trust,
            &self.limits,
            Some(&staging_parent),
            OffsetDateTime::now_utc(),
        )
        .map_err(|e| match e {
            bundle::BundleError::Read { path, source } => StoreError::Io {
                path,
                message: source.to_string(),
            },
            other => StoreError::Rejected(other.to_string()),
        })?;
        let m = verified.manifest.clone();
        let Some(staging) = verified.staging else {
            return Err(StoreError::Rejected("verification kept no files".into()));
        };
        self.event(&m.name, "verified", serde_json::json!({"release": m.release, "signer": verified.signer.to_string(), "source": source}));
        fault_point(Step::Verified);

        // Compatibility: agent version, release order.
        let ours = env!("CARGO_PKG_VERSION");
        match (
            version_tuple(&m.compatibility.min_agent_version),
            version_tuple(ours),
        ) {
            (Some(need), Some(have)) if need <= have => {}
            _ => {
                return Err(StoreError::Incompatible(format!(
                    "the bundle needs edge-agent {} or newer, this is {ours}",
                    m.compatibility.min_agent_version
                )))
            }
        }
        let current = read_state(&self.model_dir(&m.name).join("state.json"))?;
        if mode != InstallMode::Activate && current.is_none() {
            return Err(StoreError::Rejected(format!(
                "{:?} has no active version to run a shadow or split beside; install it normally first",
                m.name
            )));
        }
        if let InstallMode::Split(p) = mode {
            if p == 0 || p > 100 {
                return Err(StoreError::Rejected(format!("split {p}%: use 1 to 100")));
            }
        }
        if let Some(cur) = &current {
            if cur.active.release == m.release && cur.active.model_sha256 == sha_of(&m) {
                return Err(StoreError::Rejected(format!(
                    "{} release {} is already active",
                    m.name, m.release
                )));
            }
            if m.release <= cur.active.release && !m.allow_downgrade {
                return Err(StoreError::Rejected(format!(
                    "release {} of {:?} is not higher than the active release {} (build a higher release, or a signed rollback bundle with --allow-downgrade)",
                    m.release, m.name, cur.active.release
                )));
            }
        }
        self.event(
            &m.name,
            "compatible",
            serde_json::json!({"release": m.release}),
        );
        fault_point(Step::Compatible);

        // Keep the signed manifest beside the files, so the version directory is complete.
        for (name, bytes) in [
            (bundle::MANIFEST_NAME, verified.manifest_bytes.clone()),
            (
                bundle::SIGNATURE_NAME,
                serde_json::to_vec_pretty(&verified.signature).unwrap_or_default(),
            ),
        ] {
            let p = staging.path().join(name);
            let mut f = File::create(&p).map_err(io(&p))?;
            f.write_all(&bytes)
                .and_then(|()| f.sync_all())
                .map_err(io(&p))?;
        }

        // Load and validate on this hardware.
        let rss_before = rss_kib();
        let model = Model::load(&staging.file(&m.model))
            .map_err(|e| StoreError::Incompatible(format!("model: {e}")))?;
        let memory_kib = rss_before.zip(rss_kib()).map(|(a, b)| b.saturating_sub(a));
        self.event(
            &m.name,
            "loaded",
            serde_json::json!({"release": m.release, "memory_kib": memory_kib}),
        );
        fault_point(Step::Loaded);
        let checked = golden::check(&model, &m.golden).map_err(StoreError::Golden)?;
        self.event(
            &m.name,
            "golden_passed",
            serde_json::json!({"release": m.release, "samples": checked}),
        );
        fault_point(Step::Golden);
        let (p50, p99) = measure_latency(&model, &m, self.latency_runs)?;
        self.event(
            &m.name,
            "measured",
            serde_json::json!({"release": m.release, "latency_p50_us": p50, "latency_p99_us": p99}),
        );
        fault_point(Step::Measured);

        // Move the complete version into place, then switch the state atomically.
        let dir_name = format!("{}-{}", m.release, &sha_of(&m)[..12]);
        let model_dir = self.model_dir(&m.name);
        make_private_dir(&model_dir)?;
        let target = model_dir.join(&dir_name);
        if target.exists() {
            // the same release and content installed earlier (e.g. the previous version)
            std::fs::remove_dir_all(&target).map_err(io(&target))?;
        }
        let staged = staging.keep();
        std::fs::rename(&staged, &target).map_err(io(&target))?;
        sync_dir(&model_dir)?;
        fault_point(Step::Moved);

        let record = VersionRecord {
            dir: dir_name,
            release: m.release,
            version: m.version.clone(),
            model_sha256: sha_of(&m),
            installed_at: now(),
            signer: verified.signer.to_string(),
            latency_p50_us: p50,
            latency_p99_us: p99,
            memory_kib,
        };
        let replaced = current.as_ref().map(|c| c.active.release);
        let state = match (mode, current) {
            (InstallMode::Activate, current) => ModelState {
                format: STATE_FORMAT,
                name: m.name.clone(),
                active: record,
                previous: current.map(|c| c.active),
                phase: "health_window".into(),
                activated_at: now(),
                last_rollback: None,
                candidate: None,
            },
            (InstallMode::Shadow | InstallMode::Split(_), Some(mut cur)) => {
                cur.candidate = Some(CandidateRecord {
                    mode: if mode == InstallMode::Shadow {
                        "shadow"
                    } else {
                        "split"
                    }
                    .into(),
                    percent: match mode {
                        InstallMode::Split(p) => p,
                        _ => 0,
                    },
                    version: record,
                });
                cur
            }
            (_, None) => return Err(StoreError::Rejected("no active version".into())),
        };
        self.write_state(&state)?;
        let what = match mode {
            InstallMode::Activate => "activated",
            InstallMode::Shadow => "shadow_started",
            InstallMode::Split(_) => "split_started",
        };
        self.event(
            &m.name,
            what,
            serde_json::json!({"release": m.release, "replaced": replaced}),
        );
        fault_point(Step::Activated);
        self.gc(&state)?;
        Ok(InstallReport {
            name: m.name,
            release: m.release,
            version: m.version,
            golden_checked: checked,
            latency_p50_us: p50,
            latency_p99_us: p99,
            replaced,
        })
    }

    fn write_state(&self, state: &ModelState) -> Result<(), StoreError> {
        let dir = self.model_dir(&state.name);
        let path = dir.join("state.json");
        let mut bytes = serde_json::to_vec_pretty(state).unwrap_or_default();
        bytes.push(b'\n');
        write_atomic(&path, &bytes, false).map_err(io(&path))?;
        sync_dir(&dir)
    }

    /// Removes version directories that are neither active nor previous.
    fn gc(&self, state: &ModelState) -> Result<(), StoreError> {
        let dir = self.model_dir(&state.name);
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let keep = name == state.active.dir
                || state.previous.as_ref().is_some_and(|p| p.dir == name)
                || state
                    .candidate
                    .as_ref()
                    .is_some_and(|c| c.version.dir == name);
            if e.path().is_dir() && !keep {
                std::fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
            }
        }
        Ok(())
    }

    /// Makes the previous version active again (it stays on disk, so this is instant); the
    /// version rolled back from becomes the previous one. `reason` is recorded.
    pub fn rollback(&self, name: &str, reason: &str) -> Result<ModelState, StoreError> {
        let path = self.model_dir(name).join("state.json");
        let Some(cur) = read_state(&path)? else {
            return Err(StoreError::UnknownModel(name.to_string()));
        };
        let Some(prev) = cur.previous.clone() else {
            return Err(StoreError::NoPrevious(name.to_string()));
        };
        let state = ModelState {
            format: STATE_FORMAT,
            name: name.to_string(),
            last_rollback: Some(RollbackRecord {
                at: now(),
                from_release: cur.active.release,
                to_release: prev.release,
                reason: reason.to_string(),
            }),
            active: prev,
            previous: Some(cur.active),
            phase: "committed".into(),
            activated_at: now(),
            candidate: cur.candidate,
        };
        self.write_state(&state)?;
        self.event(name, "rolled_back", serde_json::json!({"from": state.previous.as_ref().map(|p| p.release), "to": state.active.release, "reason": reason}));
        Ok(state)
    }

    /// Marks the active version healthy after its window.
    pub fn commit(&self, name: &str) -> Result<(), StoreError> {
        let path = self.model_dir(name).join("state.json");
        let Some(mut cur) = read_state(&path)? else {
            return Err(StoreError::UnknownModel(name.to_string()));
        };
        cur.phase = "committed".into();
        self.write_state(&cur)?;
        self.event(
            name,
            "committed",
            serde_json::json!({"release": cur.active.release}),
        );
        Ok(())
    }

    /// Loads the active version of `name`, checking the model file against its record.
    pub fn load_active(&self, name: &str) -> Result<(Manifest, Model), StoreError> {
        let Some(state) = read_state(&self.model_dir(name).join("state.json"))? else {
            return Err(StoreError::UnknownModel(name.to_string()));
        };
        self.load_version(name, &state.active)
    }

    /// Loads the candidate of `name`, if it has one.
    pub fn load_candidate(
        &self,
        name: &str,
    ) -> Result<Option<(CandidateRecord, Manifest, Model)>, StoreError> {
        let Some(state) = read_state(&self.model_dir(name).join("state.json"))? else {
            return Err(StoreError::UnknownModel(name.to_string()));
        };
        let Some(c) = state.candidate else {
            return Ok(None);
        };
        let (m, model) = self.load_version(name, &c.version)?;
        Ok(Some((c, m, model)))
    }

    /// Makes the candidate the active version (with a health window); the active one becomes
    /// the previous one.
    pub fn promote(&self, name: &str) -> Result<ModelState, StoreError> {
        let Some(cur) = read_state(&self.model_dir(name).join("state.json"))? else {
            return Err(StoreError::UnknownModel(name.to_string()));
        };
        let Some(c) = cur.candidate.clone() else {
            return Err(StoreError::Rejected(format!(
                "{name:?} has no shadow or split version to promote"
            )));
        };
        let state = ModelState {
            format: STATE_FORMAT,
            name: name.to_string(),
            active: c.version,
            previous: Some(cur.active),
            phase: "health_window".into(),
            activated_at: now(),
            last_rollback: None,
            candidate: None,
        };
        self.write_state(&state)?;
        self.event(
            name,
            "promoted",
            serde_json::json!({"release": state.active.release}),
        );
        self.gc(&state)?;
        Ok(state)
    }

    /// Removes the candidate of `name`.
    pub fn drop_candidate(&self, name: &str) -> Result<ModelState, StoreError> {
        let Some(mut cur) = read_state(&self.model_dir(name).join("state.json"))? else {
            return Err(StoreError::UnknownModel(name.to_string()));
        };
        let Some(c) = cur.candidate.take() else {
            return Err(StoreError::Rejected(format!(
                "{name:?} has no shadow or split version"
            )));
        };
        self.write_state(&cur)?;
        self.event(
            name,
            "candidate_dropped",
            serde_json::json!({"release": c.version.release}),
        );
        self.gc(&cur)?;
        Ok(cur)
    }

    fn load_version(
        &self,
        name: &str,
        rec: &VersionRecord,
    ) -> Result<(Manifest, Model), StoreError> {
        let vdir = self.model_dir(name).join(&rec.dir);
        let mpath = vdir.join(bundle::MANIFEST_NAME);
        let bytes = std::fs::read(&mpath).map_err(io(&mpath))?;
        let manifest = Manifest::parse(&bytes).map_err(|e| StoreError::Corrupt {
            path: mpath.display().to_string(),
            message: e,
        })?;
        let model_path = vdir.join(&manifest.model);
        let (sha, _) = bundle::write::hash_file(&model_path).map_err(|e| StoreError::Corrupt {
            path: model_path.display().to_string(),
            message: e.to_string(),
        })?;
        if sha != rec.model_sha256 {
            return Err(StoreError::Corrupt {
                path: model_path.display().to_string(),
                message: format!("sha256 is {sha}, installed as {}", rec.model_sha256),
            });
        }
        let model = Model::load(&model_path).map_err(|e| StoreError::Corrupt {
            path: model_path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok((manifest, model))
    }
}

fn sha_of(m: &Manifest) -> String {
    m.files
        .iter()
        .find(|f| f.path == m.model)
        .map(|f| f.sha256.clone())
        .unwrap_or_default()
}

fn read_state(path: &Path) -> Result<Option<ModelState>, StoreError> {
    match std::fs::read(path) {
        Ok(b) => {
            let s: ModelState = serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            Ok(Some(s))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Every model's state under `root`, without taking the lock (for `status` while the service
/// runs): `state.json` files are replaced atomically, so each read is consistent.
pub fn status_of(root: &Path) -> Result<Vec<ModelState>, StoreError> {
    let models = root.join("models");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&models) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(&models)(e)),
    };
    for e in entries {
        let p = e.map_err(io(&models))?.path();
        if let Some(s) = read_state(&p.join("state.json"))? {
            out.push(s);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// One single-row batch per golden sample.
fn golden_batches(model: &Model, m: &Manifest) -> Result<Vec<shared::engine::Batch>, StoreError> {
    let mut batches = Vec::with_capacity(m.golden.samples.len());
    for s in &m.golden.samples {
        let mut b = model.batch_builder();
        b.push_json(&s.input, 1)
            .map_err(|e| StoreError::Golden(e.to_string()))?;
        batches.push(b.take());
    }
    Ok(batches)
}

/// Microseconds one run of `batch` takes: wall clock, or this thread's CPU time.
fn time_run(model: &Model, batch: &shared::engine::Batch, cpu: bool) -> Result<u64, StoreError> {
    let (t, c) = (Instant::now(), crate::runtime::thread_cpu_ns());
    model
        .run(batch)
        .map_err(|e| StoreError::Golden(e.to_string()))?;
    Ok(if cpu {
        crate::runtime::thread_cpu_ns().saturating_sub(c) / 1000
    } else {
        t.elapsed().as_micros() as u64
    })
}

/// The `q` quantile of `times` (sorted in place); 0 when empty.
fn quantile(times: &mut [u64], q: f64) -> u64 {
    times.sort_unstable();
    match times.len() {
        0 => 0,
        n => times[((n - 1) as f64 * q).round() as usize],
    }
}

/// p50 and p99 single-row latency (microseconds) over the golden samples.
fn measure_latency(model: &Model, m: &Manifest, runs: u32) -> Result<(u64, u64), StoreError> {
    if m.golden.samples.is_empty() {
        return Ok((0, 0));
    }
    let batches = golden_batches(model, m)?;
    let mut times = Vec::with_capacity(runs as usize);
    for i in 0..runs as usize {
        times.push(time_run(model, &batches[i % batches.len()], false)?);
    }
    Ok((quantile(&mut times, 0.5), quantile(&mut times, 0.99)))
}

/// Single-row p99 CPU time (microseconds) of two versions measured together, now: runs
/// alternate between them, so both see the same load on this device. The runs are cut into
/// three blocks and each version's p99 is its lowest block p99, so a burst of load that hit
/// one block does not decide. At most `runs` pairs, and no more than `budget` (at least 9
/// pairs). `None` when a version has no golden samples.
pub fn paired_p99(
    old: (&Model, &Manifest),
    new: (&Model, &Manifest),
    runs: u32,
    budget: Duration,
) -> Result<Option<(u64, u64)>, StoreError> {
    if old.1.golden.samples.is_empty() || new.1.golden.samples.is_empty() {
        return Ok(None);
    }
    let (old_batches, new_batches) = (golden_batches(old.0, old.1)?, golden_batches(new.0, new.1)?);
    let start = Instant::now();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..runs.max(9) as usize {
        if i >= 9 && start.elapsed() > budget {
            break;
        }
        a.push(time_run(old.0, &old_batches[i % old_batches.len()], true)?);
        b.push(time_run(new.0, &new_batches[i % new_batches.len()], true)?);
    }
    let block = a.len().div_ceil(3);
    let best = |times: &mut Vec<u64>| {
        times
            .chunks_mut(block)
            .map(|c| quantile(c, 0.99))
            .min()
            .unwrap_or(0)
    };
    Ok(Some((best(&mut a), best(&mut b))))
}

/// sha256 hex of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    shared::trust::hex(&sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(bytes: &[u8]) -> (Model, Manifest) {
        let model = Model::from_bytes(bytes).unwrap();
        let mut m = shared::bundle::testing::manifest("m", &[("model.onnx", bytes)]);
        let mut row = serde_json::Map::new();
        row.insert("a".into(), serde_json::json!(1.5));
        row.insert("b".into(), serde_json::json!(-2.0));
        m.golden.samples.push(shared::bundle::GoldenSample {
            input: row,
            output: serde_json::Map::new(),
        });
        (model, m)
    }

    #[test]
    fn paired_p99_tells_a_much_slower_version_from_the_same_one() {
        let names = Some(&["a", "b"][..]);
        let fast = version(&shared::engine::testing::scaler_model(2, names));
        let same = version(&shared::engine::testing::scaler_model(2, names));
        let slow = version(&shared::engine::testing::slow_model(2, names, 200_000));
        let budget = Duration::from_secs(2);
        let (a, b) = paired_p99((&fast.0, &fast.1), (&slow.0, &slow.1), 50, budget)
            .unwrap()
            .unwrap();
        assert!(b > 10 * a.max(1), "fast {a} us, slow {b} us");
        let (a, b) = paired_p99((&fast.0, &fast.1), (&same.0, &same.1), 200, budget)
            .unwrap()
            .unwrap();
        // the lowest block p99 of the same model: far from a 3x breach
        assert!(b < 3 * a.max(50), "{a} us vs {b} us");
        // no golden samples: nothing to compare
        let empty = shared::bundle::testing::manifest("m", &[]);
        assert_eq!(
            paired_p99((&fast.0, &empty), (&slow.0, &slow.1), 10, budget).unwrap(),
            None
        );
    }
}
