//! The rollout engine: staged rollouts of a bundle to a snapshot of targeted devices in
//! cumulative waves (the first is the canary), promoted only on `committed` (after the
//! device's health window, never on "installed"/"activated"), halted and rolled back when
//! failures pass the threshold, with silent devices failing at the wave deadline; plus
//! operator pause/resume/abort/rollback and fleet-wide rollbacks of a model.
//!
//! Guarantees:
//! - State lives in sled (tree [`TREE`]): a header per rollout (`h/<id>`) and one record per
//!   targeted device (`d/<id>/<index>`). Every transition is written (one atomic, flushed
//!   batch) BEFORE the directives it causes are published, and directive counters are
//!   persisted by the [`Issuer`] before that; a `kill -9` at any point leaves either the
//!   state before the transition (nothing published) or after it (directives possibly not
//!   published: unacknowledged directives are re-sent, see below). [`Rollouts::open`]
//!   resumes from the stored state.
//! - Deadlines are absolute wall-clock milliseconds stored in the header; a restart after a
//!   deadline applies it on the first [`Rollouts::tick`].
//! - A directive not answered (no reply, no event naming it) is re-sent with a fresh counter
//!   and expiry, same id and action, every [`RESEND_AFTER_MS`] on [`Rollouts::tick`] and at
//!   once on [`Rollouts::on_device_online`]. Abort stops every re-send.
//! - A device succeeds only on `committed` of the rollout's model and release. It fails on a
//!   refused install (reply `ok: false`, except an error mentioning "replay": the device saw
//!   that directive already, counted as accepted), `download_failed` / `install_rejected`
//!   naming the directive, `rolled_back` from the release, or still not terminal at the
//!   wave deadline ("silent at deadline").
//! - Failures above `failure_threshold x wave size` halt the rollout at once (no further
//!   wave, rollback directives to the wave's devices that activated or committed the release,
//!   also to those that activate it later), and queue a `RolloutHalted` alert. A wave whose
//!   devices are all terminal is promoted when successes reach `success_threshold x size`,
//!   else the rollout halts too.
//! - Memory and work are bounded: at most [`MAX_TARGETS`] devices and [`MAX_WAVES`] waves per
//!   rollout; per-wave counts are maintained incrementally (an event costs O(1) plus one
//!   flushed write).
//!
//! On a store error the in-memory state may be ahead of the disk; nothing is published, and
//! a restart resumes from the disk.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::directive::{Action, MAX_REASON_BYTES};
use shared::wire::CommandReply;

use crate::alerts::{Alerts, RolloutHalt};
use crate::directives::{IssueError, IssueRequest, Issuer};
use crate::link::{Publisher, COMMANDS_LEAF};
use crate::store::{Batch, Db, StoreError};

/// Sled tree of rollouts and fleet rollbacks.
pub const TREE: &str = "rollouts";
/// Re-send a directive that got no answer after this long (ms).
pub const RESEND_AFTER_MS: u64 = 30_000;
/// Most devices one rollout targets.
pub const MAX_TARGETS: usize = 100_000;
/// Most waves one rollout has.
pub const MAX_WAVES: usize = 32;
/// Longest wave timeout (30 days).
pub const MAX_WAVE_TIMEOUT_SECS: u64 = 30 * 24 * 3600;
const STORE_VERSION: u32 = 1;
const EPS: f64 = 1e-9;
const NEXT_ID_KEY: &str = "next_id";

/// What went wrong; the API maps [`RolloutError::status_class`] to HTTP codes.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
    #[error("target {target:?} matches no device")]
    NoTargets { target: String },
    #[error("target {target:?} matches {count} devices; a rollout takes at most {max}")]
    TooManyTargets {
        target: String,
        count: usize,
        max: usize,
    },
    #[error("no rollout {id:?}")]
    NotFound { id: String },
    #[error("rollout {id} is {state}: cannot {action} it")]
    InvalidState {
        id: String,
        state: &'static str,
        action: &'static str,
    },
    #[error("rollout {id} of model {model} is still {state}; pause is not enough: abort or finish it first")]
    Busy {
        id: String,
        model: String,
        state: &'static str,
    },
    #[error("rollout store: {0}")]
    Store(#[from] StoreError),
    #[error("rollout store, key {key}: {problem}")]
    Corrupt { key: String, problem: String },
    #[error("directives: {0}")]
    Issue(#[from] IssueError),
    #[error("rollout engine: its lock was poisoned by a panic")]
    Poisoned,
}

/// How the API should answer a [`RolloutError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 422: a field or the target is bad.
    Invalid,
    /// 404.
    NotFound,
    /// 409: not allowed in the current state.
    Conflict,
    /// 500.
    Internal,
}

impl RolloutError {
    pub fn status_class(&self) -> ErrorClass {
        match self {
            RolloutError::Field { .. }
            | RolloutError::NoTargets { .. }
            | RolloutError::TooManyTargets { .. } => ErrorClass::Invalid,
            RolloutError::NotFound { .. } => ErrorClass::NotFound,
            RolloutError::InvalidState { .. } | RolloutError::Busy { .. } => ErrorClass::Conflict,
            RolloutError::Store(_)
            | RolloutError::Corrupt { .. }
            | RolloutError::Issue(_)
            | RolloutError::Poisoned => ErrorClass::Internal,
        }
    }
}

fn field_err(field: impl Into<String>, problem: impl Into<String>) -> RolloutError {
    RolloutError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

// ---------------------------------------------------------------------------------------
// Spec parsing
// ---------------------------------------------------------------------------------------

/// One wave's cumulative size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WaveSize {
    /// `N%` of the targeted devices (at least 1 device).
    Percent(f64),
    /// `N` devices.
    Count(usize),
}

/// A rollout as requested (validated).
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSpec {
    /// `name@version`.
    pub bundle: String,
    /// The selector text, e.g. `site=plant-a,line=3`.
    pub target: String,
    pub waves: Vec<WaveSize>,
    /// Fraction 0..=1.
    pub success_threshold: f64,
    /// Fraction 0..=1.
    pub failure_threshold: f64,
    pub wave_timeout_secs: u64,
}

/// Parses `N%` (0 < N <= 100) or `N` (a device count >= 1).
pub fn parse_wave(field: &str, text: &str) -> Result<WaveSize, RolloutError> {
    let t = text.trim();
    if let Some(p) = t.strip_suffix('%') {
        let v: f64 = p
            .trim()
            .parse()
            .map_err(|_| field_err(field, format!("{text:?} is not a percentage like 10%")))?;
        if !(v > 0.0 && v <= 100.0) {
            return Err(field_err(
                field,
                format!("{text:?}: must be above 0% and at most 100%"),
            ));
        }
        Ok(WaveSize::Percent(v))
    } else {
        let n: usize = t.parse().map_err(|_| {
            field_err(
                field,
                format!("{text:?} is neither a percentage (10%) nor a device count (5)"),
            )
        })?;
        if n == 0 {
            return Err(field_err(field, "a wave needs at least 1 device"));
        }
        Ok(WaveSize::Count(n))
    }
}

/// Parses `95%` or `0.95` into a fraction 0..=1.
pub fn parse_threshold(field: &str, text: &str) -> Result<f64, RolloutError> {
    let t = text.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| {
        field_err(
            field,
            format!("{text:?} is not a threshold like 95% or 0.95"),
        )
    })?;
    if !(0.0..=1.0).contains(&v) {
        return Err(field_err(
            field,
            format!("{text:?}: must be between 0% and 100%"),
        ));
    }
    Ok(v)
}

/// Parses `90s`, `30m`, `2h`, `1d` or plain seconds.
pub fn parse_duration_secs(field: &str, text: &str) -> Result<u64, RolloutError> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        Some((i, 'd')) => (&t[..i], 86_400),
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| {
        field_err(
            field,
            format!("{text:?} is not a duration like 90s, 30m or 2h"),
        )
    })?;
    let secs = n.saturating_mul(mult);
    if secs == 0 || secs > MAX_WAVE_TIMEOUT_SECS {
        return Err(field_err(
            field,
            format!(
                "{text:?}: must be between 1s and {}d",
                MAX_WAVE_TIMEOUT_SECS / 86_400
            ),
        ));
    }
    Ok(secs)
}

impl RolloutSpec {
    /// Validates the request fields (API names: `bundle`, `target`, `waves[i]`,
    /// `success_threshold`, `failure_threshold`, `wave_timeout`).
    pub fn parse(
        bundle: &str,
        target: &str,
        waves: &[String],
        success_threshold: &str,
        failure_threshold: &str,
        wave_timeout: Option<&str>,
        default_wave_timeout_secs: u64,
    ) -> Result<RolloutSpec, RolloutError> {
        let Some((name, version)) = bundle.split_once('@') else {
            return Err(field_err(
                "bundle",
                format!("{bundle:?} is not NAME@VERSION"),
            ));
        };
        if name.is_empty() || version.is_empty() {
            return Err(field_err(
                "bundle",
                format!("{bundle:?} is not NAME@VERSION"),
            ));
        }
        if target.len() > 4096 {
            return Err(field_err("target", "longer than 4096 bytes"));
        }
        if waves.is_empty() {
            return Err(field_err("waves", "at least one wave is needed"));
        }
        if waves.len() > MAX_WAVES {
            return Err(field_err("waves", format!("at most {MAX_WAVES} waves")));
        }
        let mut parsed = Vec::with_capacity(waves.len());
        for (i, w) in waves.iter().enumerate() {
            parsed.push(parse_wave(&format!("waves[{i}]"), w)?);
        }
        let wave_timeout_secs = match wave_timeout {
            Some(t) => parse_duration_secs("wave_timeout", t)?,
            None => default_wave_timeout_secs.clamp(1, MAX_WAVE_TIMEOUT_SECS),
        };
        Ok(RolloutSpec {
            bundle: bundle.to_string(),
            target: target.to_string(),
            waves: parsed,
            success_threshold: parse_threshold("success_threshold", success_threshold)?,
            failure_threshold: parse_threshold("failure_threshold", failure_threshold)?,
            wave_timeout_secs,
        })
    }

