//! The feedback loop: a bounded in-memory log of recent predictions that true labels or values
//! are matched against (`POST /v1/feedback` and the local MQTT feedback topic), rolling
//! accuracy/F1 or MAE/RMSE per model version, fairness gaps per group, and concept drift from
//! the residuals.
//!
//! Guarantees and bounds:
//! - The log holds at most [`FeedbackConfig::capacity`] predictions (default 100,000) in a ring
//!   buffer; the oldest is evicted (and counted) when a new one arrives. Each entry costs
//!   [`Feedback::bytes_per_entry`] bytes plus its id's heap allocation (about 150 bytes in all
//!   for a 30-byte id; see [`Feedback::approx_memory_bytes`]). The log lives in memory only:
//!   predictions made before a restart cannot be labelled (their ids are "unknown or expired").
//! - At most [`MAX_VERSIONS`] model versions are tracked (the least recently used is dropped,
//!   and its predictions expire), each with at most [`MAX_GROUPS`] group values (later values
//!   count as [`OTHER_GROUP`]) and a window of the last [`FeedbackConfig::window`] labelled
//!   predictions.
//! - [`Feedback::record`] takes one mutex once per request and does no JSON work; metrics are
//!   computed when a [`FeedbackSummary`] is asked for, outside the lock.
//! - A prediction takes one truth: sending the same truth again is a duplicate (not counted
//!   twice), a different truth is refused.
//!
//! Metrics use `shared::metrics` (scikit-learn conventions): binary F1 is the positive class's,
//! multi-class F1 the macro average over the classes that occur. Concept drift is a one-sided
//! z-test of the recent error (classifiers: error rate, two-proportion test; regressors: mean
//! absolute residual, Welch test) against a baseline: the bundle's signoff metric when given,
//! else the first full window after activation. See [`DriftSummary`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use shared::bundle::{Manifest, Signoff};
use shared::engine::json_kind;
use shared::engine::Labels;
use shared::metrics::{self, Classification};

/// Default number of predictions kept for matching feedback.
pub const DEFAULT_CAPACITY: usize = 100_000;
/// Default number of labelled predictions in the rolling window.
pub const DEFAULT_WINDOW: usize = 1_000;
/// Model versions tracked at once.
pub const MAX_VERSIONS: usize = 32;
/// Distinct group values per version; later ones are counted as [`OTHER_GROUP`].
pub const MAX_GROUPS: usize = 64;
/// Group values are cut to this many bytes.
pub const MAX_GROUP_BYTES: usize = 64;
/// Longest accepted prediction id and label text.
pub const MAX_ID_BYTES: usize = 256;
/// Items in one batch body.
pub const MAX_BATCH: usize = 1_000;
/// Largest feedback body [`parse_request`] reads.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// The group that values beyond [`MAX_GROUPS`] fall into.
pub const OTHER_GROUP: &str = "(other)";
/// Version of the [`FeedbackSummary`] record.
pub const SUMMARY_SCHEMA: u32 = 1;
/// |z| is capped here so the statistic stays finite (zero variance).
const Z_CAP: f64 = 1e6;
const NO_GROUP: u16 = u16::MAX;
const MAX_NOTES: usize = 8;

/// One model version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelKey {
    pub name: Arc<str>,
    pub version: Arc<str>,
    pub release: u64,
}

impl ModelKey {
    pub fn new(name: &str, version: &str, release: u64) -> ModelKey {
        ModelKey {
            name: name.into(),
            version: version.into(),
            release,
        }
    }
}

/// What a model predicts.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Class labels in probability-column order (integer labels as decimal text), and the
    /// positive class (binary F1, fairness); `None` for multi-class without a positive label.
    Classifier {
        classes: Arc<[String]>,
        positive: Option<usize>,
    },
    Regressor,
}

impl Task {
    fn name(&self) -> &'static str {
        match self {
            Task::Classifier { .. } => "classification",
            Task::Regressor => "regression",
        }
    }
}

/// The baseline concept drift is measured against (from the bundle's signoff).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Baseline {
    /// A classifier's signoff accuracy on `rows` holdout rows (`rows` 0: taken as exact).
    Accuracy { accuracy: f64, rows: u64 },
    /// A regressor's signoff MAE (and RMSE when known) on `rows` holdout rows.
    Regression {
        mae: f64,
        rmse: Option<f64>,
        rows: u64,
    },
}

impl Baseline {
    /// The signoff's `accuracy` (classification) or `mae`/`rmse` (regression), if finite.
    pub fn from_signoff(s: &Signoff) -> Option<Baseline> {
        let get = |name: &str| s.metrics.get(name).copied().filter(|v| v.is_finite());
        match s.task.as_str() {
            "classification" => {
                get("accuracy")
                    .filter(|a| (0.0..=1.0).contains(a))
                    .map(|accuracy| Baseline::Accuracy {
                        accuracy,
                        rows: s.rows,
                    })
            }
            "regression" => get("mae")
                .filter(|m| *m >= 0.0)
                .map(|mae| Baseline::Regression {
                    mae,
                    rmse: get("rmse"),
                    rows: s.rows,
                }),
            _ => None,
        }
    }

    /// Mean error, its variance, and the number of rows it was measured on.
    fn stats(&self) -> (f64, f64, u64) {
        match *self {
            Baseline::Accuracy { accuracy, rows } => {
                let p = 1.0 - accuracy;
                (p, p * (1.0 - p), rows)
            }
            Baseline::Regression { mae, rmse, rows } => {
                // Var|r| = E r^2 - (E|r|)^2; without the RMSE assume half-normal residuals.
                let var = match rmse {
                    Some(r) => (r * r - mae * mae).max(0.0),
                    None => mae * mae * (std::f64::consts::FRAC_PI_2 - 1.0),
                };
                (mae, var, rows)
            }
        }
    }
}

/// How one model version takes feedback.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub task: Task,
    /// The input feature whose value is a row's group (fairness); `None`: no groups.
    pub group_feature: Option<String>,
    /// Reference ("privileged") group for fairness gaps; `None`: the group with most rows.
    pub reference_group: Option<String>,
    pub baseline: Option<Baseline>,
}

impl ModelSpec {
    /// The spec of a loaded bundle: a classifier when the model has class labels (positive
    /// class: the signoff's `positive_label`, else the second of two classes), else a
    /// regressor; group feature, reference group and baseline from the signoff.
    pub fn from_manifest(m: &Manifest, class_labels: Option<&Labels>) -> ModelSpec {
        let signoff = m.signoff.as_ref();
        let task = match class_labels {
            Some(labels) => {
                let classes: Vec<String> = match labels {
                    Labels::Int(v) => v.iter().map(|i| i.to_string()).collect(),
                    Labels::Str(v) => v.clone(),
                };
                let positive = signoff
                    .and_then(|s| s.positive_label.as_ref())
                    .and_then(|p| classes.iter().position(|c| c == p))
                    .or((classes.len() == 2).then_some(1));
                Task::Classifier {
                    classes: classes.into(),
                    positive,
                }
            }
            None => Task::Regressor,
        };
        let baseline = signoff.and_then(Baseline::from_signoff).filter(|b| {
            matches!(
                (b, &task),
                (Baseline::Accuracy { .. }, Task::Classifier { .. })
                    | (Baseline::Regression { .. }, Task::Regressor)
            )
        });
        ModelSpec {
            task,
            group_feature: signoff.and_then(|s| s.group_column.clone()),
            reference_group: signoff.and_then(|s| s.reference_group.clone()),
            baseline,
        }
    }
}

/// A prediction as the log keeps it (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Predicted {
    /// Index into the classes, and the positive class's probability when the model gives one.
    Class {
        index: u32,
        positive_proba: Option<f32>,
    },
    Value(f64),
}

/// Reads each rendered output row (`Prediction::outputs`) as a [`Predicted`]; `None` for a
/// row that does not fit the task (no label among the classes, no finite number).
///
/// Classifiers: the label is the first output holding a string or an integer, the scores the
/// first holding an array (by class index) or an object (by class label, as ZipMap renders).
/// Regressors: the first number of the first output that has one.
pub fn predictions_from_outputs(
    task: &Task,
    outputs: &[Map<String, Value>],
) -> Vec<Option<Predicted>> {
    outputs
        .iter()
        .map(|row| predicted_from_row(task, row))
        .collect()
}

fn predicted_from_row(task: &Task, row: &Map<String, Value>) -> Option<Predicted> {
    match task {
        Task::Classifier { classes, positive } => {
            let label = row.values().find_map(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
                Value::Array(a) if a.len() == 1 => match &a[0] {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
                    _ => None,
                },
                _ => None,
            })?;
            let index = classes.iter().position(|c| *c == label)?;
            let positive_proba = positive.and_then(|p| {
                row.values().find_map(|v| match v {
                    Value::Object(o) => Some(o.get(classes.get(p)?.as_str())?.as_f64()),
                    Value::Array(a) if a.len() == classes.len() => Some(a.get(p)?.as_f64()),
                    _ => None,
                })?
            });
            Some(Predicted::Class {
                index: u32::try_from(index).ok()?,
                positive_proba: positive_proba.filter(|p| p.is_finite()).map(|p| p as f32),
            })
        }
        Task::Regressor => row
            .values()
            .find_map(first_number)
            .filter(|v| v.is_finite())
            .map(Predicted::Value),
    }
}

fn first_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Array(a) => a.first().and_then(first_number),
        _ => None,
    }
}

/// The group value of each request row: the value of `feature` (text as is, numbers and
/// booleans as JSON text, missing or null as ""). `position` is the feature's index in a
/// single vector input, for rows that hold one array instead of named features.
pub fn group_values(
    rows: &[Map<String, Value>],
    feature: &str,
    position: Option<usize>,
) -> Vec<String> {
    rows.iter()
        .map(|row| {
            let v = match row.get(feature) {
                Some(v) => Some(v),
                None => position.and_then(|p| {
                    row.values()
                        .next()
                        .and_then(Value::as_array)
                        .and_then(|a| a.get(p))
                }),
            };
            match v {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            }
        })
        .collect()
}

/// A true label: text, or an integer matched against the class labels' text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Label {
    Text(String),
    Int(i64),
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Label::Text(s) => write!(f, "{s:?}"),
            Label::Int(i) => write!(f, "{i}"),
        }
    }
}

/// The truth for one prediction.
#[derive(Debug, Clone, PartialEq)]
pub enum Truth {
    Label(Label),
    Value(f64),
}

impl std::fmt::Display for Truth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Truth::Label(l) => write!(f, "label {l}"),
            Truth::Value(v) => write!(f, "value {v}"),
        }
    }
}