    /// Cumulative wave ends for `n` targets: percent rounds up (at least 1), everything is
    /// clipped to `n`, waves that add no device are dropped; a wave smaller than the one
    /// before is an error.
    pub fn wave_ends(&self, n: usize) -> Result<Vec<usize>, RolloutError> {
        let mut ends: Vec<usize> = Vec::new();
        let mut prev_raw = 0usize;
        for (i, w) in self.waves.iter().enumerate() {
            let raw = match *w {
                WaveSize::Percent(p) => ((p / 100.0 * n as f64) - EPS).ceil().max(1.0) as usize,
                WaveSize::Count(c) => c,
            };
            if raw < prev_raw {
                return Err(field_err(
                    format!("waves[{i}]"),
                    format!("waves are cumulative: {raw} devices is fewer than the {prev_raw} of the wave before"),
                ));
            }
            prev_raw = raw;
            let end = raw.min(n);
            if ends.last().is_none_or(|&l| end > l) {
                ends.push(end);
            }
        }
        Ok(ends)
    }
}

// ---------------------------------------------------------------------------------------
// State (storage records and API views)
// ---------------------------------------------------------------------------------------

/// The bundle a rollout installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    pub name: String,
    pub version: String,
    pub release: u64,
    pub sha256: String,
    pub bytes: u64,
    /// The model the bundle carries.
    pub model: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Paused,
    Halted,
    Aborted,
    Completed,
    RolledBack,
}

impl RolloutState {
    pub fn name(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Halted => "halted",
            RolloutState::Aborted => "aborted",
            RolloutState::Completed => "completed",
            RolloutState::RolledBack => "rolled_back",
        }
    }

    pub const ALL: [RolloutState; 6] = [
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Halted,
        RolloutState::Aborted,
        RolloutState::Completed,
        RolloutState::RolledBack,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveState {
    Pending,
    Running,
    Promoted,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Pending,
    Sent,
    Accepted,
    Downloading,
    Activated,
    Committed,
    Failed,
    RolledBack,
}

impl DeviceState {
    fn name(self) -> &'static str {
        match self {
            DeviceState::Pending => "pending",
            DeviceState::Sent => "sent",
            DeviceState::Accepted => "accepted",
            DeviceState::Downloading => "downloading",
            DeviceState::Activated => "activated",
            DeviceState::Committed => "committed",
            DeviceState::Failed => "failed",
            DeviceState::RolledBack => "rolled_back",
        }
    }

    fn terminal(self) -> bool {
        matches!(
            self,
            DeviceState::Committed | DeviceState::Failed | DeviceState::RolledBack
        )
    }

    /// 0 = succeeded, 1 = failed, 2 = in progress (pending included).
    fn bucket(self) -> usize {
        match self {
            DeviceState::Committed => 0,
            DeviceState::Failed | DeviceState::RolledBack => 1,
            _ => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Install,
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OwnerKind {
    Rollout,
    FleetRollback,
}

/// Which devices get a rollback directive when they activate the release late.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Scope {
    None,
    Wave(usize),
    All,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WaveRec {
    start: usize,
    end: usize,
    state: WaveState,
    started_at_ms: Option<u64>,
    deadline_ms: Option<u64>,
}

/// Storage record `h/<id>` (format version [`STORE_VERSION`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    v: u32,
    id: String,
    kind: OwnerKind,
    model: String,
    bundle: Option<BundleRef>,
    target: String,
    state: RolloutState,
    halt_reason: Option<String>,
    /// Fleet rollbacks: the reason sent to devices.
    reason: Option<String>,
    waves: Vec<WaveRec>,
    current_wave: usize,
    success_threshold: f64,
    failure_threshold: f64,
    wave_timeout_secs: u64,
    created_by: String,
    created_at_ms: u64,
    updated_at_ms: u64,
    paused_at_ms: Option<u64>,
    scope: Scope,
    devices: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Unacked {
    id: String,
    kind: Kind,
    sent_at_ms: u64,
    reason: Option<String>,
}

/// Storage record `d/<id>/<index>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DevRec {
    device: String,
    wave: usize,
    state: DeviceState,
    reason: Option<String>,
    directive: Option<String>,
    updated_at_ms: u64,
    unacked: Option<Unacked>,
    /// Activated or committed the rollout's release (a rollback candidate).
    on_release: bool,
    /// Rollback directives sent to it so far.
    rollbacks: u32,
}

/// The bundle of a rollout as shown by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleView {
    pub name: String,
    pub version: String,
    pub release: u64,
    pub sha256: String,
}

/// One wave as shown by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveView {
    pub index: usize,
    pub size: usize,
    pub devices: Vec<String>,
    pub state: WaveState,
    pub started_at_ms: Option<u64>,
    pub deadline_ms: Option<u64>,
    pub succeeded: usize,
    pub failed: usize,
    pub in_progress: usize,
}

/// One device of a rollout as shown by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    pub wave: usize,
    pub state: DeviceState,
    pub reason: Option<String>,
    pub directive: Option<String>,
    pub updated_at_ms: u64,
}

/// A rollout (API type `Rollout`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    pub id: String,
    pub bundle: BundleView,
    pub target: String,
    pub state: RolloutState,
    pub halt_reason: Option<String>,
    pub waves: Vec<WaveView>,
    pub current_wave: usize,
    pub success_threshold: f64,
    pub failure_threshold: f64,
    pub wave_timeout_secs: u64,
    pub created_by: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub devices: BTreeMap<String, DeviceView>,
}

/// The result of [`Rollouts::fleet_rollback`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetRollbackView {
    /// Id of the fleet rollback (`fr-N`), used in its directive ids.
    pub id: String,
    pub model: String,
    /// Devices sent a rollback directive (now or when they come back).
    pub devices: Vec<String>,
    /// Rollouts of the model that were aborted by it.
    pub aborted_rollouts: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Engine
// ---------------------------------------------------------------------------------------

struct Owner {
    h: Header,
    devs: Vec<DevRec>,
    /// Per wave: [succeeded, failed, in progress].
    counts: Vec<[usize; 3]>,
}

impl Owner {
    fn new(h: Header, devs: Vec<DevRec>) -> Owner {
        let mut counts = vec![[0usize; 3]; h.waves.len().max(1)];
        for d in &devs {
            if let Some(c) = counts.get_mut(d.wave) {
                c[d.state.bucket()] += 1;
            }
        }
        Owner { h, devs, counts }
    }

    fn set_state(&mut self, idx: usize, state: DeviceState, reason: Option<String>, now: u64) {
        let d = &mut self.devs[idx];
        if let Some(c) = self.counts.get_mut(d.wave) {
            c[d.state.bucket()] = c[d.state.bucket()].saturating_sub(1);
            c[state.bucket()] += 1;
        }
        d.state = state;
        if reason.is_some() {
            d.reason = reason;
        }
        d.updated_at_ms = now;
    }

    fn install_action(&self) -> Option<Action> {
        self.h.bundle.as_ref().map(|b| Action::Install {
            model: b.model.clone(),
            version: b.version.clone(),
            release: b.release,
            bundle_sha256: b.sha256.clone(),
            bundle_bytes: b.bytes,
        })
    }

    fn release(&self) -> Option<u64> {
        self.h.bundle.as_ref().map(|b| b.release)
    }

    fn view(&self) -> RolloutView {
        let b = self.h.bundle.clone().unwrap_or(BundleRef {
            name: String::new(),
            version: String::new(),
            release: 0,
            sha256: String::new(),
            bytes: 0,
            model: self.h.model.clone(),
        });
        let waves = self
            .h
            .waves
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let c = self.counts.get(i).copied().unwrap_or_default();
                WaveView {
                    index: i,
                    size: w.end - w.start,
                    devices: self.devs[w.start..w.end]
                        .iter()
                        .map(|d| d.device.clone())
                        .collect(),
                    state: w.state,
                    started_at_ms: w.started_at_ms,
                    deadline_ms: w.deadline_ms,
                    succeeded: c[0],
                    failed: c[1],
                    in_progress: c[2],
                }
            })
            .collect();
        RolloutView {
            id: self.h.id.clone(),
            bundle: BundleView {
                name: b.name,
                version: b.version,
                release: b.release,
                sha256: b.sha256,
            },
            target: self.h.target.clone(),
            state: self.h.state,
            halt_reason: self.h.halt_reason.clone(),
            waves,
            current_wave: self.h.current_wave,
            success_threshold: self.h.success_threshold,
            failure_threshold: self.h.failure_threshold,
            wave_timeout_secs: self.h.wave_timeout_secs,
            created_by: self.h.created_by.clone(),
            created_at_ms: self.h.created_at_ms,
            updated_at_ms: self.h.updated_at_ms,
            devices: self
                .devs
                .iter()
                .map(|d| {
                    (
                        d.device.clone(),
                        DeviceView {
                            wave: d.wave,
                            state: d.state,
                            reason: d.reason.clone(),
                            directive: d.directive.clone(),
                            updated_at_ms: d.updated_at_ms,
                        },
                    )
                })
                .collect(),
        }
    }
}

#[derive(Default)]
struct Inner {
    owners: BTreeMap<String, Owner>,
    /// device -> (owner id, index) of every owner targeting it.
    by_device: HashMap<String, Vec<(String, usize)>>,
}

/// What one operation changes, persisted and then carried out by [`Rollouts::commit`].
#[derive(Default)]
struct Work {
    headers: Vec<String>,
    devs: Vec<(String, usize)>,
    /// (owner, index, kind, rollback reason, re-send of the current id)
    issue: Vec<(String, usize, Kind, Option<String>, bool)>,
    halts: Vec<RolloutHalt>,
}

impl Work {
    fn header(&mut self, id: &str) {
        if !self.headers.iter().any(|h| h == id) {
            self.headers.push(id.to_string());
        }
    }
    fn dev(&mut self, id: &str, idx: usize) {
        self.devs.push((id.to_string(), idx));
    }
}

/// Directive id of device `idx` of owner `oid`: `<oid>.<idx>.i` or `<oid>.<idx>.r<n>`.
fn directive_id(oid: &str, idx: usize, kind: Kind, rollbacks: u32) -> String {
    match kind {
        Kind::Install => format!("{oid}.{idx}.i"),
        Kind::Rollback => format!("{oid}.{idx}.r{rollbacks}"),
    }
}

fn parse_directive_id(id: &str) -> Option<(&str, usize, Kind)> {
    let mut it = id.split('.');
    let (oid, idx, k) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    let kind = if k == "i" {
        Kind::Install
    } else if k.starts_with('r') {
        Kind::Rollback
    } else {
        return None;
    };
    Some((oid, idx.parse().ok()?, kind))
}