/// Why feedback was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeedbackError {
    #[error(
        "prediction id {id:?} is unknown or expired: the agent keeps its last {capacity} \
         predictions in memory, none from before a restart"
    )]
    UnknownId { id: String, capacity: usize },
    #[error(
        "prediction id {id:?} expired: its model version is no longer tracked (at most \
         {MAX_VERSIONS} versions are)"
    )]
    VersionExpired { id: String },
    #[error("prediction id {id:?} is already labelled {existing}; refusing a different {given}")]
    AlreadyLabelled {
        id: String,
        existing: String,
        given: String,
    },
    #[error("prediction id {id:?} is from {model:?}, a {task} model: send {expected}")]
    WrongKind {
        id: String,
        model: String,
        task: &'static str,
        expected: &'static str,
    },
    #[error(
        "prediction id {id:?}: label {label} is not a class of model {model:?}; classes: {}",
        list(allowed)
    )]
    UnknownClass {
        id: String,
        label: String,
        model: String,
        allowed: Vec<String>,
    },
    #[error("prediction id {id:?}: value {value} is not a finite number")]
    NonFinite { id: String, value: f64 },
}

fn list(names: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

impl FeedbackError {
    /// Short reason, for metric labels and responses.
    pub fn kind(&self) -> &'static str {
        match self {
            FeedbackError::UnknownId { .. } => "unknown_id",
            FeedbackError::VersionExpired { .. } => "expired",
            FeedbackError::AlreadyLabelled { .. } => "already_labelled",
            FeedbackError::WrongKind { .. } => "wrong_kind",
            FeedbackError::UnknownClass { .. } => "unknown_class",
            FeedbackError::NonFinite { .. } => "non_finite",
        }
    }

    /// The HTTP status that fits: 404 unknown or expired, 409 already labelled, else 422.
    pub fn http_status(&self) -> u16 {
        match self {
            FeedbackError::UnknownId { .. } | FeedbackError::VersionExpired { .. } => 404,
            FeedbackError::AlreadyLabelled { .. } => 409,
            _ => 422,
        }
    }
}

/// A change of a version's concept-drift flag, reported once by the `apply` that caused it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DriftChange {
    Started { z: f64 },
    Cleared { z: f64 },
}

/// What [`Feedback::apply`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub model: ModelKey,
    /// The same truth was already applied; nothing was counted.
    pub duplicate: bool,
    /// Classifiers: whether the prediction was right.
    pub correct: Option<bool>,
    /// Regressors: truth minus prediction.
    pub residual: Option<f64>,
    /// Milliseconds from the prediction to this feedback.
    pub delay_ms: u64,
    pub drift: Option<DriftChange>,
}

/// Settings of the feedback loop (the `[feedback]` section of the configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackConfig {
    /// Predictions kept for matching (1..=16,777,216).
    pub capacity: usize,
    /// Labelled predictions in the rolling window (1..=1,000,000).
    pub window: usize,
    /// Labelled predictions the window needs before drift is tested.
    pub min_labels: usize,
    /// The drift flag is raised when z exceeds this...
    pub z_raise: f64,
    /// ...and cleared when z falls below this (hysteresis).
    pub z_clear: f64,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        FeedbackConfig {
            capacity: DEFAULT_CAPACITY,
            window: DEFAULT_WINDOW,
            min_labels: 100,
            z_raise: 3.0,
            z_clear: 2.0,
        }
    }
}

/// An invalid [`FeedbackConfig`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("feedback.{field} = {value} is out of range {min}..={max}")]
    OutOfRange {
        field: &'static str,
        value: f64,
        min: f64,
        max: f64,
    },
}

impl FeedbackConfig {
    /// Checks every field's range; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks: [(&'static str, f64, f64, f64); 5] = [
            ("capacity", self.capacity as f64, 1.0, (1u64 << 24) as f64),
            ("window", self.window as f64, 1.0, 1e6),
            ("min_labels", self.min_labels as f64, 1.0, 1e6),
            ("z_raise", self.z_raise, 0.0, 1e3),
            ("z_clear", self.z_clear, 0.0, self.z_raise),
        ];
        for (field, value, min, max) in checks {
            if !(value >= min && value <= max) {
                return Err(ConfigError::OutOfRange {
                    field,
                    value,
                    min,
                    max,
                });
            }
        }
        Ok(())
    }
}

/// Counters of the log as a whole.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogStats {
    pub capacity: u64,
    /// Predictions held now.
    pub entries: u64,
    pub recorded_total: u64,
    /// Predictions pushed out of the full log.
    pub evicted_total: u64,
    /// Predictions not recorded: the version was not registered.
    pub unregistered_total: u64,
    /// Predictions not recorded: the output did not fit the task.
    pub unreadable_total: u64,
    /// Predictions made unreachable by a 64-bit hash collision of two ids (expected: 0).
    pub collisions_total: u64,
    /// Feedback refused, by [`FeedbackError::kind`].
    pub refused_total: BTreeMap<String, u64>,
    pub versions: u64,
}

/// Correct/incorrect or residual of one labelled prediction, in the rolling window.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Class { truth: u32, predicted: u32 },
    Value { truth: f64, predicted: f64 },
}

#[derive(Debug, Clone, Copy)]
struct WindowItem {
    outcome: Outcome,
    group: u16,
}

impl Outcome {
    /// Classifiers: 1 for a wrong prediction; regressors: the absolute residual.
    fn error(&self) -> f64 {
        match *self {
            Outcome::Class { truth, predicted } => f64::from(u8::from(truth != predicted)),
            Outcome::Value { truth, predicted } => (truth - predicted).abs(),
        }
    }
}

/// A stored truth (for duplicate detection).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stored {
    Class(u32),
    Value(f64),
}

/// Since-activation totals.
#[derive(Debug, Clone)]
enum Totals {
    Class {
        true_count: Vec<u64>,
        predicted_count: Vec<u64>,
        hits: Vec<u64>,
    },
    Value {
        n: u64,
        abs_sum: f64,
        sq_sum: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BaselineSource {
    Signoff,
    FirstWindow,
}

#[derive(Debug, Clone)]
struct DriftState {
    /// Mean error, variance, rows (0: exact), source.
    baseline: Option<(f64, f64, u64, BaselineSource)>,
    sum: f64,
    sum_sq: f64,
    /// Items pushed since `sum`/`sum_sq` were last recomputed from the window.
    since_recompute: usize,
    drifting: bool,
    z: Option<f64>,
}

#[derive(Debug)]
struct VersionState {
    key: ModelKey,
    spec: ModelSpec,
    last_used: u64,
    groups: Vec<Box<str>>,
    recorded: u64,
    labelled: u64,
    duplicates: u64,
    refused: u64,
    window: VecDeque<WindowItem>,
    totals: Totals,
    drift: DriftState,
}

/// One logged prediction (see [`Feedback::bytes_per_entry`]).
#[derive(Debug)]
struct Slot {
    id: Box<str>,
    recorded_ms: u64,
    version: u32,
    group: u16,
    predicted: Predicted,
    truth: Option<Stored>,
}

/// `u64` keys that are already hashes.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

struct Inner {
    slots: Vec<Slot>,
    /// Next slot to write once `slots` is full.
    head: usize,
    /// Keyed hash of the id -> slot.
    index: HashMap<u64, u32, BuildHasherDefault<IdentityHasher>>,
    versions: HashMap<u32, VersionState>,
    by_key: HashMap<ModelKey, u32>,
    next_serial: u32,
    use_clock: u64,
    stats: LogStats,
}

/// The feedback loop of one agent (`Send + Sync`; share it in an `Arc`).
pub struct Feedback {
    config: FeedbackConfig,
    hasher: RandomState,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Feedback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feedback")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Feedback {
    pub fn new(config: FeedbackConfig) -> Result<Feedback, ConfigError> {
        config.validate()?;
        let stats = LogStats {
            capacity: config.capacity as u64,
            ..LogStats::default()
        };
        Ok(Feedback {
            inner: Mutex::new(Inner {
                // reserved, not touched: pages become resident as entries arrive
                slots: Vec::with_capacity(config.capacity),
                head: 0,
                index: HashMap::default(),
                versions: HashMap::new(),
                by_key: HashMap::new(),
                next_serial: 0,
                use_clock: 0,
                stats,
            }),
            hasher: RandomState::new(),
            config,
        })
    }

    pub fn config(&self) -> &FeedbackConfig {
        &self.config
    }

    /// Fixed bytes per log entry: the slot and the index entry (load factor 7/8, worst case
    /// just after growth, as 2x), without the id's heap allocation.
    pub fn bytes_per_entry() -> usize {
        std::mem::size_of::<Slot>() + 2 * (std::mem::size_of::<(u64, u32)>() + 1)
    }

    /// An upper estimate of the log's memory when full with ids of `id_len` bytes (the id's
    /// heap chunk as glibc sizes it: 8 bytes of header, 16-byte steps, 32 at least), windows
    /// excluded (32 bytes per labelled item, `window` items per version).
    pub fn approx_memory_bytes(&self, id_len: usize) -> usize {
        let id_alloc = ((id_len + 8).div_ceil(16) * 16).max(32);
        self.config.capacity * (Self::bytes_per_entry() + id_alloc)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (no multi-step invariant is
        // left half-done across a panic point), so a poisoned lock is used as is.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking a model version (call when it is activated). A version already
    /// tracked keeps its state. The least recently used version is dropped beyond
    /// [`MAX_VERSIONS`].
    pub fn register(&self, model: &ModelKey, spec: ModelSpec) {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.use_clock += 1;
        if let Some(s) = inner.by_key.get(model) {
            if let Some(v) = inner.versions.get_mut(s) {
                v.last_used = inner.use_clock;
            }
            return;
        }
        if inner.versions.len() >= MAX_VERSIONS {
            if let Some((&old, _)) = inner.versions.iter().min_by_key(|(_, v)| v.last_used) {
                if let Some(v) = inner.versions.remove(&old) {
                    inner.by_key.remove(&v.key);
                }
            }
        }
        let serial = inner.next_serial;
        inner.next_serial = inner.next_serial.wrapping_add(1);
        let totals = match &spec.task {
            Task::Classifier { classes, .. } => Totals::Class {
                true_count: vec![0; classes.len()],
                predicted_count: vec![0; classes.len()],
                hits: vec![0; classes.len()],
            },
            Task::Regressor => Totals::Value {
                n: 0,
                abs_sum: 0.0,
                sq_sum: 0.0,
            },
        };
        let baseline = spec.baseline.map(|b| {
            let (m, v, n) = b.stats();
            (m, v, n, BaselineSource::Signoff)
        });
        inner.versions.insert(
            serial,
            VersionState {
                key: model.clone(),
                spec,
                last_used: inner.use_clock,
                groups: Vec::new(),
                recorded: 0,
                labelled: 0,
                duplicates: 0,
                refused: 0,
                window: VecDeque::with_capacity(self.config.window.min(4096)),
                totals,
                drift: DriftState {
                    baseline,
                    sum: 0.0,
                    sum_sq: 0.0,
                    since_recompute: 0,
                    drifting: false,
                    z: None,
                },
            },
        );
        inner.by_key.insert(model.clone(), serial);
        inner.stats.versions = inner.versions.len() as u64;
    }

    /// Whether `model` is tracked.
    pub fn is_registered(&self, model: &ModelKey) -> bool {
        self.lock().by_key.contains_key(model)
    }

    /// Logs the predictions of one request: `ids[i]` made `predictions[i]` (`None`: not
    /// readable, skipped), in group `groups[i]` when the model has a group feature. Extra
    /// entries of the longer slice are ignored. Returns how many were logged. One lock, no
    /// JSON; predictions of an unregistered version are counted and dropped.
    pub fn record(
        &self,
        ids: &[String],
        model: &ModelKey,
        predictions: &[Option<Predicted>],
        groups: Option<&[String]>,
    ) -> usize {
        let hashes: Vec<u64> = ids
            .iter()
            .map(|id| self.hasher.hash_one(id.as_str()))
            .collect();
        let now = now_ms();
        let capacity = self.config.capacity;
        let mut g = self.lock();
        let inner = &mut *g;
        let n = ids.len().min(predictions.len());
        let Some(&serial) = inner.by_key.get(model) else {
            inner.stats.unregistered_total += n as u64;
            return 0;
        };
        inner.use_clock += 1;
        let clock = inner.use_clock;
        let Some(version) = inner.versions.get_mut(&serial) else {
            inner.stats.unregistered_total += n as u64;
            return 0;
        };
        version.last_used = clock;
        let mut logged = 0;
        for i in 0..n {
            let Some(predicted) = predictions[i] else {
                inner.stats.unreadable_total += 1;
                continue;
            };
            let group = match groups.and_then(|g| g.get(i)) {
                Some(value) if version.spec.group_feature.is_some() => {
                    intern(&mut version.groups, value)
                }
                _ => NO_GROUP,
            };
            let slot = Slot {
                id: ids[i].as_str().into(),
                recorded_ms: now,
                version: serial,
                group,
                predicted,
                truth: None,
            };
            let h = hashes[i];
            let at = if inner.slots.len() < capacity {
                inner.slots.push(slot);
                inner.slots.len() - 1
            } else {
                let at = inner.head;
                inner.head = (inner.head + 1) % capacity;
                let old_hash = self.hasher.hash_one(&*inner.slots[at].id);
                if inner.index.get(&old_hash) == Some(&(at as u32)) {
                    inner.index.remove(&old_hash);
                }
                inner.slots[at] = slot;
                inner.stats.evicted_total += 1;
                at
            };
            if let Some(prev) = inner.index.insert(h, at as u32) {
                let prev = prev as usize;
                if prev != at && inner.slots.get(prev).is_some_and(|s| *s.id != *ids[i]) {
                    inner.stats.collisions_total += 1;
                }
            }
            logged += 1;
        }
        version.recorded += logged as u64;
        inner.stats.recorded_total += logged as u64;
        inner.stats.entries = inner.slots.len() as u64;
        logged
    }

    /// Applies the truth for one prediction. The same truth twice is reported as a
    /// duplicate (counted once); a different truth is refused.
    pub fn apply(&self, prediction_id: &str, truth: Truth) -> Result<Applied, FeedbackError> {
        let h = self.hasher.hash_one(prediction_id);
        let now = now_ms();
        let mut g = self.lock();
        let inner = &mut *g;
        let result = Self::apply_locked(&self.config, inner, h, prediction_id, truth, now);
        if let Err(e) = &result {
            *inner
                .stats
                .refused_total
                .entry(e.kind().to_string())
                .or_default() += 1;
        }
        result
    }

    fn apply_locked(
        config: &FeedbackConfig,
        inner: &mut Inner,
        h: u64,
        id: &str,
        truth: Truth,
        now: u64,
    ) -> Result<Applied, FeedbackError> {
        let unknown = || FeedbackError::UnknownId {
            id: id.to_string(),
            capacity: config.capacity,
        };
        let at = *inner.index.get(&h).ok_or_else(unknown)? as usize;
        let slot = inner
            .slots
            .get_mut(at)
            .filter(|s| &*s.id == id)
            .ok_or_else(unknown)?;
        let Some(version) = inner.versions.get_mut(&slot.version) else {
            return Err(FeedbackError::VersionExpired { id: id.to_string() });
        };
        let stored = match (&version.spec.task, &truth) {
            (_, Truth::Value(v)) if !v.is_finite() => {
                version.refused += 1;
                return Err(FeedbackError::NonFinite {
                    id: id.to_string(),
                    value: *v,
                });
            }
            (Task::Classifier { classes, .. }, Truth::Label(label)) => {
                let text = match label {
                    Label::Text(t) => t.clone(),
                    Label::Int(i) => i.to_string(),
                };
                match classes.iter().position(|c| *c == text) {
                    Some(ix) => Stored::Class(ix as u32),
                    None => {
                        version.refused += 1;
                        return Err(FeedbackError::UnknownClass {
                            id: id.to_string(),
                            label: label.to_string(),
                            model: version.key.name.to_string(),
                            allowed: classes.to_vec(),
                        });
                    }
                }
            }
            (Task::Regressor, Truth::Value(v)) => Stored::Value(*v),
            (task, _) => {
                version.refused += 1;
                return Err(FeedbackError::WrongKind {
                    id: id.to_string(),
                    model: version.key.name.to_string(),
                    task: task.name(),
                    expected: match task {
                        Task::Classifier { .. } => "a \"label\" (one of the class labels)",
                        Task::Regressor => "a numeric \"value\"",
                    },
                });
            }
        };
        let delay_ms = now.saturating_sub(slot.recorded_ms);
        let (correct, residual, outcome) = match (stored, slot.predicted) {
            (Stored::Class(t), Predicted::Class { index, .. }) => (
                Some(t == index),
                None,
                Outcome::Class {
                    truth: t,
                    predicted: index,
                },
            ),
            (Stored::Value(t), Predicted::Value(p)) => (
                None,
                Some(t - p),
                Outcome::Value {
                    truth: t,
                    predicted: p,
                },
            ),
            _ => {
                // a prediction recorded with the other kind than its version's task
                version.refused += 1;
                return Err(FeedbackError::WrongKind {
                    id: id.to_string(),
                    model: version.key.name.to_string(),
                    task: version.spec.task.name(),
                    expected: "feedback matching the recorded prediction",
                });
            }
        };
        if let Some(existing) = slot.truth {
            if existing == stored {
                version.duplicates += 1;
                return Ok(Applied {
                    model: version.key.clone(),
                    duplicate: true,
                    correct,
                    residual,
                    delay_ms,
                    drift: None,
                });
            }
            version.refused += 1;
            let show = |s: Stored| match (s, &version.spec.task) {
                (Stored::Class(i), Task::Classifier { classes, .. }) => format!(
                    "label {:?}",
                    classes.get(i as usize).map(String::as_str).unwrap_or("?")
                ),
                (Stored::Value(v), _) => format!("value {v}"),
                (Stored::Class(i), _) => format!("class {i}"),
            };
            return Err(FeedbackError::AlreadyLabelled {
                id: id.to_string(),
                existing: show(existing),
                given: show(stored),
            });
        }
        slot.truth = Some(stored);
        let item = WindowItem {
            outcome,
            group: slot.group,
        };
        let drift = version.push(item, config);
        Ok(Applied {
            model: version.key.clone(),
            duplicate: false,
            correct,
            residual,
            delay_ms,
            drift,
        })
    }

    /// Applies a batch (for `POST /v1/feedback` and the MQTT topic), one lock per item.
    pub fn apply_batch(&self, items: Vec<FeedbackItem>) -> BatchOutcome {
        let mut out = BatchOutcome {
            applied: 0,
            duplicates: 0,
            refused: 0,
            items: Vec::with_capacity(items.len()),
            drift_changes: Vec::new(),
        };
        for item in items {
            match self.apply(&item.prediction_id, item.truth) {
                Ok(a) => {
                    if a.duplicate {
                        out.duplicates += 1;
                    } else {
                        out.applied += 1;
                    }
                    if let Some(change) = a.drift {
                        out.drift_changes.push((a.model.clone(), change));
                    }
                    out.items.push(ItemOutcome {
                        prediction_id: item.prediction_id,
                        status: if a.duplicate { "duplicate" } else { "applied" }.to_string(),
                        model: Some(a.model.name.to_string()),
                        version: Some(a.model.version.to_string()),
                        reason: None,
                        error: None,
                    });
                }
                Err(e) => {
                    out.refused += 1;
                    out.items.push(ItemOutcome {
                        prediction_id: item.prediction_id,
                        status: "refused".to_string(),
                        model: None,
                        version: None,
                        reason: Some(e.kind().to_string()),
                        error: Some(e.to_string()),
                    });
                }
            }
        }
        out
    }

    /// Counters of the log.
    pub fn stats(&self) -> LogStats {
        self.lock().stats.clone()
    }

    /// The summary of one version, if tracked.
    pub fn summary(&self, model: &ModelKey) -> Option<FeedbackSummary> {
        let snapshot = {
            let g = self.lock();
            let serial = g.by_key.get(model)?;
            g.versions.get(serial).map(Snapshot::of)?
        };
        Some(snapshot.summarize(&self.config))
    }

    /// Summaries of every tracked version, by model name and release.
    pub fn summaries(&self) -> Vec<FeedbackSummary> {
        let snapshots: Vec<Snapshot> = {
            let g = self.lock();
            g.versions.values().map(Snapshot::of).collect()
        };
        let mut out: Vec<FeedbackSummary> = snapshots
            .into_iter()
            .map(|s| s.summarize(&self.config))
            .collect();
        out.sort_by(|a, b| (&a.model, a.release).cmp(&(&b.model, b.release)));
        out
    }
}

fn intern(groups: &mut Vec<Box<str>>, value: &str) -> u16 {
    let value = cut(value, MAX_GROUP_BYTES);
    if let Some(i) = groups.iter().position(|g| &**g == value) {
        return i as u16;
    }
    if groups.len() < MAX_GROUPS {
        groups.push(value.into());
        return (groups.len() - 1) as u16;
    }
    match groups.iter().position(|g| &**g == OTHER_GROUP) {
        Some(i) => i as u16,
        None => {
            groups.push(OTHER_GROUP.into());
            (groups.len() - 1) as u16
        }
    }
}

impl VersionState {
    /// Adds a labelled prediction to the window, the totals and the drift test.
    fn push(&mut self, item: WindowItem, config: &FeedbackConfig) -> Option<DriftChange> {
        self.labelled += 1;
        match (&mut self.totals, item.outcome) {
            (
                Totals::Class {
                    true_count,
                    predicted_count,
                    hits,
                },
                Outcome::Class { truth, predicted },
            ) => {
                let (t, p) = (truth as usize, predicted as usize);
                if let (Some(_), Some(_)) = (true_count.get(t), predicted_count.get(p)) {
                    true_count[t] += 1;
                    predicted_count[p] += 1;
                    if t == p {
                        hits[t] += 1;
                    }
                }
            }
            (Totals::Value { n, abs_sum, sq_sum }, Outcome::Value { truth, predicted }) => {
                let r = truth - predicted;
                *n += 1;
                *abs_sum += r.abs();
                *sq_sum += r * r;
            }
            _ => {}
        }
        let e = item.outcome.error();
        let d = &mut self.drift;
        if self.window.len() >= config.window {
            if let Some(old) = self.window.pop_front() {
                let o = old.outcome.error();
                d.sum -= o;
                d.sum_sq -= o * o;
            }
        }
        self.window.push_back(item);
        d.sum += e;
        d.sum_sq += e * e;
        d.since_recompute += 1;
        if d.since_recompute >= config.window {
            // bound the floating-point error of the running sums
            d.sum = self.window.iter().map(|w| w.outcome.error()).sum();
            d.sum_sq = self.window.iter().map(|w| w.outcome.error().powi(2)).sum();
            d.since_recompute = 0;
        }
        let n = self.window.len();
        if d.baseline.is_none() && n >= config.window {
            let (m, v) = mean_var(d.sum, d.sum_sq, n);
            d.baseline = Some((m, v, n as u64, BaselineSource::FirstWindow));
        }
        let (m0, v0, n0, _) = d.baseline?;
        if n < config.min_labels.min(config.window) {
            d.z = None;
            return None;
        }
        let classifier = matches!(self.spec.task, Task::Classifier { .. });
        let (m1, v1) = mean_var(d.sum, d.sum_sq, n);
        let z = z_statistic(classifier, (m1, v1, n as u64), (m0, v0, n0));
        d.z = Some(z);
        if !d.drifting && z > config.z_raise {
            d.drifting = true;
            Some(DriftChange::Started { z })
        } else if d.drifting && z < config.z_clear {
            d.drifting = false;
            Some(DriftChange::Cleared { z })
        } else {
            None
        }
    }
}

/// Mean and sample variance from running sums.
fn mean_var(sum: f64, sum_sq: f64, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 0.0);
    }
    let nf = n as f64;
    let mean = sum / nf;
    let var = if n > 1 {
        ((sum_sq - nf * mean * mean) / (nf - 1.0)).max(0.0)
    } else {
        0.0
    };
    (mean, var)
}

/// One-sided z statistic of "recent error > baseline error".
///
/// Classifiers (error indicator): two-proportion z-test with the pooled proportion,
/// `z = (p1 - p0) / sqrt(p (1 - p) (1/n1 + 1/n0))`; with an exact baseline (`n0` = 0) the
/// one-sample test `z = (p1 - p0) / sqrt(p0 (1 - p0) / n1)`. Regressors (absolute residuals):
/// Welch's `z = (m1 - m0) / sqrt(v1/n1 + v0/n0)` (`v0/n0` left out when `n0` = 0). A zero
/// standard error gives 0 for no increase and [`Z_CAP`] for an increase.
fn z_statistic(classifier: bool, recent: (f64, f64, u64), base: (f64, f64, u64)) -> f64 {
    let (m1, v1, n1) = recent;
    let (m0, v0, n0) = base;
    if n1 == 0 {
        return 0.0;
    }
    let n1f = n1 as f64;
    let se = if classifier {
        if n0 == 0 {
            (m0 * (1.0 - m0) / n1f).sqrt()
        } else {
            let n0f = n0 as f64;
            let p = (m1 * n1f + m0 * n0f) / (n1f + n0f);
            (p * (1.0 - p) * (1.0 / n1f + 1.0 / n0f)).sqrt()
        }
    } else {
        let base_term = if n0 == 0 { 0.0 } else { v0 / n0 as f64 };
        (v1 / n1f + base_term).sqrt()
    };
    let diff = m1 - m0;
    let z = if se > 1e-12 {
        diff / se
    } else if diff > 1e-12 {
        Z_CAP
    } else {
        0.0
    };
    z.clamp(-Z_CAP, Z_CAP)
}

/// What a summary needs, copied under the lock.
struct Snapshot {
    key: ModelKey,
    spec: ModelSpec,
    groups: Vec<Box<str>>,
    recorded: u64,
    labelled: u64,
    duplicates: u64,
    refused: u64,
    window: Vec<WindowItem>,
    totals: Totals,
    drift: DriftState,
}

impl Snapshot {
    fn of(v: &VersionState) -> Snapshot {
        Snapshot {
            key: v.key.clone(),
            spec: v.spec.clone(),
            groups: v.groups.clone(),
            recorded: v.recorded,
            labelled: v.labelled,
            duplicates: v.duplicates,
            refused: v.refused,
            window: v.window.iter().copied().collect(),
            totals: v.totals.clone(),
            drift: v.drift.clone(),
        }
    }

    fn group_name(&self, g: u16) -> Option<String> {
        (g != NO_GROUP).then(|| {
            self.groups
                .get(g as usize)
                .map(|s| s.to_string())
                .unwrap_or_default()
        })
    }

    fn summarize(self, config: &FeedbackConfig) -> FeedbackSummary {
        let mut notes = Vec::new();
        let mut fairness = None;
        let mut group_errors = Vec::new();
        let window = match &self.spec.task {
            Task::Classifier { classes, positive } => {
                let (w, f) = self.classifier_window(classes, *positive, &mut notes);
                fairness = f;
                w
            }
            Task::Regressor => {
                let (w, g) = self.regressor_window(&mut notes);
                group_errors = g;
                w
            }
        };
        let since_activation = match &self.totals {
            Totals::Class {
                true_count,
                predicted_count,
                hits,
            } => {
                let positive = match &self.spec.task {
                    Task::Classifier { positive, .. } => *positive,
                    Task::Regressor => None,
                };
                let (accuracy, f1) = accuracy_f1(true_count, predicted_count, hits, positive);
                WindowMetrics {
                    labelled: true_count.iter().sum(),
                    accuracy,
                    f1,
                    mae: None,
                    rmse: None,
                }
            }
            Totals::Value { n, abs_sum, sq_sum } => WindowMetrics {
                labelled: *n,
                accuracy: None,
                f1: None,
                mae: (*n > 0).then(|| abs_sum / *n as f64),
                rmse: (*n > 0).then(|| (sq_sum / *n as f64).sqrt()),
            },
        };
        let classifier = matches!(self.spec.task, Task::Classifier { .. });
        let d = &self.drift;
        let n = self.window.len();
        let drift = DriftSummary {
            test: if classifier {
                "two_proportion_z"
            } else {
                "welch_z_abs_residual"
            }
            .to_string(),
            baseline_source: match d.baseline {
                Some((.., BaselineSource::Signoff)) => "signoff",
                Some((.., BaselineSource::FirstWindow)) => "first_window",
                None => "none",
            }
            .to_string(),
            baseline_error: d.baseline.map(|b| b.0),
            baseline_rows: d.baseline.map(|b| b.2).unwrap_or(0),
            recent_error: (n > 0).then(|| mean_var(d.sum, d.sum_sq, n).0),
            recent_rows: n as u64,
            z: d.z,
            z_raise: config.z_raise,
            z_clear: config.z_clear,
            drifting: d.drifting,
        };
        notes.truncate(MAX_NOTES);
        FeedbackSummary {
            schema: SUMMARY_SCHEMA,
            model: self.key.name.to_string(),
            version: self.key.version.to_string(),
            release: self.key.release,
            task: self.spec.task.name().to_string(),
            recorded_total: self.recorded,
            labelled_total: self.labelled,
            duplicate_total: self.duplicates,
            refused_total: self.refused,
            window_capacity: config.window as u64,
            window,
            since_activation,
            fairness,
            group_errors,
            drift,
            notes,
        }
    }

    fn classifier_window(
        &self,
        classes: &Arc<[String]>,
        positive: Option<usize>,
        notes: &mut Vec<String>,
    ) -> (WindowMetrics, Option<FairnessSummary>) {
        let mut truth = Vec::with_capacity(self.window.len());
        let mut predicted = Vec::with_capacity(self.window.len());
        let mut groups = Vec::with_capacity(self.window.len());
        for w in &self.window {
            if let Outcome::Class {
                truth: t,
                predicted: p,
            } = w.outcome
            {
                truth.push(t as usize);
                predicted.push(p as usize);
                groups.push(self.group_name(w.group));
            }
        }
        let mut metrics = WindowMetrics {
            labelled: truth.len() as u64,
            accuracy: None,
            f1: None,
            mae: None,
            rmse: None,
        };
        if truth.is_empty() {
            return (metrics, None);
        }
        let all_grouped = groups.iter().all(Option::is_some);
        let group_values: Vec<String> = groups.into_iter().map(Option::unwrap_or_default).collect();
        let with_groups = all_grouped && self.spec.group_feature.is_some() && positive.is_some();
        let privileged = self
            .spec
            .reference_group
            .as_deref()
            .filter(|r| with_groups && group_values.iter().any(|g| g == r));
        let c = Classification {
            classes,
            truth: &truth,
            predicted: &predicted,
            proba: None,
            groups: with_groups.then_some(group_values.as_slice()),
            privileged,
            positive: positive.unwrap_or(0),
        };
        match metrics::classification(&c) {
            Ok(report) => {
                metrics.accuracy = report.metrics.get("accuracy").copied();
                // binary F1 needs a positive class; multi-class F1 is the macro average
                if classes.len() > 2 || positive.is_some() {
                    metrics.f1 = report.metrics.get("f1").copied();
                }
                let fairness = with_groups.then(|| FairnessSummary {
                    positive_class: positive
                        .and_then(|p| classes.get(p))
                        .cloned()
                        .unwrap_or_default(),
                    reference_group: privileged.map(str::to_string).or_else(|| {
                        // shared::metrics' default: most rows, ties to the smallest value
                        report
                            .groups
                            .iter()
                            .rev()
                            .max_by_key(|g| g.rows)
                            .map(|g| g.group.clone())
                    }),
                    statistical_parity_difference: report
                        .metrics
                        .get("statistical_parity_difference")
                        .copied(),
                    equal_opportunity_difference: report
                        .metrics
                        .get("equal_opportunity_difference")
                        .copied(),
                    groups: report
                        .groups
                        .iter()
                        .map(|g| GroupRates {
                            group: g.group.clone(),
                            rows: g.rows,
                            selection_rate: g.selection_rate,
                            true_positive_rate: g.true_positive_rate,
                        })
                        .collect(),
                });
                notes.extend(
                    report
                        .notes
                        .into_iter()
                        .filter(|n| n.contains("fairness") || n.contains("not computed")),
                );
                (metrics, fairness)
            }
            Err(e) => {
                notes.push(format!("window metrics not computed: {e}"));
                (metrics, None)
            }
        }
    }

    fn regressor_window(&self, notes: &mut Vec<String>) -> (WindowMetrics, Vec<GroupError>) {
        let mut truth = Vec::with_capacity(self.window.len());
        let mut predicted = Vec::with_capacity(self.window.len());
        let mut by_group: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        for w in &self.window {
            if let Outcome::Value {
                truth: t,
                predicted: p,
            } = w.outcome
            {
                truth.push(t);
                predicted.push(p);
                if let Some(g) = self.group_name(w.group) {
                    let e = by_group.entry(g).or_default();
                    e.0.push(t);
                    e.1.push(p);
                }
            }
        }
        let mut metrics = WindowMetrics {
            labelled: truth.len() as u64,
            accuracy: None,
            f1: None,
            mae: None,
            rmse: None,
        };
        if truth.is_empty() {
            return (metrics, Vec::new());
        }
        match metrics::regression(&truth, &predicted) {
            Ok(r) => {
                metrics.mae = r.metrics.get("mae").copied();
                metrics.rmse = r.metrics.get("rmse").copied();
            }
            Err(e) => notes.push(format!("window metrics not computed: {e}")),
        }
        let groups = by_group
            .into_iter()
            .filter_map(|(group, (t, p))| {
                let r = metrics::regression(&t, &p).ok()?;
                Some(GroupError {
                    group,
                    rows: t.len() as u64,
                    mae: r.metrics.get("mae").copied()?,
                    rmse: r.metrics.get("rmse").copied()?,
                })
            })
            .collect();
        (metrics, groups)
    }
}

/// Accuracy and F1 from per-class counts, by `shared::metrics`' conventions (binary: the
/// positive class's F1, `None` without one; multi-class: macro F1 over the classes that occur
/// in truth or predictions, zero division counted as 0).
fn accuracy_f1(
    true_count: &[u64],
    predicted_count: &[u64],
    hits: &[u64],
    positive: Option<usize>,
) -> (Option<f64>, Option<f64>) {
    let n: u64 = true_count.iter().sum();
    if n == 0 {
        return (None, None);
    }
    let accuracy = hits.iter().sum::<u64>() as f64 / n as f64;
    let f1_of = |c: usize| {
        let denom = predicted_count[c] + true_count[c];
        if denom == 0 {
            0.0
        } else {
            2.0 * hits[c] as f64 / denom as f64
        }
    };
    let k = true_count.len();
    let f1 = if k == 2 {
        positive.filter(|&p| p < k).map(f1_of)
    } else {
        let present: Vec<usize> = (0..k)
            .filter(|&c| true_count[c] + predicted_count[c] > 0)
            .collect();
        (!present.is_empty())
            .then(|| present.iter().map(|&c| f1_of(c)).sum::<f64>() / present.len() as f64)
    };
    (Some(accuracy), f1)
}

/// The feedback metrics of one model version: for `/metrics`, `status --json` and the
/// outbox (record version [`SUMMARY_SCHEMA`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackSummary {
    pub schema: u32,
    pub model: String,
    pub version: String,
    pub release: u64,
    /// `classification` or `regression`.
    pub task: String,
    /// Predictions logged for this version.
    pub recorded_total: u64,
    /// Predictions that received a truth (duplicates not counted).
    pub labelled_total: u64,
    /// Feedback that repeated an applied truth.
    pub duplicate_total: u64,
    /// Feedback refused for this version (wrong kind, unknown class, different truth...).
    pub refused_total: u64,
    /// Configured window size (labelled predictions).
    pub window_capacity: u64,
    /// Over the last `window_capacity` labelled predictions.
    pub window: WindowMetrics,
    /// Over every labelled prediction since the version was registered.
    pub since_activation: WindowMetrics,
    /// Classifiers with a group feature and a positive class: gaps over the window.
    pub fairness: Option<FairnessSummary>,
    /// Regressors with a group feature: error per group over the window.
    pub group_errors: Vec<GroupError>,
    pub drift: DriftSummary,
    /// Why a metric is missing (at most 8).
    pub notes: Vec<String>,
}

/// Metrics over a set of labelled predictions; `None` where not defined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowMetrics {
    pub labelled: u64,
    pub accuracy: Option<f64>,
    /// Binary: the positive class's F1; multi-class: macro F1.
    pub f1: Option<f64>,
    pub mae: Option<f64>,
    pub rmse: Option<f64>,
}