fn header_key(id: &str) -> String {
    format!("h/{id}")
}
fn dev_key(id: &str, idx: usize) -> String {
    format!("d/{id}/{idx:08}")
}

/// A rollback reason usable in a directive: control characters replaced, at most
/// [`MAX_REASON_BYTES`], never empty.
fn clean_reason(text: &str) -> String {
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > MAX_REASON_BYTES {
        let mut cut = MAX_REASON_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    if s.trim().is_empty() {
        "rollback requested by the fleet".into()
    } else {
        s
    }
}

fn detail_u64(detail: &Value, key: &str) -> Option<u64> {
    match detail.get(key)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn detail_str<'a>(detail: &'a Value, key: &str) -> Option<&'a str> {
    detail.get(key).and_then(Value::as_str)
}

fn is_replay(error: Option<&str>) -> bool {
    error.is_some_and(|e| e.to_ascii_lowercase().contains("replay"))
}

/// What a committed operation publishes: (device, directive payload) and halts to alert.
type Outgoing = (Vec<(String, Vec<u8>)>, Vec<RolloutHalt>);

/// The rollout engine. Internally synchronized: every method takes `&self`.
pub struct Rollouts {
    db: Db,
    issuer: Arc<Issuer>,
    publisher: Publisher,
    alerts: Option<Arc<Alerts>>,
    inner: Mutex<Inner>,
}