/// Fairness gaps (AIF360 sign: group minus reference; the group with the largest gap).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FairnessSummary {
    pub positive_class: String,
    pub reference_group: Option<String>,
    pub statistical_parity_difference: Option<f64>,
    pub equal_opportunity_difference: Option<f64>,
    pub groups: Vec<GroupRates>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRates {
    pub group: String,
    pub rows: u64,
    pub selection_rate: f64,
    pub true_positive_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupError {
    pub group: String,
    pub rows: u64,
    pub mae: f64,
    pub rmse: f64,
}

/// Concept drift: the recent error against the baseline.
///
/// `test` is `two_proportion_z` (classifiers; error = share of wrong predictions) or
/// `welch_z_abs_residual` (regressors; error = mean absolute residual). `z` is one-sided
/// (positive: the error grew), capped at ±1e6, and `None` until the baseline is known and the
/// window holds `min_labels` labelled predictions. `drifting` is raised when `z > z_raise` and
/// cleared when `z < z_clear`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftSummary {
    pub test: String,
    /// `signoff`, `first_window` or `none` (not yet known).
    pub baseline_source: String,
    pub baseline_error: Option<f64>,
    /// Rows the baseline was measured on (0: taken as exact).
    pub baseline_rows: u64,
    pub recent_error: Option<f64>,
    pub recent_rows: u64,
    pub z: Option<f64>,
    pub z_raise: f64,
    pub z_clear: f64,
    pub drifting: bool,
}