impl Rollouts {
    /// Loads every rollout and fleet rollback from `db` (tree [`TREE`]) and resumes them.
    pub fn open(
        db: Db,
        issuer: Arc<Issuer>,
        publisher: Publisher,
        alerts: Option<Arc<Alerts>>,
    ) -> Result<Rollouts, RolloutError> {
        let mut inner = Inner::default();
        let headers: Vec<(String, Header)> = db.list(TREE, "h/", None, 1_000_000)?;
        for (key, h) in headers {
            if h.v != STORE_VERSION {
                return Err(RolloutError::Corrupt {
                    key,
                    problem: format!("format version {}; this build reads {STORE_VERSION}", h.v),
                });
            }
            let recs: Vec<(String, DevRec)> =
                db.list(TREE, &format!("d/{}/", h.id), None, MAX_TARGETS + 1)?;
            if recs.len() != h.devices {
                return Err(RolloutError::Corrupt {
                    key,
                    problem: format!("{} device records, header says {}", recs.len(), h.devices),
                });
            }
            let devs: Vec<DevRec> = recs.into_iter().map(|(_, d)| d).collect();
            let mut prev_end = 0;
            for w in &h.waves {
                if w.start != prev_end || w.end <= w.start || w.end > devs.len() {
                    return Err(RolloutError::Corrupt {
                        key,
                        problem: format!(
                            "wave {}..{} does not fit {} devices",
                            w.start,
                            w.end,
                            devs.len()
                        ),
                    });
                }
                prev_end = w.end;
            }
            if h.current_wave >= h.waves.len().max(1) || h.waves.is_empty() && !devs.is_empty() {
                return Err(RolloutError::Corrupt {
                    key,
                    problem: format!("current_wave {} of {} waves", h.current_wave, h.waves.len()),
                });
            }
            if let Some(d) = devs.iter().find(|d| d.wave >= h.waves.len()) {
                return Err(RolloutError::Corrupt {
                    key,
                    problem: format!(
                        "device {} in wave {} of {}",
                        d.device,
                        d.wave,
                        h.waves.len()
                    ),
                });
            }
            for (i, d) in devs.iter().enumerate() {
                inner
                    .by_device
                    .entry(d.device.clone())
                    .or_default()
                    .push((h.id.clone(), i));
            }
            inner.owners.insert(h.id.clone(), Owner::new(h, devs));
        }
        Ok(Rollouts {
            db,
            issuer,
            publisher,
            alerts,
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, RolloutError> {
        self.inner.lock().map_err(|_| RolloutError::Poisoned)
    }

    /// Issues the work's directives, writes every changed record in one flushed batch, and
    /// returns what to publish (called with the lock held; publish after releasing it).
    fn commit(
        &self,
        inner: &mut Inner,
        mut work: Work,
        now: u64,
    ) -> Result<Outgoing, RolloutError> {
        let mut reqs = Vec::with_capacity(work.issue.len());
        for (oid, idx, kind, reason, resend) in &work.issue {
            let Some(o) = inner.owners.get_mut(oid) else {
                continue;
            };
            let action = match kind {
                Kind::Install => match o.install_action() {
                    Some(a) => a,
                    None => continue,
                },
                Kind::Rollback => Action::Rollback {
                    model: o.h.model.clone(),
                    to_release: None,
                    reason: clean_reason(reason.as_deref().unwrap_or("")),
                },
            };
            let d = &mut o.devs[*idx];
            let id = if *resend {
                match &d.unacked {
                    Some(u) => u.id.clone(),
                    None => continue,
                }
            } else {
                if *kind == Kind::Rollback {
                    d.rollbacks += 1;
                }
                directive_id(oid, *idx, *kind, d.rollbacks)
            };
            d.unacked = Some(Unacked {
                id: id.clone(),
                kind: *kind,
                sent_at_ms: now,
                reason: reason.clone(),
            });
            d.directive = Some(id.clone());
            if !*resend {
                if *kind == Kind::Install {
                    o.set_state(*idx, DeviceState::Sent, None, now);
                }
                work.devs.push((oid.clone(), *idx));
            }
            reqs.push(IssueRequest {
                device: o.devs[*idx].device.clone(),
                id,
                action,
            });
        }
        let issued = self.issuer.issue_many(&reqs, now)?;
        let mut batch = Batch::default();
        let mut writes = 0usize;
        for oid in &work.headers {
            if let Some(o) = inner.owners.get(oid) {
                batch.put(&header_key(oid), &o.h);
                writes += 1;
            }
        }
        work.devs.sort_unstable();
        work.devs.dedup();
        for (oid, idx) in &work.devs {
            if let Some(d) = inner.owners.get(oid).and_then(|o| o.devs.get(*idx)) {
                batch.put(&dev_key(oid, *idx), d);
                writes += 1;
            }
        }
        if writes > 0 {
            self.db.batch(TREE, batch)?;
        }
        Ok((
            issued.into_iter().map(|d| (d.device, d.payload)).collect(),
            work.halts,
        ))
    }

    fn deliver(&self, out: Outgoing) {
        let (msgs, halts) = out;
        for (device, payload) in msgs {
            if !(self.publisher)(&device, COMMANDS_LEAF, payload) {
                tracing::debug!(%device, "directive not queued; re-sent later");
            }
        }
        for h in halts {
            tracing::warn!(rollout = %h.rollout_id, reason = %h.reason, "rollout halted");
            if let Some(a) = &self.alerts {
                a.rollout_halted(h);
            }
        }
    }

    /// Runs `f` under the lock, commits its work, then publishes.
    fn run<T>(
        &self,
        now: u64,
        f: impl FnOnce(&mut Inner, &mut Work) -> Result<T, RolloutError>,
    ) -> Result<T, RolloutError> {
        let (value, out) = {
            let mut inner = self.lock()?;
            let mut work = Work::default();
            let value = f(&mut inner, &mut work)?;
            let out = self.commit(&mut inner, work, now)?;
            (value, out)
        };
        self.deliver(out);
        Ok(value)
    }

    /// Starts a rollout of `bundle` to `targets` (the devices matching `spec.target` now; a
    /// snapshot), sending the canary wave its install directives.
    pub fn create(
        &self,
        spec: RolloutSpec,
        bundle: BundleRef,
        mut targets: Vec<String>,
        actor: &str,
        now_ms: u64,
    ) -> Result<RolloutView, RolloutError> {
        targets.sort_unstable();
        targets.dedup();
        if targets.is_empty() {
            return Err(RolloutError::NoTargets {
                target: spec.target,
            });
        }
        if targets.len() > MAX_TARGETS {
            return Err(RolloutError::TooManyTargets {
                target: spec.target,
                count: targets.len(),
                max: MAX_TARGETS,
            });
        }
        if let Some(bad) = targets.iter().find(|t| !shared::wire::valid_device_id(t)) {
            return Err(field_err(
                "target",
                format!("device id {bad:?} is not valid"),
            ));
        }
        if !(0.0..=1.0).contains(&spec.success_threshold) {
            return Err(field_err(
                "success_threshold",
                "must be between 0% and 100%",
            ));
        }
        if !(0.0..=1.0).contains(&spec.failure_threshold) {
            return Err(field_err(
                "failure_threshold",
                "must be between 0% and 100%",
            ));
        }
        let ends = spec.wave_ends(targets.len())?;
        self.run(now_ms, |inner, work| {
            if let Some(o) = inner.owners.values().find(|o| {
                o.h.kind == OwnerKind::Rollout
                    && o.h.model == bundle.model
                    && matches!(o.h.state, RolloutState::Running | RolloutState::Paused)
            }) {
                return Err(RolloutError::Busy {
                    id: o.h.id.clone(),
                    model: o.h.model.clone(),
                    state: o.h.state.name(),
                });
            }
            let n = self.db.increment(TREE, NEXT_ID_KEY, 1)?;
            let id = format!("r-{n}");
            let mut waves = Vec::with_capacity(ends.len());
            let mut start = 0;
            for &end in &ends {
                waves.push(WaveRec {
                    start,
                    end,
                    state: WaveState::Pending,
                    started_at_ms: None,
                    deadline_ms: None,
                });
                start = end;
            }
            let mut devs = Vec::with_capacity(targets.len());
            for (w, wave) in waves.iter().enumerate() {
                for t in &targets[wave.start..wave.end] {
                    devs.push(DevRec {
                        device: t.clone(),
                        wave: w,
                        state: DeviceState::Pending,
                        reason: None,
                        directive: None,
                        updated_at_ms: now_ms,
                        unacked: None,
                        on_release: false,
                        rollbacks: 0,
                    });
                }
            }
            let h = Header {
                v: STORE_VERSION,
                id: id.clone(),
                kind: OwnerKind::Rollout,
                model: bundle.model.clone(),
                bundle: Some(bundle),
                target: spec.target.clone(),
                state: RolloutState::Running,
                halt_reason: None,
                reason: None,
                waves,
                current_wave: 0,
                success_threshold: spec.success_threshold,
                failure_threshold: spec.failure_threshold,
                wave_timeout_secs: spec.wave_timeout_secs,
                created_by: actor.to_string(),
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
                paused_at_ms: None,
                scope: Scope::None,
                devices: devs.len(),
            };
            let mut o = Owner::new(h, devs);
            for i in 0..o.devs.len() {
                work.dev(&id, i);
                inner
                    .by_device
                    .entry(o.devs[i].device.clone())
                    .or_default()
                    .push((id.clone(), i));
            }
            start_wave(&mut o, 0, now_ms, work);
            work.header(&id);
            inner.owners.insert(id.clone(), o);
            Ok(id)
        })
        .and_then(|id| self.get(&id))
    }

    fn transition(
        &self,
        id: &str,
        now_ms: u64,
        action: &'static str,
        f: impl FnOnce(&mut Owner, &mut Work) -> Result<(), &'static str>,
    ) -> Result<RolloutView, RolloutError> {
        self.run(now_ms, |inner, work| {
            let o = inner
                .owners
                .get_mut(id)
                .filter(|o| o.h.kind == OwnerKind::Rollout)
                .ok_or_else(|| RolloutError::NotFound { id: id.to_string() })?;
            f(o, work).map_err(|state| RolloutError::InvalidState {
                id: id.to_string(),
                state,
                action,
            })?;
            o.h.updated_at_ms = now_ms;
            work.header(id);
            Ok(o.view())
        })
    }

    /// Running -> paused: no promotion, no new directive, deadlines suspended.
    pub fn pause(&self, id: &str, actor: &str, now_ms: u64) -> Result<RolloutView, RolloutError> {
        tracing::info!(rollout = id, actor, "pause");
        self.transition(id, now_ms, "pause", |o, _| {
            if o.h.state != RolloutState::Running {
                return Err(o.h.state.name());
            }
            o.h.state = RolloutState::Paused;
            o.h.paused_at_ms = Some(now_ms);
            Ok(())
        })
    }

    /// Paused -> running; the current wave's deadline is extended by the pause.
    pub fn resume(&self, id: &str, actor: &str, now_ms: u64) -> Result<RolloutView, RolloutError> {
        tracing::info!(rollout = id, actor, "resume");
        self.transition(id, now_ms, "resume", |o, work| {
            if o.h.state != RolloutState::Paused {
                return Err(o.h.state.name());
            }
            let paused = now_ms.saturating_sub(o.h.paused_at_ms.take().unwrap_or(now_ms));
            let w = o.h.current_wave;
            if let Some(d) = o.h.waves.get_mut(w).and_then(|w| w.deadline_ms.as_mut()) {
                *d = d.saturating_add(paused);
            }
            o.h.state = RolloutState::Running;
            evaluate(o, now_ms, work);
            Ok(())
        })
    }

    /// Running, paused or halted -> aborted: everything stops (no re-sends, no rollback).
    pub fn abort(&self, id: &str, actor: &str, now_ms: u64) -> Result<RolloutView, RolloutError> {
        tracing::info!(rollout = id, actor, "abort");
        self.transition(id, now_ms, "abort", |o, work| {
            if !matches!(
                o.h.state,
                RolloutState::Running | RolloutState::Paused | RolloutState::Halted
            ) {
                return Err(o.h.state.name());
            }
            abort_owner(o, &format!("aborted by {actor}"), work);
            Ok(())
        })
    }

    /// Any state but rolled_back -> rolled_back: rollback directives to every device of the
    /// rollout that activated or committed the release (and to any that does later).
    pub fn rollback(
        &self,
        id: &str,
        actor: &str,
        now_ms: u64,
    ) -> Result<RolloutView, RolloutError> {
        tracing::info!(rollout = id, actor, "rollback");
        self.transition(id, now_ms, "roll back", |o, work| {
            if o.h.state == RolloutState::RolledBack {
                return Err(o.h.state.name());
            }
            o.h.state = RolloutState::RolledBack;
            o.h.paused_at_ms = None;
            o.h.scope = Scope::All;
            if let Some(w) = o.h.waves.get_mut(o.h.current_wave) {
                if matches!(w.state, WaveState::Running | WaveState::Pending) {
                    w.state = WaveState::Failed;
                }
            }
            let reason = format!("rollout {} rolled back by {actor}", o.h.id);
            let oid = o.h.id.clone();
            for i in 0..o.devs.len() {
                if o.devs[i]
                    .unacked
                    .as_ref()
                    .is_some_and(|u| u.kind == Kind::Install)
                {
                    o.devs[i].unacked = None;
                    work.dev(&oid, i);
                }
                if o.devs[i].on_release {
                    work.issue
                        .push((oid.clone(), i, Kind::Rollback, Some(reason.clone()), false));
                }
            }
            Ok(())
        })
    }

    /// Fleet-wide rollback of `model` on `devices` (to their previous version). Running or
    /// paused rollouts of the model are aborted first.
    pub fn fleet_rollback(
        &self,
        model: &str,
        mut devices: Vec<String>,
        reason: &str,
        actor: &str,
        now_ms: u64,
    ) -> Result<FleetRollbackView, RolloutError> {
        shared::bundle::manifest::check_model_name(model).map_err(|p| field_err("model", p))?;
        devices.sort_unstable();
        devices.dedup();
        if devices.len() > MAX_TARGETS {
            return Err(RolloutError::TooManyTargets {
                target: format!("devices running {model}"),
                count: devices.len(),
                max: MAX_TARGETS,
            });
        }
        if let Some(bad) = devices.iter().find(|t| !shared::wire::valid_device_id(t)) {
            return Err(field_err(
                "target",
                format!("device id {bad:?} is not valid"),
            ));
        }
        let reason = clean_reason(reason);
        self.run(now_ms, |inner, work| {
            let n = self.db.increment(TREE, NEXT_ID_KEY, 1)?;
            let id = format!("fr-{n}");
            let mut aborted = Vec::new();
            for o in inner.owners.values_mut() {
                if o.h.kind == OwnerKind::Rollout
                    && o.h.model == model
                    && matches!(o.h.state, RolloutState::Running | RolloutState::Paused)
                {
                    abort_owner(
                        o,
                        &format!("aborted by fleet rollback {id} ({actor})"),
                        work,
                    );
                    o.h.updated_at_ms = now_ms;
                    work.header(&o.h.id.clone());
                    aborted.push(o.h.id.clone());
                }
            }
            if devices.is_empty() {
                return Ok(FleetRollbackView {
                    id,
                    model: model.to_string(),
                    devices: Vec::new(),
                    aborted_rollouts: aborted,
                });
            }
            let devs: Vec<DevRec> = devices
                .iter()
                .map(|d| DevRec {
                    device: d.clone(),
                    wave: 0,
                    state: DeviceState::Sent,
                    reason: None,
                    directive: None,
                    updated_at_ms: now_ms,
                    unacked: None,
                    on_release: true,
                    rollbacks: 0,
                })
                .collect();
            let h = Header {
                v: STORE_VERSION,
                id: id.clone(),
                kind: OwnerKind::FleetRollback,
                model: model.to_string(),
                bundle: None,
                target: String::new(),
                state: if devs.is_empty() {
                    RolloutState::Completed
                } else {
                    RolloutState::Running
                },
                halt_reason: None,
                reason: Some(reason.clone()),
                waves: vec![WaveRec {
                    start: 0,
                    end: devs.len(),
                    state: WaveState::Running,
                    started_at_ms: Some(now_ms),
                    deadline_ms: None,
                }],
                current_wave: 0,
                success_threshold: 0.0,
                failure_threshold: 1.0,
                wave_timeout_secs: 0,
                created_by: actor.to_string(),
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
                paused_at_ms: None,
                scope: Scope::None,
                devices: devs.len(),
            };
            for (i, d) in devs.iter().enumerate() {
                inner
                    .by_device
                    .entry(d.device.clone())
                    .or_default()
                    .push((id.clone(), i));
                work.issue
                    .push((id.clone(), i, Kind::Rollback, Some(reason.clone()), false));
            }
            inner.owners.insert(id.clone(), Owner::new(h, devs));
            work.header(&id);
            Ok(FleetRollbackView {
                id,
                model: model.to_string(),
                devices: devices.clone(),
                aborted_rollouts: aborted,
            })
        })
    }

    /// A device's reply to a directive (`<prefix>/<dev>/replies`).
    pub fn on_reply(
        &self,
        device: &str,
        reply: &CommandReply,
        now_ms: u64,
    ) -> Result<(), RolloutError> {
        let Some((oid, idx, kind)) = parse_directive_id(&reply.id) else {
            return Ok(());
        };
        self.run(now_ms, |inner, work| {
            let Some(o) = inner.owners.get_mut(oid) else {
                return Ok(());
            };
            if o.devs.get(idx).is_none_or(|d| d.device != device) {
                return Ok(());
            }
            let d = &mut o.devs[idx];
            if d.unacked.as_ref().is_some_and(|u| u.id == reply.id) {
                d.unacked = None;
            } else if d.directive.as_deref() != Some(reply.id.as_str()) {
                return Ok(()); // an older directive's late reply
            }
            let accepted = reply.ok || is_replay(reply.error.as_deref());
            let state = d.state;
            work.dev(oid, idx);
            match kind {
                Kind::Install => {
                    if accepted {
                        if state == DeviceState::Sent {
                            o.set_state(idx, DeviceState::Accepted, None, now_ms);
                        }
                    } else if !state.terminal() {
                        let e = reply.error.clone().unwrap_or_else(|| "no reason".into());
                        o.set_state(
                            idx,
                            DeviceState::Failed,
                            Some(format!("install refused by the device: {e}")),
                            now_ms,
                        );
                    }
                }
                Kind::Rollback => {
                    if !accepted {
                        let e = reply.error.clone().unwrap_or_else(|| "no reason".into());
                        o.set_state(
                            idx,
                            DeviceState::Failed,
                            Some(format!("rollback refused by the device: {e}")),
                            now_ms,
                        );
                    }
                }
            }
            evaluate(o, now_ms, work);
            Ok(())
        })
    }

    /// A device event record (`download_started`, `download_failed`, `install_rejected`,
    /// `activated`, `committed`, `rolled_back`; others are ignored).
    pub fn on_event(
        &self,
        device: &str,
        event_name: &str,
        model: &str,
        detail: &Value,
        now_ms: u64,
    ) -> Result<(), RolloutError> {
        if !matches!(
            event_name,
            "download_started"
                | "download_failed"
                | "install_rejected"
                | "activated"
                | "committed"
                | "rolled_back"
        ) {
            return Ok(());
        }
        self.run(now_ms, |inner, work| {
            let Some(list) = inner.by_device.get(device) else {
                return Ok(());
            };
            for (oid, idx) in list.clone() {
                let Some(o) = inner.owners.get_mut(&oid) else {
                    continue;
                };
                if o.h.model != model || o.devs.get(idx).is_none_or(|d| d.device != device) {
                    continue;
                }
                if apply_event(o, idx, event_name, detail, now_ms, work) {
                    work.dev(&oid, idx);
                    evaluate(o, now_ms, work);
                }
            }
            Ok(())
        })
    }

    /// A device came online: its unanswered directives are re-sent now (fresh counter and
    /// expiry, same id and action).
    pub fn on_device_online(&self, device: &str, now_ms: u64) -> Result<(), RolloutError> {
        self.run(now_ms, |inner, work| {
            let Some(list) = inner.by_device.get(device) else {
                return Ok(());
            };
            for (oid, idx) in list {
                let Some(o) = inner.owners.get(oid) else {
                    continue;
                };
                if o.h.state == RolloutState::Aborted {
                    continue;
                }
                if let Some(u) = o.devs.get(*idx).and_then(|d| d.unacked.as_ref()) {
                    work.issue
                        .push((oid.clone(), *idx, u.kind, u.reason.clone(), true));
                }
            }
            Ok(())
        })
    }

    /// Applies deadlines, promotions and re-sends (call every `rollouts.tick_ms`).
    pub fn tick(&self, now_ms: u64) -> Result<(), RolloutError> {
        self.run(now_ms, |inner, work| {
            for o in inner.owners.values_mut() {
                if matches!(o.h.state, RolloutState::Aborted | RolloutState::Completed) {
                    continue;
                }
                if o.h.kind == OwnerKind::Rollout && o.h.state == RolloutState::Running {
                    let w = o.h.current_wave;
                    let due = o.h.waves.get(w).is_some_and(|wave| {
                        wave.state == WaveState::Running
                            && wave.deadline_ms.is_some_and(|d| d <= now_ms)
                    });
                    if due {
                        let (s, e) = (o.h.waves[w].start, o.h.waves[w].end);
                        for i in s..e {
                            let st = o.devs[i].state;
                            if !st.terminal() {
                                o.set_state(
                                    i,
                                    DeviceState::Failed,
                                    Some(format!("silent at deadline (last state: {})", st.name())),
                                    now_ms,
                                );
                                o.devs[i].unacked = None;
                                work.dev(&o.h.id, i);
                            }
                        }
                    }
                    evaluate(o, now_ms, work);
                }
                let oid = o.h.id.clone();
                for (i, d) in o.devs.iter().enumerate() {
                    if let Some(u) = &d.unacked {
                        if u.sent_at_ms.saturating_add(RESEND_AFTER_MS) <= now_ms {
                            work.issue
                                .push((oid.clone(), i, u.kind, u.reason.clone(), true));
                        }
                    }
                }
            }
            Ok(())
        })
    }

    /// Every rollout (fleet rollbacks are not listed), oldest first.
    pub fn list(&self) -> Result<Vec<RolloutView>, RolloutError> {
        let inner = self.lock()?;
        let mut v: Vec<&Owner> = inner
            .owners
            .values()
            .filter(|o| o.h.kind == OwnerKind::Rollout)
            .collect();
        v.sort_by_key(|o| (o.h.created_at_ms, o.h.id.len(), o.h.id.clone()));
        Ok(v.into_iter().map(Owner::view).collect())
    }

    /// One rollout.
    pub fn get(&self, id: &str) -> Result<RolloutView, RolloutError> {
        let inner = self.lock()?;
        inner
            .owners
            .get(id)
            .filter(|o| o.h.kind == OwnerKind::Rollout)
            .map(Owner::view)
            .ok_or_else(|| RolloutError::NotFound { id: id.to_string() })
    }

    /// `fleet_rollouts{state="..."} N` lines (Prometheus text, with HELP/TYPE) for `/metrics`.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut out =
            String::from("# HELP fleet_rollouts Rollouts by state.\n# TYPE fleet_rollouts gauge\n");
        for (state, n) in self.state_counts().unwrap_or_default() {
            let _ = writeln!(out, "fleet_rollouts{{state=\"{state}\"}} {n}");
        }
        out
    }

    /// Number of rollouts per state (for `/metrics`), every state present.
    pub fn state_counts(&self) -> Result<BTreeMap<&'static str, usize>, RolloutError> {
        let inner = self.lock()?;
        let mut m: BTreeMap<&'static str, usize> =
            RolloutState::ALL.iter().map(|s| (s.name(), 0)).collect();
        for o in inner
            .owners
            .values()
            .filter(|o| o.h.kind == OwnerKind::Rollout)
        {
            *m.entry(o.h.state.name()).or_default() += 1;
        }
        Ok(m)
    }
}

fn start_wave(o: &mut Owner, w: usize, now: u64, work: &mut Work) {
    let oid = o.h.id.clone();
    let deadline = now.saturating_add(o.h.wave_timeout_secs.saturating_mul(1000));
    let wave = &mut o.h.waves[w];
    wave.state = WaveState::Running;
    wave.started_at_ms = Some(now);
    wave.deadline_ms = Some(deadline);
    o.h.current_wave = w;
    for i in wave.start..wave.end {
        work.issue
            .push((oid.clone(), i, Kind::Install, None, false));
    }
}

fn abort_owner(o: &mut Owner, why: &str, work: &mut Work) {
    o.h.state = RolloutState::Aborted;
    o.h.paused_at_ms = None;
    o.h.scope = Scope::None;
    if o.h.halt_reason.is_none() {
        o.h.halt_reason = Some(why.to_string());
    }
    let oid = o.h.id.clone();
    for (i, d) in o.devs.iter_mut().enumerate() {
        if d.unacked.take().is_some() {
            work.dev(&oid, i);
        }
    }
}

fn halt(o: &mut Owner, reason: String, now: u64, work: &mut Work) {
    let w = o.h.current_wave;
    o.h.state = RolloutState::Halted;
    o.h.paused_at_ms = None;
    o.h.halt_reason = Some(reason.clone());
    o.h.scope = Scope::Wave(w);
    o.h.updated_at_ms = now;
    let oid = o.h.id.clone();
    let (s, e) = (o.h.waves[w].start, o.h.waves[w].end);
    o.h.waves[w].state = WaveState::Failed;
    let rb_reason = format!("rollout {oid} halted: {reason}");
    for i in s..e {
        if o.devs[i]
            .unacked
            .as_ref()
            .is_some_and(|u| u.kind == Kind::Install)
        {
            o.devs[i].unacked = None;
            work.dev(&oid, i);
        }
        if o.devs[i].on_release {
            work.issue.push((
                oid.clone(),
                i,
                Kind::Rollback,
                Some(rb_reason.clone()),
                false,
            ));
        }
    }
    work.header(&oid);
    let b = o.h.bundle.clone();
    work.halts.push(RolloutHalt {
        rollout_id: oid,
        model: o.h.model.clone(),
        bundle: b
            .as_ref()
            .map(|b| format!("{}@{}", b.name, b.version))
            .unwrap_or_default(),
        release: b.map_or(0, |b| b.release),
        wave: w,
        reason,
        at_ms: now,
    });
}

/// Applies wave rules to a rollout after a change: halt on failures, promotion, completion.
fn evaluate(o: &mut Owner, now: u64, work: &mut Work) {
    if o.h.kind == OwnerKind::FleetRollback {
        if o.h.state == RolloutState::Running && o.devs.iter().all(|d| d.state.terminal()) {
            o.h.state = RolloutState::Completed;
            o.h.waves[0].state = WaveState::Promoted;
            o.h.updated_at_ms = now;
            work.header(&o.h.id.clone());
        }
        return;
    }
    loop {
        if !matches!(o.h.state, RolloutState::Running | RolloutState::Paused) {
            return;
        }
        let w = o.h.current_wave;
        let Some(wave) = o.h.waves.get(w) else {
            return;
        };
        if wave.state != WaveState::Running {
            return;
        }
        let size = (wave.end - wave.start) as f64;
        let [succ, fail, inprog] = o.counts[w];
        if fail as f64 > o.h.failure_threshold * size + EPS {
            let reason = format!(
                "wave {w}: {fail} of {} devices failed, above the failure threshold of {}%",
                wave.end - wave.start,
                o.h.failure_threshold * 100.0
            );
            halt(o, reason, now, work);
            return;
        }
        if inprog > 0 || o.h.state == RolloutState::Paused {
            return;
        }
        if succ as f64 + EPS < o.h.success_threshold * size {
            let reason = format!(
                "wave {w}: only {succ} of {} devices committed, below the success threshold of {}%",
                wave.end - wave.start,
                o.h.success_threshold * 100.0
            );
            halt(o, reason, now, work);
            return;
        }
        o.h.waves[w].state = WaveState::Promoted;
        o.h.updated_at_ms = now;
        work.header(&o.h.id.clone());
        if w + 1 >= o.h.waves.len() {
            o.h.state = RolloutState::Completed;
            return;
        }
        start_wave(o, w + 1, now, work);
    }
}

/// Applies one event to device `idx` of a rollout or fleet rollback (model already
/// matched); whether anything changed.
fn apply_event(
    o: &mut Owner,
    idx: usize,
    name: &str,
    detail: &Value,
    now: u64,
    work: &mut Work,
) -> bool {
    let d = &o.devs[idx];
    if d.state == DeviceState::Pending {
        return false; // not touched by this rollout yet
    }
    let state = d.state;
    let install_id = directive_id(&o.h.id, idx, Kind::Install, 0);
    let names_ours = detail_str(detail, "directive") == Some(install_id.as_str());
    let release = o.release();
    let clear_install = |d: &mut DevRec| {
        if d.unacked.as_ref().is_some_and(|u| u.kind == Kind::Install) {
            d.unacked = None;
        }
    };
    match name {
        "download_started" if names_ours => {
            clear_install(&mut o.devs[idx]);
            if matches!(state, DeviceState::Sent | DeviceState::Accepted) {
                o.set_state(idx, DeviceState::Downloading, None, now);
            }
            true
        }
        "download_failed" | "install_rejected" if names_ours => {
            clear_install(&mut o.devs[idx]);
            if !state.terminal() {
                let why = detail_str(detail, "reason").unwrap_or("no reason given");
                let what = if name == "download_failed" {
                    "download failed"
                } else {
                    "install rejected"
                };
                o.set_state(
                    idx,
                    DeviceState::Failed,
                    Some(format!("{what}: {why}")),
                    now,
                );
            }
            true
        }
        "activated" | "committed"
            if release.is_some() && detail_u64(detail, "release") == release =>
        {
            clear_install(&mut o.devs[idx]);
            let newly = !o.devs[idx].on_release;
            o.devs[idx].on_release = true;
            let target = if name == "activated" {
                DeviceState::Activated
            } else {
                DeviceState::Committed
            };
            if !state.terminal()
                && (target == DeviceState::Committed || state != DeviceState::Activated)
            {
                o.set_state(idx, target, None, now);
            } else {
                o.devs[idx].updated_at_ms = now;
            }
            let in_scope = match o.h.scope {
                Scope::None => false,
                Scope::All => true,
                Scope::Wave(w) => o.devs[idx].wave == w,
            };
            if newly && in_scope && o.h.state != RolloutState::Aborted {
                let reason = format!(
                    "rollout {} {}: {}",
                    o.h.id,
                    o.h.state.name(),
                    o.h.halt_reason.clone().unwrap_or_default()
                );
                work.issue
                    .push((o.h.id.clone(), idx, Kind::Rollback, Some(reason), false));
            }
            true
        }
        "rolled_back" => {
            let from = detail_u64(detail, "from");
            let ours = match o.h.kind {
                OwnerKind::FleetRollback => o.devs[idx].rollbacks > 0,
                OwnerKind::Rollout => release.is_some() && from == release,
            };
            if !ours {
                return false;
            }
            let why = detail_str(detail, "reason")
                .unwrap_or("no reason given")
                .to_string();
            o.devs[idx].on_release = false;
            if o.devs[idx]
                .unacked
                .as_ref()
                .is_some_and(|u| u.kind == Kind::Rollback)
            {
                o.devs[idx].unacked = None;
            }
            if o.devs[idx].rollbacks > 0 {
                o.set_state(idx, DeviceState::RolledBack, Some(why), now);
            } else if !matches!(state, DeviceState::Failed | DeviceState::RolledBack) {
                clear_install(&mut o.devs[idx]);
                o.set_state(
                    idx,
                    DeviceState::Failed,
                    Some(format!("rolled back on the device: {why}")),
                    now,
                );
            }
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::recorder;
    use crate::server::config;
    use shared::directive::{Directive, DirectiveVerifier, SignedDirective};
    use std::path::Path;

    const T0: u64 = 1_700_000_000_000;
    const MIN: u64 = 60_000;
    type Sent = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

    struct Fx {
        engine: Rollouts,
        sent: Sent,
        alerts: Arc<Alerts>,
        verifier: DirectiveVerifier,
    }

    fn fx_with(db: Db, dir: &Path, publisher: Option<Publisher>) -> Fx {
        let issuer = Arc::new(
            Issuer::open(
                &config::Directives {
                    key_file: None,
                    lifetime_secs: 3600,
                },
                dir,
                db.clone(),
            )
            .unwrap(),
        );
        let (p, sent) = recorder();
        let alerts = Arc::new(
            Alerts::new(&config::Alerts {
                webhooks: vec![config::Webhook {
                    url: "http://127.0.0.1:9/".into(),
                    name: None,
                }],
                external_url: None,
            })
            .unwrap(),
        );
        let verifier = DirectiveVerifier::new([issuer.public_key()]);
        let engine =
            Rollouts::open(db, issuer, publisher.unwrap_or(p), Some(alerts.clone())).unwrap();
        Fx {
            engine,
            sent,
            alerts,
            verifier,
        }
    }

    fn fx(dir: &Path) -> Fx {
        fx_with(Db::open(dir).unwrap(), dir, None)
    }

    /// A fixture on a fresh temporary directory (keep the directory alive).
    fn fresh() -> (tempfile::TempDir, Fx) {
        let dir = tempfile::tempdir().unwrap();
        let f = fx(dir.path());
        (dir, f)
    }

    fn bundle() -> BundleRef {
        BundleRef {
            name: "pdm".into(),
            version: "1.2.0".into(),
            release: 7,
            sha256: "ab".repeat(32),
            bytes: 1000,
            model: "pdm".into(),
        }
    }

    fn spec(waves: &[&str], success: &str, failure: &str, timeout: &str) -> RolloutSpec {
        let w: Vec<String> = waves.iter().map(|s| s.to_string()).collect();
        RolloutSpec::parse(
            "pdm@1.2.0",
            "site=a",
            &w,
            success,
            failure,
            Some(timeout),
            1800,
        )
        .unwrap()
    }

    fn devices(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("dev-{i:05}")).collect()
    }

    /// The devices the directives went to, in order.
    fn devs(ds: &[Directive]) -> Vec<String> {
        ds.iter().map(|d| d.device.clone()).collect()
    }

    impl Fx {
        /// Drains what was published, verifying every directive.
        fn take(&self, now: u64) -> Vec<Directive> {
            let msgs: Vec<_> = std::mem::take(&mut *self.sent.lock().unwrap());
            msgs.into_iter()
                .map(|(dev, leaf, payload)| {
                    assert_eq!(leaf, "commands");
                    let d = self.verifier.verify(&payload, &dev, now, 0).unwrap();
                    let env = SignedDirective::parse(&payload).unwrap();
                    assert!(env.directive.contains(&dev));
                    d
                })
                .collect()
        }
        /// Drains what was published, which must be exactly one directive.
        fn take_one(&self, now: u64) -> Directive {
            let mut sent = self.take(now);
            assert_eq!(sent.len(), 1, "{sent:?}");
            sent.remove(0)
        }
        /// Ticks the engine at `now` and checks that nothing was published.
        fn tick_quiet(&self, now: u64) {
            self.engine.tick(now).unwrap();
            let sent = self.take(T0);
            assert!(sent.is_empty(), "tick at {now} sent {sent:?}");
        }
        /// Asks for a rollout of `bundle()` to `devices(n)` as `actor`.
        fn create_as(
            &self,
            actor: &str,
            spec: RolloutSpec,
            n: usize,
            now: u64,
        ) -> Result<RolloutView, RolloutError> {
            self.engine.create(spec, bundle(), devices(n), actor, now)
        }
        /// Creates a rollout of `bundle()` to `devices(n)` as "ops".
        fn launch(&self, spec: RolloutSpec, n: usize, now: u64) -> RolloutView {
            self.create_as("ops", spec, n, now).unwrap()
        }
        /// Creates a rollout at `T0` and drains its first wave's directives.
        fn start(&self, spec: RolloutSpec, n: usize) -> Vec<Directive> {
            self.launch(spec, n, T0);
            self.take(T0)
        }
        /// Creates a rollout at `T0` and returns the first directive sent (the canary's).
        fn start_canary(&self, spec: RolloutSpec, n: usize) -> Directive {
            self.start(spec, n).remove(0)
        }
        fn reply(&self, dev: &str, id: &str, ok: bool, error: Option<&str>, now: u64) {
            self.engine
                .on_reply(
                    dev,
                    &CommandReply {
                        v: 1,
                        id: id.into(),
                        ok,
                        error: error.map(str::to_string),
                    },
                    now,
                )
                .unwrap();
        }
        /// The device accepts the directive.
        fn accept(&self, d: &Directive, now: u64) {
            self.reply(&d.device, &d.id, true, None, now);
        }
        /// The device refuses the directive with `error`.
        fn refuse(&self, d: &Directive, error: &str, now: u64) {
            self.reply(&d.device, &d.id, false, Some(error), now);
        }
        fn event(&self, dev: &str, name: &str, detail: Value, now: u64) {
            self.engine
                .on_event(dev, name, "pdm", &detail, now)
                .unwrap();
        }
        /// The device reports release 7 activated for the directive (not committed yet).
        fn activated(&self, d: &Directive, now: u64) {
            self.event(
                &d.device,
                "activated",
                serde_json::json!({"release": 7, "directive": d.id}),
                now,
            );
        }
        fn committed(&self, dev: &str, now: u64) {
            self.event(dev, "committed", serde_json::json!({"release": 7}), now);
        }
        /// The device reports it went back from release 7 to 6.
        fn rolled_back(&self, dev: &str, reason: Option<&str>, now: u64) {
            let mut detail = serde_json::json!({"from": 7, "to": 6});
            if let Some(r) = reason {
                detail["reason"] = r.into();
            }
            self.event(dev, "rolled_back", detail, now);
        }
        /// The device accepts a rollback directive and rolls back.
        fn complete_rollback(&self, d: &Directive, reason: Option<&str>, now: u64) {
            self.accept(d, now);
            self.rolled_back(&d.device, reason, now);
        }
        /// The device accepts, activates and commits.
        fn commit(&self, d: &Directive, now: u64) {
            self.accept(d, now);
            self.event(
                &d.device,
                "activated",
                serde_json::json!({"release": 7, "replaced": 6, "directive": d.id}),
                now,
            );
            self.committed(&d.device, now);
        }
        fn state(&self, id: &str) -> RolloutView {
            self.engine.get(id).unwrap()
        }
    }

    fn is_install(d: &Directive) -> bool {
        matches!(&d.action, Action::Install { model, release: 7, .. } if model == "pdm")
    }
    fn is_rollback(d: &Directive) -> bool {
        matches!(&d.action, Action::Rollback { model, .. } if model == "pdm")
    }

    #[test]
    fn spec_parsing_and_wave_sizes() {
        let s = spec(&["1%", "10%", "50%", "100%"], "95%", "0.05", "30m");
        assert_eq!(s.success_threshold, 0.95);
        assert_eq!(s.failure_threshold, 0.05);
        assert_eq!(s.wave_timeout_secs, 1800);
        assert_eq!(s.wave_ends(1000).unwrap(), vec![10, 100, 500, 1000]);
        assert_eq!(s.wave_ends(5).unwrap(), vec![1, 3, 5]);
        assert_eq!(s.wave_ends(1).unwrap(), vec![1]);
        let c = spec(&["1", "5", "100"], "100%", "0%", "90s");
        assert_eq!(c.wave_ends(20).unwrap(), vec![1, 5, 20]);
        assert_eq!(c.wave_timeout_secs, 90);
        assert_eq!(
            spec(&["50%"], "1", "0", "2h").wave_ends(3).unwrap(),
            vec![2]
        );
        let e = spec(&["10", "5"], "1", "0", "1h")
            .wave_ends(20)
            .unwrap_err();
        assert!(e.to_string().starts_with("waves[1]:"), "{e}");
        let bad = |w: &str, s: &str, t: &str| {
            RolloutSpec::parse("pdm@1", "x", &[w.to_string()], s, "5%", Some(t), 60)
                .unwrap_err()
                .to_string()
        };
        assert!(bad("0%", "95%", "1m").starts_with("waves[0]"));
        assert!(bad("abc", "95%", "1m").starts_with("waves[0]"));
        assert!(bad("10", "120%", "1m").starts_with("success_threshold"));
        assert!(bad("10", "95%", "soon").starts_with("wave_timeout"));
        assert!(bad("10", "95%", "0s").starts_with("wave_timeout"));
        let e = RolloutSpec::parse("pdm", "x", &["1".into()], "1", "0", None, 60).unwrap_err();
        assert!(e.to_string().starts_with("bundle:"), "{e}");
    }

    #[test]
    fn canary_failure_halts_with_no_device_outside_the_canary_touched() {
        let (_dir, f) = fresh();
        let v = f.launch(spec(&["1", "50%", "100%"], "95%", "5%", "30m"), 20, T0);
        assert_eq!(v.id, "r-1");
        assert_eq!(
            v.waves.iter().map(|w| w.size).collect::<Vec<_>>(),
            vec![1, 9, 10]
        );
        let sent = f.take(T0);
        assert_eq!(sent.len(), 1);
        let d = &sent[0];
        assert_eq!(d.device, "dev-00000");
        assert!(is_install(d));
        f.accept(d, T0 + 1);
        f.event(
            &d.device,
            "download_started",
            serde_json::json!({"directive": d.id, "release": 7}),
            T0 + 2,
        );
        assert_eq!(
            f.state("r-1").devices["dev-00000"].state,
            DeviceState::Downloading
        );
        // activated is NOT success: the wave waits for committed
        f.activated(d, T0 + 3);
        let v = f.state("r-1");
        assert_eq!(v.state, RolloutState::Running);
        assert_eq!(v.waves[0].state, WaveState::Running);
        assert_eq!(v.devices["dev-00000"].state, DeviceState::Activated);
        // the model fails its health window on the device
        f.rolled_back(&d.device, Some("health check failed"), T0 + 4);
        let v = f.state("r-1");
        assert_eq!(v.state, RolloutState::Halted);
        assert!(
            v.halt_reason.as_deref().unwrap().contains("wave 0"),
            "{v:?}"
        );
        assert_eq!(v.waves[0].state, WaveState::Failed);
        assert_eq!(v.waves[1].state, WaveState::Pending);
        let canary = &v.devices["dev-00000"];
        assert_eq!(canary.state, DeviceState::Failed);
        assert!(canary
            .reason
            .as_deref()
            .unwrap()
            .contains("health check failed"));
        for (id, dv) in &v.devices {
            if id != "dev-00000" {
                assert_eq!(dv.state, DeviceState::Pending, "{id}");
                assert_eq!(dv.directive, None, "{id}");
            }
        }
        assert_eq!(f.alerts.queued(), 1);
        // nothing more is ever sent: the canary already rolled itself back
        f.tick_quiet(T0 + 3 * 3600 * 1000);
    }

    #[test]
    fn a_failed_canary_wave_rolls_back_its_committed_devices() {
        let (_dir, f) = fresh();
        let sent = f.start(spec(&["3", "100%"], "100%", "0%", "30m"), 10);
        assert_eq!(sent.len(), 3);
        f.commit(&sent[0], T0 + 1);
        f.accept(&sent[1], T0 + 1);
        f.event(
            &sent[1].device,
            "install_rejected",
            serde_json::json!({"source": format!("fleet:{}", sent[1].id), "directive": sent[1].id, "release": 7, "reason": "signature"}),
            T0 + 2,
        );
        let v = f.state("r-1");
        assert_eq!(v.state, RolloutState::Halted);
        assert_eq!(
            v.devices[&sent[1].device].reason.as_deref(),
            Some("install rejected: signature")
        );
        let rb = f.take_one(T0 + 2);
        assert_eq!(rb.device, sent[0].device);
        assert!(is_rollback(&rb));
        // the third canary device activates late: it is rolled back too
        f.accept(&sent[2], T0 + 3);
        f.activated(&sent[2], T0 + 4);
        let late = f.take_one(T0 + 4);
        assert_eq!(late.device, sent[2].device);
        assert!(is_rollback(&late));
        // rollbacks complete
        for d in [&rb, &late] {
            f.complete_rollback(d, Some("fleet"), T0 + 5);
        }
        let v = f.state("r-1");
        assert_eq!(v.devices[&sent[0].device].state, DeviceState::RolledBack);
        assert_eq!(v.devices[&sent[2].device].state, DeviceState::RolledBack);
        let touched: Vec<_> = v
            .devices
            .iter()
            .filter(|(_, d)| d.directive.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(touched, devices(3));
    }

    #[test]
    fn a_silent_canary_fails_at_its_deadline() {
        let (_dir, f) = fresh();
        let d = f.start_canary(spec(&["1", "100%"], "100%", "0%", "10m"), 5);
        // no reply at all: re-sent after 30 s with a fresh counter, same id
        f.tick_quiet(T0 + 29_000);
        f.engine.tick(T0 + 30_000).unwrap();
        let again = f.take_one(T0 + 30_000);
        assert_eq!(again.id, d.id);
        assert!(again.counter > d.counter);
        f.accept(&d, T0 + 31_000);
        f.tick_quiet(T0 + 10 * MIN - 1);
        assert_eq!(f.state("r-1").state, RolloutState::Running);
        f.engine.tick(T0 + 10 * MIN).unwrap();
        let v = f.state("r-1");
        assert_eq!(v.state, RolloutState::Halted);
        assert_eq!(v.waves[0].failed, 1);
        assert_eq!(
            v.devices["dev-00000"].reason.as_deref(),
            Some("silent at deadline (last state: accepted)")
        );
        assert!(f.take(T0).is_empty(), "no other device touched");
        assert_eq!(f.alerts.queued(), 1);
    }

    #[test]
    fn thresholds_with_several_devices() {
        let (_dir, f) = fresh();
        let w0 = f.start(spec(&["10", "100%"], "80%", "20%", "30m"), 20);
        assert_eq!(w0.len(), 10);
        for d in &w0[..8] {
            f.commit(d, T0 + 1);
        }
        f.refuse(&w0[8], "bundle too large", T0 + 2);
        assert_eq!(f.state("r-1").waves[0].state, WaveState::Running);
        assert!(f.take(T0).is_empty());
        f.event(
            &w0[9].device,
            "download_failed",
            serde_json::json!({"directive": w0[9].id, "release": 7, "reason": "disk full"}),
            T0 + 3,
        );
        // 8 of 10 committed, 2 failed (not above 20%): promoted
        let v = f.state("r-1");
        assert_eq!(v.waves[0].state, WaveState::Promoted);
        assert_eq!((v.waves[0].succeeded, v.waves[0].failed), (8, 2));
        assert_eq!(v.current_wave, 1);
        let w1 = f.take(T0 + 3);
        assert_eq!(devs(&w1), devices(20)[10..].to_vec());
        f.commit(&w1[0], T0 + 4);
        f.commit(&w1[1], T0 + 4);
        f.accept(&w1[2], T0 + 4);
        f.activated(&w1[2], T0 + 4);
        for d in &w1[3..5] {
            f.refuse(d, "no space", T0 + 5);
        }
        assert_eq!(f.state("r-1").state, RolloutState::Running);
        f.refuse(&w1[5], "no space", T0 + 5);
        // 3 failures > 20% of 10: halted at once, wave 1's activated/committed rolled back
        let v = f.state("r-1");
        assert_eq!(v.state, RolloutState::Halted);
        assert_eq!(v.waves[1].state, WaveState::Failed);
        assert_eq!(v.waves[1].in_progress, 5);
        let rb = f.take(T0 + 5);
        assert_eq!(devs(&rb), devs(&w1[..3]));
        assert!(rb.iter().all(is_rollback));
        // wave 0 (promoted) is left alone
        assert_eq!(v.devices[&w0[0].device].state, DeviceState::Committed);
        // a rollback the device refuses is recorded
        f.refuse(&rb[2], "no previous version", T0 + 6);
        assert_eq!(
            f.state("r-1").devices[&rb[2].device].reason.as_deref(),
            Some("rollback refused by the device: no previous version")
        );
    }

    #[test]
    fn pause_resume_abort_and_rollback() {
        let (_dir, f) = fresh();
        let canary = f.start_canary(spec(&["1", "100%"], "100%", "0%", "10m"), 4);
        f.engine.pause("r-1", "ops", T0 + 1).unwrap();
        let e = f.engine.pause("r-1", "ops", T0 + 1).unwrap_err();
        assert_eq!(e.status_class(), ErrorClass::Conflict);
        assert_eq!(e.to_string(), "rollout r-1 is paused: cannot pause it");
        // a second rollout of the model is refused while this one is paused
        let e = f
            .create_as("x", spec(&["100%"], "1", "0", "1m"), 2, T0)
            .unwrap_err();
        assert_eq!(e.status_class(), ErrorClass::Conflict);
        f.commit(&canary, T0 + 2);
        // paused: no promotion, and the deadline is suspended
        f.engine.tick(T0 + 20 * MIN).unwrap();
        let v = f.state("r-1");
        assert_eq!(v.state, RolloutState::Paused);
        assert_eq!(v.waves[0].state, WaveState::Running);
        assert!(f.take(T0).is_empty());
        let v = f.engine.resume("r-1", "ops", T0 + 20 * MIN).unwrap();
        assert_eq!(v.state, RolloutState::Running);
        assert_eq!(v.waves[0].state, WaveState::Promoted);
        assert_eq!(v.waves[1].deadline_ms, Some(T0 + 30 * MIN));
        let w1 = f.take(T0 + 20 * MIN);
        assert_eq!(w1.len(), 3);
        f.commit(&w1[0], T0 + 21 * MIN);
        let v = f.engine.rollback("r-1", "ops", T0 + 22 * MIN).unwrap();
        assert_eq!(v.state, RolloutState::RolledBack);
        let rb = f.take(T0 + 22 * MIN);
        let mut rb_devs = devs(&rb);
        rb_devs.sort();
        assert_eq!(rb_devs, vec![canary.device.clone(), w1[0].device.clone()]);
        assert!(rb.iter().all(is_rollback));
        for d in &rb {
            f.accept(d, T0 + 22 * MIN);
        }
        for (st, what) in [("resume", 0), ("rollback", 1), ("abort", 2)] {
            let e = match what {
                0 => f.engine.resume("r-1", "ops", T0),
                1 => f.engine.rollback("r-1", "ops", T0),
                _ => f.engine.abort("r-1", "ops", T0),
            }
            .unwrap_err();
            assert_eq!(e.status_class(), ErrorClass::Conflict, "{st}");
        }
        assert_eq!(
            f.engine.get("r-9").unwrap_err().status_class(),
            ErrorClass::NotFound
        );

        // abort: everything stops, no re-send and no rollback
        let v = f.launch(spec(&["2", "100%"], "100%", "0%", "10m"), 4, T0 + 30 * MIN);
        assert_eq!(v.id, "r-2");
        let w0 = f.take(T0 + 30 * MIN);
        assert_eq!(w0.len(), 2);
        f.commit(&w0[0], T0 + 31 * MIN);
        let v = f.engine.abort("r-2", "ops", T0 + 31 * MIN).unwrap();
        assert_eq!(v.state, RolloutState::Aborted);
        f.engine.tick(T0 + 60 * MIN).unwrap();
        f.engine
            .on_device_online(&w0[1].device, T0 + 60 * MIN)
            .unwrap();
        f.commit(&w0[1], T0 + 61 * MIN);
        assert!(f.take(T0).is_empty());
        assert_eq!(f.state("r-2").state, RolloutState::Aborted);
        let m = f.engine.render_metrics();
        assert!(m.contains("\nfleet_rollouts{state=\"aborted\"} 1\n"), "{m}");
        let counts = f.engine.state_counts().unwrap();
        assert_eq!(
            (counts["aborted"], counts["rolled_back"], counts["running"]),
            (1, 1, 0)
        );
        // rollback also works from aborted
        f.engine.rollback("r-2", "ops", T0 + 62 * MIN).unwrap();
        assert_eq!(f.take(T0 + 62 * MIN).len(), 2);
    }

    #[test]
    fn a_replay_reply_means_accepted() {
        let (_dir, f) = fresh();
        let s = f.start(spec(&["100%"], "100%", "0%", "10m"), 2);
        f.refuse(
            &s[0],
            "directive refused: directive counter 5 is not above the last accepted counter 9 (replayed or out of order)",
            T0 + 1,
        );
        let v = f.state("r-1");
        assert_eq!(v.devices[&s[0].device].state, DeviceState::Accepted);
        assert_eq!(v.waves[0].failed, 0);
        // a reply for another device's directive is ignored
        f.reply(&s[0].device, &s[1].id, false, Some("bad"), T0 + 1);
        assert_eq!(
            f.state("r-1").devices[&s[1].device].state,
            DeviceState::Sent
        );
        f.committed(&s[0].device, T0 + 2);
        f.commit(&s[1], T0 + 2);
        assert_eq!(f.state("r-1").state, RolloutState::Completed);
    }

    #[test]
    fn an_offline_device_gets_its_directive_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let offline = Arc::new(Mutex::new(std::collections::HashSet::from([
            "dev-00001".to_string()
        ])));
        let (rec, sent) = recorder();
        let off = offline.clone();
        let p: Publisher = Arc::new(move |d: &str, l: &str, b: Vec<u8>| {
            if off.lock().unwrap().contains(d) {
                return false;
            }
            rec(d, l, b)
        });
        let mut f = fx_with(Db::open(dir.path()).unwrap(), dir.path(), Some(p));
        f.sent = sent;
        let first = f.start(spec(&["100%"], "100%", "0%", "1h"), 3);
        assert_eq!(first.len(), 2);
        for d in &first {
            f.accept(d, T0 + 1);
        }
        assert_eq!(f.state("r-1").devices["dev-00001"].state, DeviceState::Sent);
        f.tick_quiet(T0 + 10_000);
        offline.lock().unwrap().clear();
        f.engine.on_device_online("dev-00001", T0 + 20_000).unwrap();
        let got = f.take_one(T0 + 20_000);
        assert_eq!(got.device, "dev-00001");
        assert_eq!(got.id, "r-1.1.i");
        assert!(is_install(&got));
        // still unanswered: re-sent 30 s after the last send, not before
        f.tick_quiet(T0 + 49_999);
        f.engine.tick(T0 + 50_000).unwrap();
        let again = f.take_one(T0 + 50_000);
        assert!(again.counter > got.counter);
        f.commit(&again, T0 + 60_000);
        for d in &first {
            f.committed(&d.device, T0 + 61_000);
        }
        assert_eq!(f.state("r-1").state, RolloutState::Completed);
        f.tick_quiet(T0 + 10 * MIN);
    }

    #[test]
    fn state_survives_a_restart_mid_rollout() {
        let dir = tempfile::tempdir().unwrap();
        let (before, w1, last_counter) = {
            let f = fx(dir.path());
            let canary = f.start_canary(spec(&["1", "100%"], "100%", "10%", "30m"), 10);
            f.commit(&canary, T0 + MIN);
            let w1 = f.take(T0 + MIN);
            assert_eq!(w1.len(), 9);
            for d in &w1[..3] {
                f.commit(d, T0 + 2 * MIN);
            }
            f.accept(&w1[3], T0 + 2 * MIN);
            let c = w1.iter().map(|d| d.counter).max().unwrap();
            (f.state("r-1"), w1, c)
        }; // engine, db and issuer dropped: as after kill -9 (every write was flushed)
        let f = fx(dir.path());
        assert_eq!(f.state("r-1"), before);
        assert_eq!(f.engine.list().unwrap().len(), 1);
        // unanswered directives are re-sent with higher counters, the same ids
        f.engine.tick(T0 + 3 * MIN).unwrap();
        let resent = f.take(T0 + 3 * MIN);
        assert_eq!(resent.len(), 5);
        assert!(resent.iter().all(|d| d.counter > last_counter));
        for d in &resent {
            assert!(w1[4..].iter().any(|o| o.id == d.id && o.device == d.device));
        }
        for d in &w1[3..] {
            f.commit(d, T0 + 4 * MIN);
        }
        let v = f.state("r-1");
        assert_eq!(v.state, RolloutState::Completed);
        assert_eq!(v.waves[1].succeeded, 9);
        // the next rollout id continues
        let v = f
            .create_as("o", spec(&["100%"], "1", "0", "1m"), 1, T0 + 5 * MIN)
            .unwrap();
        assert_eq!(v.id, "r-2");
        // a deadline that passed while the server was down applies on the first tick
        drop(f);
        let f = fx(dir.path());
        f.engine.tick(T0 + 10 * MIN).unwrap();
        assert_eq!(f.state("r-2").state, RolloutState::Halted);
        // a damaged record stops the start, naming its key
        drop(f);
        let db = Db::open(dir.path()).unwrap();
        let mut h: serde_json::Value = db.get(TREE, "h/r-2").unwrap().unwrap();
        h["current_wave"] = serde_json::json!(5);
        db.put(TREE, "h/r-2", &h).unwrap();
        let issuer =
            Arc::new(Issuer::open(&config::Directives::default(), dir.path(), db.clone()).unwrap());
        let e = Rollouts::open(db, issuer, recorder().0, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("h/r-2") && e.contains("current_wave 5"), "{e}");
    }

    #[test]
    fn fleet_rollback_aborts_the_models_rollout_and_tracks_devices() {
        let (_dir, f) = fresh();
        f.start(spec(&["100%"], "1", "0", "1h"), 3);
        let r = f
            .engine
            .fleet_rollback("pdm", devices(2), "bad\nmodel", "ops", T0 + 1)
            .unwrap();
        assert_eq!(r.devices, devices(2));
        assert_eq!(r.aborted_rollouts, vec!["r-1".to_string()]);
        assert_eq!(f.state("r-1").state, RolloutState::Aborted);
        let rb = f.take(T0 + 1);
        assert_eq!(rb.len(), 2);
        assert!(matches!(&rb[0].action, Action::Rollback { reason, .. } if reason == "bad model"));
        f.complete_rollback(&rb[0], None, T0 + 2);
        f.refuse(&rb[1], "no previous version", T0 + 2);
        // fleet rollbacks are not rollouts
        assert_eq!(f.engine.list().unwrap().len(), 1);
        assert!(f.engine.get(&r.id).is_err());
        // answered rollbacks are not re-sent
        f.tick_quiet(T0 + MIN);
        let none = f
            .engine
            .fleet_rollback("other", vec![], "x", "ops", T0)
            .unwrap();
        assert!(none.devices.is_empty() && none.aborted_rollouts.is_empty());
        let e = f
            .engine
            .fleet_rollback("bad model", vec![], "x", "ops", T0)
            .unwrap_err();
        assert_eq!(e.status_class(), ErrorClass::Invalid);
    }

    #[test]
    fn ten_thousand_devices_create_and_complete_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let f = fx_with(Db::temporary().unwrap(), dir.path(), None);
        let started = std::time::Instant::now();
        f.launch(spec(&["1%", "10%", "100%"], "95%", "5%", "30m"), 10_000, T0);
        let mut now = T0;
        let mut waves = 0;
        loop {
            let batch: Vec<_> = std::mem::take(&mut *f.sent.lock().unwrap());
            if batch.is_empty() {
                break;
            }
            waves += 1;
            now += MIN;
            for (dev, _, payload) in batch {
                let env = SignedDirective::parse(&payload).unwrap();
                let d: Directive = serde_json::from_str(&env.directive).unwrap();
                assert_eq!(d.device, dev);
                f.commit(&d, now);
            }
        }
        let took = started.elapsed();
        let v = f.state("r-1");
        assert_eq!(v.state, RolloutState::Completed);
        assert_eq!(waves, 3);
        assert_eq!(
            v.waves.iter().map(|w| w.succeeded).collect::<Vec<_>>(),
            vec![100, 900, 9000]
        );
        eprintln!("10,000-device 3-wave rollout, create to completed: {took:?}");
    }
}