/// One feedback item of a request body.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackItem {
    pub prediction_id: String,
    pub truth: Truth,
}

/// A parsed `POST /v1/feedback` (or MQTT feedback) body.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedbackRequest {
    /// `{"prediction_id": ..., "label"|"value": ...}`
    One(FeedbackItem),
    /// `{"feedback": [item, ...]}`, 1..=[`MAX_BATCH`] items.
    Batch(Vec<FeedbackItem>),
}

impl FeedbackRequest {
    pub fn into_items(self) -> Vec<FeedbackItem> {
        match self {
            FeedbackRequest::One(i) => vec![i],
            FeedbackRequest::Batch(v) => v,
        }
    }
}

/// A bad feedback body; `item` is the batch index, `field` the JSON field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BodyError {
    #[error("feedback body is {bytes} bytes; at most {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error("feedback body is not valid JSON: {0}")]
    Json(String),
    #[error(
        "feedback body must be an object: {{\"prediction_id\": ..., \"label\" or \"value\": ...}} \
         or {{\"feedback\": [...]}}; got {0}"
    )]
    NotObject(&'static str),
    #[error("\"feedback\" has {items} items; at most {max} per request")]
    TooMany { items: usize, max: usize },
    #[error("\"feedback\" is empty")]
    EmptyBatch,
    #[error("{}: {problem}", place(*item, field))]
    Field {
        item: Option<usize>,
        field: String,
        problem: String,
    },
}

fn place(item: Option<usize>, field: &str) -> String {
    match item {
        Some(i) => format!("feedback[{i}].{field}"),
        None => field.to_string(),
    }
}

/// Parses a feedback body (format v1, the same over HTTP and MQTT):
/// `{"prediction_id": "...", "label": "failure"}` or `"label": 1` (classifiers),
/// `{"prediction_id": "...", "value": 3.2}` (regressors), or `{"feedback": [ ... ]}` with
/// 1..=[`MAX_BATCH`] such items. Unknown fields are refused; errors name the item and field.
pub fn parse_request(body: &[u8]) -> Result<FeedbackRequest, BodyError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(BodyError::TooLarge {
            bytes: body.len(),
            max: MAX_BODY_BYTES,
        });
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| BodyError::Json(e.to_string()))?;
    let Value::Object(mut obj) = v else {
        return Err(BodyError::NotObject(json_kind(&v)));
    };
    if let Some(batch) = obj.remove("feedback") {
        if let Some(other) = obj.keys().next() {
            return Err(BodyError::Field {
                item: None,
                field: other.clone(),
                problem: "unknown field: a batch body holds only \"feedback\"".to_string(),
            });
        }
        let Value::Array(items) = batch else {
            return Err(BodyError::Field {
                item: None,
                field: "feedback".to_string(),
                problem: format!("is {}, not an array", json_kind(&batch)),
            });
        };
        if items.is_empty() {
            return Err(BodyError::EmptyBatch);
        }
        if items.len() > MAX_BATCH {
            return Err(BodyError::TooMany {
                items: items.len(),
                max: MAX_BATCH,
            });
        }
        let parsed = items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Object(o) => parse_item(Some(i), o),
                other => Err(BodyError::Field {
                    item: Some(i),
                    field: "prediction_id".to_string(),
                    problem: format!("the item is {}, not an object", json_kind(&other)),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(FeedbackRequest::Batch(parsed));
    }
    parse_item(None, obj).map(FeedbackRequest::One)
}

fn parse_item(item: Option<usize>, mut obj: Map<String, Value>) -> Result<FeedbackItem, BodyError> {
    let bad = |field: &str, problem: String| BodyError::Field {
        item,
        field: field.to_string(),
        problem,
    };
    let id = match obj.remove("prediction_id") {
        Some(Value::String(s)) if s.is_empty() => {
            return Err(bad("prediction_id", "is empty".into()))
        }
        Some(Value::String(s)) if s.len() > MAX_ID_BYTES => {
            return Err(bad(
                "prediction_id",
                format!("is {} bytes; at most {MAX_ID_BYTES}", s.len()),
            ))
        }
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(bad(
                "prediction_id",
                format!("is {}, not a string", json_kind(&other)),
            ))
        }
        None => return Err(bad("prediction_id", "missing".into())),
    };
    let label = obj.remove("label");
    let value = obj.remove("value");
    if let Some(other) = obj.keys().next() {
        return Err(bad(
            other,
            "unknown field: an item has \"prediction_id\" and \"label\" or \"value\"".into(),
        ));
    }
    let truth = match (label, value) {
        (Some(_), Some(_)) => {
            return Err(bad("value", "give \"label\" or \"value\", not both".into()))
        }
        (None, None) => {
            return Err(bad(
                "label",
                "missing: give \"label\" (classifiers) or \"value\" (regressors)".into(),
            ))
        }
        (Some(Value::String(s)), None) if s.len() > MAX_ID_BYTES => {
            return Err(bad(
                "label",
                format!("is {} bytes; at most {MAX_ID_BYTES}", s.len()),
            ))
        }
        (Some(Value::String(s)), None) => Truth::Label(Label::Text(s)),
        (Some(Value::Number(n)), None) => match n.as_i64() {
            Some(i) => Truth::Label(Label::Int(i)),
            None => {
                return Err(bad(
                    "label",
                    format!("{n} is not an integer; a label is a string or an integer"),
                ))
            }
        },
        (Some(other), None) => {
            return Err(bad(
                "label",
                format!(
                    "is {}; a label is a string or an integer",
                    json_kind(&other)
                ),
            ))
        }
        (None, Some(Value::Number(n))) => match n.as_f64() {
            Some(x) if x.is_finite() => Truth::Value(x),
            _ => return Err(bad("value", format!("{n} is not a finite number"))),
        },
        (None, Some(other)) => {
            return Err(bad(
                "value",
                format!("is {}, not a number", json_kind(&other)),
            ))
        }
    };
    Ok(FeedbackItem {
        prediction_id: id,
        truth,
    })
}

/// The result of [`Feedback::apply_batch`]; `items` is the response body's `results`.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutcome {
    pub applied: u64,
    pub duplicates: u64,
    pub refused: u64,
    pub items: Vec<ItemOutcome>,
    /// Drift flags that changed (raise one event each).
    pub drift_changes: Vec<(ModelKey, DriftChange)>,
}

/// One item of the `POST /v1/feedback` response (wire format v1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemOutcome {
    pub prediction_id: String,
    /// `applied`, `duplicate` or `refused`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// [`FeedbackError::kind`] when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Ids for `n` predictions: `<device>-<release>-<process start, ms, hex>-<counter, hex>`,
/// unique on this device across restarts (the start time changes).
pub fn prediction_ids(device: &str, release: u64, n: usize) -> Vec<String> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    });
    let first = NEXT.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    (0..n as u64)
        .map(|k| format!("{device}-{release}-{start:x}-{:x}", first + k))
        .collect()
}

/// Gives the predictions `outputs` of version `l` for `rows` their ids and logs them, so that
/// feedback can find them by id (HTTP `:predict` and MQTT inference); returns the ids.
pub fn log_predictions(
    feedback: &Feedback,
    l: &crate::runtime::Loaded,
    device: &str,
    rows: &[Map<String, Value>],
    outputs: &[Map<String, Value>],
) -> Vec<String> {
    let ids = prediction_ids(device, l.release, outputs.len());
    let spec = &l.feedback_spec;
    let preds = predictions_from_outputs(&spec.task, outputs);
    let groups = spec.group_feature.as_deref().map(|g| {
        let pos = l.manifest.schema.features.iter().position(|f| f.name == g);
        group_values(rows, g, pos)
    });
    feedback.record(&ids, &l.feedback_key, &preds, groups.as_deref());
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn feedback(capacity: usize, window: usize) -> Feedback {
        Feedback::new(FeedbackConfig {
            capacity,
            window,
            min_labels: window.min(100),
            ..FeedbackConfig::default()
        })
        .unwrap()
    }

    fn classifier(classes: &[&str], positive: Option<usize>) -> ModelSpec {
        ModelSpec {
            task: Task::Classifier {
                classes: classes.iter().map(|c| c.to_string()).collect(),
                positive,
            },
            group_feature: None,
            reference_group: None,
            baseline: None,
        }
    }

    fn regressor() -> ModelSpec {
        ModelSpec {
            task: Task::Regressor,
            group_feature: None,
            reference_group: None,
            baseline: None,
        }
    }

    fn ids(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}-{i:x}")).collect()
    }

    fn class(i: u32) -> Option<Predicted> {
        Some(Predicted::Class {
            index: i,
            positive_proba: None,
        })
    }

    fn value(v: f64) -> Option<Predicted> {
        Some(Predicted::Value(v))
    }

    /// A log of `capacity` predictions with the binary classifier `pdm` 1 (release 1; classes
    /// `ok`, `failure`, positive `failure`) registered.
    fn pdm_log(capacity: usize, window: usize) -> (Feedback, ModelKey) {
        let f = feedback(capacity, window);
        let key = ModelKey::new("pdm", "1", 1);
        f.register(&key, classifier(&["ok", "failure"], Some(1)));
        (f, key)
    }

    fn text(s: &str) -> Truth {
        Truth::Label(Label::Text(s.to_string()))
    }

    fn close(a: Option<f64>, b: f64) {
        let a = a.expect("metric present");
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    /// Records `predicted` and applies `truth` (class indexes) for one classifier version:
    /// the version's summary.
    fn run_classifier(
        f: &Feedback,
        key: &ModelKey,
        classes: &[&str],
        predicted: &[u32],
        truth: &[usize],
        groups: Option<&[String]>,
    ) -> FeedbackSummary {
        let ids = ids(&key.version, predicted.len());
        let preds: Vec<_> = predicted.iter().map(|&p| class(p)).collect();
        assert_eq!(f.record(&ids, key, &preds, groups), predicted.len());
        for (id, &t) in ids.iter().zip(truth) {
            f.apply(id, text(classes[t])).unwrap();
        }
        f.summary(key).unwrap()
    }

    /// `shared::metrics::classification` of the same rows (positive class 1).
    fn shared_metrics(
        classes: &[&str],
        predicted: &[u32],
        truth: &[usize],
        groups: Option<&[String]>,
        privileged: Option<&str>,
    ) -> metrics::Metrics {
        let cls: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
        let p: Vec<usize> = predicted.iter().map(|&x| x as usize).collect();
        metrics::classification(&Classification {
            classes: &cls,
            truth,
            predicted: &p,
            proba: None,
            groups,
            privileged,
            positive: 1,
        })
        .unwrap()
        .metrics
    }

    /// Applies the label `truth(i)` to `ids[i]`, in order: the drift changes, each with the
    /// index of the feedback that caused it.
    fn drift_changes(
        f: &Feedback,
        ids: &[String],
        truth: impl Fn(usize) -> &'static str,
    ) -> Vec<(usize, DriftChange)> {
        let mut changes = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            if let Some(c) = f.apply(id, text(truth(i))).unwrap().drift {
                changes.push((i, c));
            }
        }
        changes
    }

    /// [`drift_changes`] where exactly one change is expected: its index and the change.
    fn only_drift_change(
        f: &Feedback,
        ids: &[String],
        truth: impl Fn(usize) -> &'static str,
    ) -> (usize, DriftChange) {
        let changes = drift_changes(f, ids, truth);
        assert_eq!(changes.len(), 1, "{changes:?}");
        changes.into_iter().next().unwrap()
    }

    #[test]
    fn binary_accuracy_and_f1_match_hand_computation_and_shared_metrics() {
        let f = feedback(1000, 1000);
        let key = ModelKey::new("pdm", "1.0", 1);
        let classes = ["ok", "failure"];
        f.register(&key, classifier(&classes, Some(1)));
        let predicted = [1, 1, 0, 0, 1, 0, 0, 0];
        let truth = [1, 0, 0, 1, 1, 0, 0, 0];
        let s = run_classifier(&f, &key, &classes, &predicted, &truth, None);
        // 6 of 8 right; positive class: tp 2, predicted 3, true 3 -> F1 = 4 / 6
        close(s.window.accuracy, 0.75);
        close(s.window.f1, 2.0 / 3.0);
        close(s.since_activation.accuracy, 0.75);
        close(s.since_activation.f1, 2.0 / 3.0);
        assert_eq!(
            (s.window.labelled, s.labelled_total, s.recorded_total),
            (8, 8, 8)
        );
        assert_eq!(s.task, "classification");
        let m = shared_metrics(&classes, &predicted, &truth, None, None);
        close(s.window.f1, m["f1"]);
        close(s.window.accuracy, m["accuracy"]);
    }

    #[test]
    fn multiclass_macro_f1_from_counts_equals_shared_metrics() {
        let f = feedback(1000, 1000);
        let key = ModelKey::new("kind", "2", 2);
        let classes = ["a", "b", "c", "d"];
        f.register(&key, classifier(&classes, None));
        // class d never occurs: macro over a, b, c
        let predicted = [0, 2, 2, 0, 0, 1];
        let truth = [0, 1, 2, 0, 1, 2];
        let s = run_classifier(&f, &key, &classes, &predicted, &truth, None);
        // F1: a = 4/5, b = 0/3, c = 2/4 -> (0.8 + 0 + 0.5) / 3
        close(s.window.accuracy, 0.5);
        close(s.window.f1, 1.3 / 3.0);
        close(s.since_activation.f1, 1.3 / 3.0);
        close(s.since_activation.accuracy, 0.5);
    }

    #[test]
    fn regression_mae_and_rmse_by_hand() {
        let f = feedback(100, 1000);
        let key = ModelKey::new("load", "r1", 7);
        f.register(&key, regressor());
        let ids = ids("r", 4);
        let preds: Vec<_> = [1.5, 2.0, 2.0, 6.0].map(value).to_vec();
        f.record(&ids, &key, &preds, None);
        for (id, t) in ids.iter().zip([1.0, 2.0, 3.0, 4.0]) {
            let a = f.apply(id, Truth::Value(t)).unwrap();
            assert!(!a.duplicate);
            assert!(a.residual.is_some() && a.correct.is_none());
        }
        let s = f.summary(&key).unwrap();
        // |r| = 0.5, 0, 1, 2; r^2 = 0.25, 0, 1, 4
        close(s.window.mae, 3.5 / 4.0);
        close(s.window.rmse, (5.25f64 / 4.0).sqrt());
        close(s.since_activation.mae, 3.5 / 4.0);
        close(s.since_activation.rmse, (5.25f64 / 4.0).sqrt());
        assert_eq!(s.window.accuracy, None);
        assert_eq!(s.task, "regression");
    }

    #[test]
    fn window_keeps_the_last_n_labels_and_since_activation_keeps_all() {
        let (f, key) = pdm_log(100, 4);
        // 4 wrong, then 4 right: the window sees only the right ones
        let predicted = [0, 0, 0, 0, 1, 1, 1, 1];
        let truth = [1, 1, 1, 1, 1, 1, 1, 1];
        let s = run_classifier(&f, &key, &["ok", "failure"], &predicted, &truth, None);
        close(s.window.accuracy, 1.0);
        assert_eq!(s.window.labelled, 4);
        close(s.since_activation.accuracy, 0.5);
        assert_eq!(s.since_activation.labelled, 8);
    }

    #[test]
    fn fairness_gaps_match_shared_metrics() {
        let f = feedback(100, 1000);
        let key = ModelKey::new("credit", "1", 1);
        let classes = ["deny", "grant"];
        let mut spec = classifier(&classes, Some(1));
        spec.group_feature = Some("site".into());
        spec.reference_group = Some("a".into());
        f.register(&key, spec);
        let groups: Vec<String> = ["a", "a", "a", "a", "b", "b", "b", "b"]
            .iter()
            .map(|g| g.to_string())
            .collect();
        let truth = [1, 1, 0, 0, 1, 1, 0, 0];
        let predicted = [1, 0, 1, 0, 1, 1, 1, 0];
        let s = run_classifier(&f, &key, &classes, &predicted, &truth, Some(&groups));
        let fair = s.fairness.expect("fairness with groups");
        // a: selection 2/4, TPR 1/2; b: selection 3/4, TPR 2/2
        close(fair.statistical_parity_difference, 0.25);
        close(fair.equal_opportunity_difference, 0.5);
        assert_eq!(fair.reference_group.as_deref(), Some("a"));
        assert_eq!(fair.positive_class, "grant");
        assert_eq!(fair.groups.len(), 2);
        assert_eq!(fair.groups[1].group, "b");
        assert_eq!(fair.groups[1].true_positive_rate, Some(1.0));
        let m = shared_metrics(&classes, &predicted, &truth, Some(&groups), Some("a"));
        close(
            fair.statistical_parity_difference,
            m["statistical_parity_difference"],
        );
        close(
            fair.equal_opportunity_difference,
            m["equal_opportunity_difference"],
        );
    }

    #[test]
    fn regressor_groups_report_error_per_group() {
        let f = feedback(100, 100);
        let key = ModelKey::new("load", "1", 1);
        let mut spec = regressor();
        spec.group_feature = Some("line".into());
        f.register(&key, spec);
        let ids = ids("g", 4);
        let groups: Vec<String> = ["x", "x", "y", "y"].iter().map(|g| g.to_string()).collect();
        let preds = vec![value(0.0); 4];
        f.record(&ids, &key, &preds, Some(&groups));
        for (id, t) in ids.iter().zip([1.0, 3.0, 0.5, -0.5]) {
            f.apply(id, Truth::Value(t)).unwrap();
        }
        let g = f.summary(&key).unwrap().group_errors;
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].group.as_str(), g[0].rows, g[0].mae), ("x", 2, 2.0));
        assert_eq!((g[1].group.as_str(), g[1].mae), ("y", 0.5));
    }

    #[test]
    fn full_log_evicts_the_oldest_and_counts() {
        let (f, key) = pdm_log(3, 10);
        let ids = ids("e", 5);
        f.record(
            &ids,
            &key,
            &[class(0), class(0), class(0), class(0), class(1)],
            None,
        );
        let st = f.stats();
        assert_eq!((st.entries, st.evicted_total, st.recorded_total), (3, 2, 5));
        for id in &ids[..2] {
            let e = f.apply(id, text("ok")).unwrap_err();
            assert!(matches!(&e, FeedbackError::UnknownId { id: x, capacity: 3 } if x == id));
            assert!(e.to_string().contains("unknown or expired"), "{e}");
            assert_eq!(e.http_status(), 404);
        }
        for id in &ids[2..] {
            f.apply(id, text("ok")).unwrap();
        }
        assert_eq!(f.stats().refused_total.get("unknown_id"), Some(&2));
        // the ring keeps turning: 3 more push out e-2..e-4
        let more = super::tests::ids("m", 3);
        f.record(&more, &key, &[class(0), class(0), class(0)], None);
        assert!(f.apply(&ids[4], text("failure")).is_err());
        assert_eq!(f.stats().evicted_total, 5);
        assert!(f.apply(&more[2], text("ok")).is_ok());
    }

    #[test]
    fn same_truth_is_a_duplicate_and_a_different_one_is_refused() {
        let (f, key) = pdm_log(10, 10);
        let ids = ids("d", 1);
        f.record(&ids, &key, &[class(1)], None);
        let first = f.apply(&ids[0], text("failure")).unwrap();
        assert_eq!((first.duplicate, first.correct), (false, Some(true)));
        let again = f.apply(&ids[0], text("failure")).unwrap();
        assert!(again.duplicate);
        let e = f.apply(&ids[0], text("ok")).unwrap_err();
        assert_eq!(e.kind(), "already_labelled");
        assert_eq!(e.http_status(), 409);
        assert!(
            e.to_string().contains("already labelled label \"failure\"")
                && e.to_string().contains("label \"ok\""),
            "{e}"
        );
        let s = f.summary(&key).unwrap();
        assert_eq!(
            (s.labelled_total, s.duplicate_total, s.refused_total),
            (1, 1, 1)
        );
        assert_eq!(s.window.labelled, 1);
    }

    #[test]
    fn wrong_kinds_unknown_classes_and_non_finite_values_are_refused() {
        let f = feedback(10, 10);
        let cls = ModelKey::new("pdm", "1", 1);
        let reg = ModelKey::new("load", "1", 1);
        f.register(&cls, classifier(&["0", "1"], Some(1)));
        f.register(&reg, regressor());
        f.record(&["c".to_string()], &cls, &[class(1)], None);
        f.record(&["r".to_string()], &reg, &[value(2.0)], None);

        let e = f.apply("c", Truth::Value(1.0)).unwrap_err();
        assert!(
            matches!(
                e,
                FeedbackError::WrongKind {
                    task: "classification",
                    ..
                }
            ),
            "{e}"
        );
        let e = f.apply("r", text("1")).unwrap_err();
        assert!(
            matches!(
                e,
                FeedbackError::WrongKind {
                    task: "regression",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("numeric \"value\""), "{e}");
        let e = f.apply("c", Truth::Label(Label::Int(7))).unwrap_err();
        assert_eq!(e.kind(), "unknown_class");
        assert!(
            e.to_string().contains("label 7 is not a class")
                && e.to_string().contains("\"0\", \"1\""),
            "{e}"
        );
        let e = f.apply("r", Truth::Value(f64::NAN)).unwrap_err();
        assert_eq!(e.kind(), "non_finite");
        // integer labels match integer classes' text
        let ok = f.apply("c", Truth::Label(Label::Int(1))).unwrap();
        assert_eq!(ok.correct, Some(true));
        let ok = f.apply("r", Truth::Value(3.5)).unwrap();
        assert_eq!(ok.residual, Some(1.5));
        let refused = f.stats().refused_total;
        assert_eq!(refused.get("wrong_kind"), Some(&2));
        assert_eq!(refused.get("unknown_class"), Some(&1));
        assert_eq!(refused.get("non_finite"), Some(&1));
    }

    #[test]
    fn unregistered_versions_and_unreadable_rows_are_counted_not_logged() {
        let f = feedback(10, 10);
        let key = ModelKey::new("pdm", "1", 1);
        assert_eq!(f.record(&ids("u", 2), &key, &[class(0), class(0)], None), 0);
        f.register(&key, classifier(&["ok", "failure"], Some(1)));
        assert!(f.is_registered(&key));
        assert_eq!(f.record(&ids("v", 2), &key, &[class(0), None], None), 1);
        let st = f.stats();
        assert_eq!(
            (st.unregistered_total, st.unreadable_total, st.entries),
            (2, 1, 1)
        );
        assert!(f.apply("v-1", text("ok")).is_err());
    }

    #[test]
    fn dropping_a_version_expires_its_predictions() {
        let f = feedback(100, 10);
        let first = ModelKey::new("m", "v0", 0);
        f.register(&first, regressor());
        f.record(&["old".to_string()], &first, &[value(1.0)], None);
        for r in 1..=MAX_VERSIONS as u64 {
            f.register(&ModelKey::new("m", &format!("v{r}"), r), regressor());
        }
        assert!(!f.is_registered(&first));
        assert_eq!(f.stats().versions, MAX_VERSIONS as u64);
        let e = f.apply("old", Truth::Value(1.0)).unwrap_err();
        assert_eq!(e.kind(), "expired");
        assert_eq!(f.summaries().len(), MAX_VERSIONS);
    }

    #[test]
    fn classifier_drift_against_signoff_baseline_raises_once_and_clears() {
        let f = Feedback::new(FeedbackConfig {
            capacity: 1000,
            window: 100,
            min_labels: 50,
            z_raise: 3.1,
            z_clear: 2.0,
        })
        .unwrap();
        let key = ModelKey::new("pdm", "1", 1);
        let mut spec = classifier(&["ok", "failure"], Some(1));
        // rows 0: the baseline error 0.1 is taken as exact (one-sample test)
        spec.baseline = Some(Baseline::Accuracy {
            accuracy: 0.9,
            rows: 0,
        });
        f.register(&key, spec);
        let ids = ids("z", 400);
        f.record(&ids, &key, &vec![class(0); 400], None);
        // 100 labels, every 10th wrong: error 0.1 = baseline
        let every_10th_wrong = |i: usize| if i % 10 == 9 { "failure" } else { "ok" };
        let changes = drift_changes(&f, &ids[..100], every_10th_wrong);
        assert!(changes.is_empty(), "{changes:?}");
        let s = f.summary(&key).unwrap();
        assert_eq!(s.drift.baseline_source, "signoff");
        assert!(s.drift.z.unwrap().abs() < 1e-9, "{:?}", s.drift.z);
        // then all wrong: after the 11th, the window has 20 errors in 100:
        // z = (0.2 - 0.1) / sqrt(0.1 * 0.9 / 100) = 3.33
        let (j, change) = only_drift_change(&f, &ids[100..200], |_| "failure");
        let DriftChange::Started { z } = change else {
            panic!("{change:?}")
        };
        assert_eq!(j, 10);
        assert!((z - 0.1 / 0.03).abs() < 1e-9, "{z}");
        let s = f.summary(&key).unwrap();
        assert!(s.drift.drifting);
        // all 100 wrong now: z = 0.9 / 0.03 = 30
        assert!((s.drift.z.unwrap() - 30.0).abs() < 1e-9);
        close(s.drift.recent_error, 1.0);
        // right again: cleared once, when the error share falls below 0.16
        let (j, change) = only_drift_change(&f, &ids[200..400], |_| "ok");
        let DriftChange::Cleared { z } = change else {
            panic!("{change:?}")
        };
        // cleared at 15 errors in 100: z = 0.05 / 0.03 = 1.67 (16 gives exactly 2.0)
        assert_eq!(j, 84);
        assert!((z - 0.05 / 0.03).abs() < 1e-9, "{z}");
    }

    #[test]
    fn regressor_drift_uses_the_first_window_as_baseline() {
        let f = Feedback::new(FeedbackConfig {
            capacity: 100,
            window: 4,
            min_labels: 4,
            ..FeedbackConfig::default()
        })
        .unwrap();
        let key = ModelKey::new("load", "1", 1);
        f.register(&key, regressor());
        let ids = ids("w", 5);
        f.record(&ids, &key, &[value(0.0); 5], None);
        for (id, t) in ids.iter().zip([1.0, -2.0, 1.0, 2.0, 5.0]) {
            f.apply(id, Truth::Value(t)).unwrap();
        }
        let d = f.summary(&key).unwrap().drift;
        assert_eq!(d.baseline_source, "first_window");
        assert_eq!(d.test, "welch_z_abs_residual");
        // baseline |r| = 1, 2, 1, 2: mean 1.5, variance 1/3; now 2, 1, 2, 5: mean 2.5, var 3
        close(d.baseline_error, 1.5);
        close(d.recent_error, 2.5);
        let z = 1.0 / (3.0 / 4.0 + (1.0 / 3.0) / 4.0f64).sqrt();
        assert!((d.z.unwrap() - z).abs() < 1e-12, "{:?} vs {z}", d.z);
        assert!(!d.drifting);
    }

    #[test]
    fn z_statistic_two_proportion_and_zero_variance() {
        // pooled: p1 = 0.3 (n 100), p0 = 0.1 (n 100): p = 0.2, se = sqrt(0.16 * 0.02)
        let z = z_statistic(true, (0.3, 0.0, 100), (0.1, 0.0, 100));
        assert!((z - 0.2 / (0.16f64 * 0.02).sqrt()).abs() < 1e-12, "{z}");
        assert_eq!(z_statistic(false, (1.0, 0.0, 10), (0.0, 0.0, 10)), Z_CAP);
        assert_eq!(z_statistic(false, (0.0, 0.0, 10), (0.0, 0.0, 10)), 0.0);
        assert_eq!(z_statistic(true, (0.0, 0.0, 10), (0.0, 0.0, 0)), 0.0);
    }

    #[test]
    fn spec_from_manifest_reads_labels_groups_and_baseline() {
        let mut m = shared::bundle::testing::manifest("credit", &[]);
        let labels = Labels::Int(vec![0, 1]);
        let spec = ModelSpec::from_manifest(&m, Some(&labels));
        assert_eq!(
            spec.task,
            Task::Classifier {
                classes: vec!["0".to_string(), "1".to_string()].into(),
                positive: Some(1)
            }
        );
        assert_eq!((spec.group_feature, spec.baseline), (None, None));
        m.signoff = Some(Signoff {
            task: "classification".into(),
            rows: 200,
            label_column: "y".into(),
            group_column: Some("site".into()),
            positive_label: Some("deny".into()),
            reference_group: Some("north".into()),
            metrics: BTreeMap::from([("accuracy".to_string(), 0.8)]),
            groups: Vec::new(),
            requirements: Vec::new(),
            notes: Vec::new(),
        });
        let labels = Labels::Str(vec!["deny".into(), "grant".into(), "review".into()]);
        let spec = ModelSpec::from_manifest(&m, Some(&labels));
        assert!(matches!(
            spec.task,
            Task::Classifier {
                positive: Some(0),
                ..
            }
        ));
        assert_eq!(spec.group_feature.as_deref(), Some("site"));
        assert_eq!(spec.reference_group.as_deref(), Some("north"));
        assert_eq!(
            spec.baseline,
            Some(Baseline::Accuracy {
                accuracy: 0.8,
                rows: 200
            })
        );
        // a classification signoff does not give a regressor a baseline
        let spec = ModelSpec::from_manifest(&m, None);
        assert_eq!((spec.task, spec.baseline), (Task::Regressor, None));
    }

    #[test]
    fn baseline_from_signoff() {
        let mut s = Signoff {
            task: "classification".into(),
            rows: 500,
            label_column: "y".into(),
            group_column: None,
            positive_label: None,
            reference_group: None,
            metrics: BTreeMap::from([("accuracy".to_string(), 0.92)]),
            groups: Vec::new(),
            requirements: Vec::new(),
            notes: Vec::new(),
        };
        assert_eq!(
            Baseline::from_signoff(&s),
            Some(Baseline::Accuracy {
                accuracy: 0.92,
                rows: 500
            })
        );
        s.task = "regression".into();
        assert_eq!(Baseline::from_signoff(&s), None);
        s.metrics = BTreeMap::from([("mae".to_string(), 0.5), ("rmse".to_string(), 0.75)]);
        let b = Baseline::from_signoff(&s).unwrap();
        let (m, v, n) = b.stats();
        assert_eq!((m, n), (0.5, 500));
        assert!((v - (0.5625 - 0.25)).abs() < 1e-12);
    }

    #[test]
    fn outputs_and_groups_are_read_from_rendered_rows() {
        let task = Task::Classifier {
            classes: vec!["ok".to_string(), "failure".to_string()].into(),
            positive: Some(1),
        };
        let rows: Vec<Map<String, Value>> = [
            json!({"label": "failure", "probabilities": {"failure": 0.75, "ok": 0.25}}),
            json!({"label": ["ok"], "probabilities": [0.875, 0.125]}),
            json!({"label": "scrap", "probabilities": [0.5, 0.5]}),
        ]
        .into_iter()
        .map(|v| v.as_object().cloned().unwrap())
        .collect();
        let p = predictions_from_outputs(&task, &rows);
        assert_eq!(
            p,
            vec![
                Some(Predicted::Class {
                    index: 1,
                    positive_proba: Some(0.75)
                }),
                Some(Predicted::Class {
                    index: 0,
                    positive_proba: Some(0.125)
                }),
                None
            ]
        );
        let ints = Task::Classifier {
            classes: vec!["0".to_string(), "1".to_string()].into(),
            positive: None,
        };
        let row = json!({"output_label": 1}).as_object().cloned().unwrap();
        assert_eq!(predictions_from_outputs(&ints, &[row]), vec![class(1)]);
        let reg = json!({"variable": [[2.5]]}).as_object().cloned().unwrap();
        assert_eq!(
            predictions_from_outputs(&Task::Regressor, &[reg]),
            vec![Some(Predicted::Value(2.5))]
        );
        let input: Vec<Map<String, Value>> = [
            json!({"site": "north", "x": 1.0}),
            json!({"site": 3, "x": 1.0}),
            json!({"x": 1.0}),
            json!({"X": [1.0, "east", 2.0]}),
        ]
        .into_iter()
        .map(|v| v.as_object().cloned().unwrap())
        .collect();
        assert_eq!(
            group_values(&input, "site", Some(1)),
            vec!["north", "3", "", "east"]
        );
    }

    #[test]
    fn groups_beyond_the_cap_fall_into_other() {
        let mut groups = Vec::new();
        for i in 0..MAX_GROUPS {
            assert_eq!(intern(&mut groups, &format!("g{i}")) as usize, i);
        }
        let other = intern(&mut groups, "late");
        assert_eq!(&*groups[other as usize], OTHER_GROUP);
        assert_eq!(intern(&mut groups, "later"), other);
        assert_eq!(intern(&mut groups, "g3"), 3);
        let long = "é".repeat(100);
        let mut g2 = Vec::new();
        intern(&mut g2, &long);
        assert_eq!(g2[0].len(), MAX_GROUP_BYTES);
    }

    #[test]
    fn parses_single_and_batch_bodies() {
        let one = parse_request(br#"{"prediction_id": "box-1-a-0", "label": "failure"}"#).unwrap();
        assert_eq!(
            one,
            FeedbackRequest::One(FeedbackItem {
                prediction_id: "box-1-a-0".into(),
                truth: text("failure")
            })
        );
        let batch = parse_request(
            br#"{"feedback": [{"prediction_id": "a", "label": 1}, {"prediction_id": "b", "value": 3.2}]}"#,
        )
        .unwrap()
        .into_items();
        assert_eq!(batch[0].truth, Truth::Label(Label::Int(1)));
        assert_eq!(batch[1].truth, Truth::Value(3.2));
    }

    #[test]
    fn body_errors_name_the_item_and_field() {
        let err = |body: &str| parse_request(body.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            err(
                r#"{"feedback": [{"prediction_id": "a", "label": 1}, {"prediction_id": "b", "label": 1.5}]}"#
            ),
            "feedback[1].label: 1.5 is not an integer; a label is a string or an integer"
        );
        assert_eq!(
            err(r#"{"feedback": [{"prediction_id": 3, "value": 1}]}"#),
            "feedback[0].prediction_id: is a number, not a string"
        );
        assert_eq!(
            err(r#"{"prediction_id": "a", "label": "x", "value": 1}"#),
            "value: give \"label\" or \"value\", not both"
        );
        assert_eq!(
            err(r#"{"prediction_id": "a"}"#),
            "label: missing: give \"label\" (classifiers) or \"value\" (regressors)"
        );
        assert_eq!(
            err(r#"{"prediction_id": "a", "value": "3"}"#),
            "value: is a string, not a number"
        );
        assert!(err(r#"{"prediction_id": "a", "value": 1, "extra": 2}"#)
            .starts_with("extra: unknown field"));
        assert!(err(r#"{"feedback": [], "x": 1}"#).starts_with("x: unknown field"));
        assert_eq!(err(r#"{"feedback": []}"#), "\"feedback\" is empty");
        assert_eq!(
            err(r#"{"feedback": {}}"#),
            "feedback: is an object, not an array"
        );
        assert!(err("[1]").contains("must be an object"));
        assert!(err("{").starts_with("feedback body is not valid JSON"));
        assert!(err(r#"{"prediction_id": "", "value": 1}"#).starts_with("prediction_id: is empty"));
        let items: Vec<String> = (0..=MAX_BATCH)
            .map(|i| format!(r#"{{"prediction_id": "p{i}", "value": 1}}"#))
            .collect();
        let body = format!(r#"{{"feedback": [{}]}}"#, items.join(","));
        assert_eq!(
            parse_request(body.as_bytes()).unwrap_err(),
            BodyError::TooMany {
                items: MAX_BATCH + 1,
                max: MAX_BATCH
            }
        );
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert!(matches!(
            parse_request(&big),
            Err(BodyError::TooLarge { .. })
        ));
    }

    #[test]
    fn batch_apply_reports_each_item() {
        let (f, key) = pdm_log(10, 10);
        f.record(&ids("b", 2), &key, &[class(0), class(1)], None);
        let body = br#"{"feedback": [{"prediction_id": "b-0", "label": "ok"},
            {"prediction_id": "b-0", "label": "ok"}, {"prediction_id": "nope", "label": "ok"}]}"#;
        let out = f.apply_batch(parse_request(body).unwrap().into_items());
        assert_eq!((out.applied, out.duplicates, out.refused), (1, 1, 1));
        let statuses: Vec<&str> = out.items.iter().map(|i| i.status.as_str()).collect();
        assert_eq!(statuses, ["applied", "duplicate", "refused"]);
        assert_eq!(out.items[2].reason.as_deref(), Some("unknown_id"));
        let wire = serde_json::to_value(&out.items[0]).unwrap();
        assert_eq!(
            wire,
            json!({"prediction_id": "b-0", "status": "applied", "model": "pdm", "version": "1"})
        );
    }

    #[test]
    fn summary_serializes_with_explicit_fields() {
        let (f, key) = pdm_log(10, 10);
        let s = f.summary(&key).unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["window"]["accuracy"], Value::Null);
        assert_eq!(v["drift"]["baseline_source"], "none");
        let back: FeedbackSummary = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn config_is_validated_and_memory_is_bounded() {
        let bad = Feedback::new(FeedbackConfig {
            capacity: 0,
            ..FeedbackConfig::default()
        })
        .unwrap_err();
        assert_eq!(
            bad.to_string(),
            "feedback.capacity = 0 is out of range 1..=16777216"
        );
        assert!(Feedback::new(FeedbackConfig {
            z_clear: 4.0,
            ..FeedbackConfig::default()
        })
        .is_err());
        // slot 64 bytes + 2 x (16 + 1) index bytes
        assert_eq!(std::mem::size_of::<Slot>(), 64);
        assert_eq!(std::mem::size_of::<WindowItem>(), 32);
        assert_eq!(Feedback::bytes_per_entry(), 98);
        let f = Feedback::new(FeedbackConfig::default()).unwrap();
        assert_eq!(f.approx_memory_bytes(30), 100_000 * (98 + 48));
        assert_eq!(f.approx_memory_bytes(20), 100_000 * (98 + 32));
    }
}
