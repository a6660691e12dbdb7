//! The running models: a registry of active versions swapped atomically (in-flight requests
//! keep the `Arc` of the version they started with), the one prediction path every API uses,
//! and per-version counters for health windows and metrics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use shared::bundle::manifest::{PredictionProfile, PredictionScore};
use shared::bundle::Manifest;
use shared::drift::DriftState;

use crate::feedback::{ModelKey, ModelSpec};
use shared::engine::{InputError, Model};

/// Upper bounds (microseconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
];

/// Counters of one loaded version (lock-free; read by health checks and `/metrics`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests that returned predictions.
    pub ok: AtomicU64,
    /// Requests refused for bad input (client errors, not counted against health).
    pub invalid: AtomicU64,
    /// Requests that failed inside the engine.
    pub failed: AtomicU64,
    /// Rows predicted.
    pub rows: AtomicU64,
    /// Rows with a NaN or infinite output value.
    pub nan_rows: AtomicU64,
    /// Latency histogram (per request, wall clock per row), one counter per bucket plus +Inf.
    pub latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    pub latency_sum_us: AtomicU64,
    /// The scoring thread's CPU time per row (per request), same buckets: what the health
    /// window judges, since other load on the device stretches wall-clock latency but not
    /// the CPU a model needs.
    pub cpu: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
}

/// Index of the latency bucket holding `us`.
fn bucket_of(us: u64) -> usize {
    LATENCY_BUCKETS_US
        .iter()
        .position(|&b| us <= b)
        .unwrap_or(LATENCY_BUCKETS_US.len())
}

/// Approximate quantile of a bucketed histogram (the upper bound of the bucket holding it).
fn histogram_quantile(buckets: &[AtomicU64], q: f64) -> Option<u64> {
    let counts: Vec<u64> = buckets.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    bucket_quantile(&LATENCY_BUCKETS_US, &counts, q)
}

/// Quantile of a bucket histogram: `counts[i]` values fell at or under `bounds[i]` (and above
/// the previous bound; a count past the last bound is +Inf). Returns the upper bound of the
/// bucket holding it (`u64::MAX` for +Inf); `None` when empty.
pub fn bucket_quantile(bounds: &[u64], counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let want = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= want {
            return Some(bounds.get(i).copied().unwrap_or(u64::MAX));
        }
    }
    None
}

/// CPU time this thread has used, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    (t.tv_sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec.max(0) as u64)
}

impl Counters {
    fn observe_latency(&self, us: u64) {
        self.latency[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn observe_cpu(&self, us: u64) {
        self.cpu[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// Approximate wall-clock latency quantile (the upper bound of the bucket holding it),
    /// microseconds.
    pub fn latency_quantile_us(&self, q: f64) -> Option<u64> {
        histogram_quantile(&self.latency, q)
    }

    /// Approximate quantile of the CPU time per row, microseconds.
    pub fn cpu_quantile_us(&self, q: f64) -> Option<u64> {
        histogram_quantile(&self.cpu, q)
    }
}

/// A Prometheus-style histogram with fixed upper bounds (plus +Inf), lock-free.
#[derive(Debug)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    /// Per bucket (not cumulative), `bounds.len() + 1` entries.
    pub counts: Vec<AtomicU64>,
    /// f64 bits of the sum of observed values.
    pub sum_bits: AtomicU64,
}

impl Histogram {
    pub fn new(mut bounds: Vec<f64>) -> Histogram {
        bounds.retain(|b| b.is_finite());
        bounds.dedup();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram {
            bounds,
            counts,
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let ix = self.bounds.partition_point(|b| *b < v);
        self.counts[ix].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum_bits.load(Ordering::Relaxed))
    }
}

/// Score buckets for classifier confidences.
const SCORE_BOUNDS: [f64; 10] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// Input and prediction distributions of one version (for `/metrics`).
#[derive(Debug)]
pub struct Distributions {
    /// Per numeric feature, buckets at the bundle's reference bin edges.
    pub features: Vec<(String, Histogram)>,
    /// Classifiers: the top score; regressors: the predicted value.
    pub prediction: Histogram,
    /// Classifiers: predicted label -> count.
    pub labels: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Distributions {
    fn new(m: &Manifest) -> Distributions {
        let features = m
            .reference
            .as_ref()
            .map(|r| {
                r.features
                    .iter()
                    .filter(|f| f.bin_edges.len() >= 2)
                    .map(|f| (f.name.clone(), Histogram::new(f.bin_edges[1..].to_vec())))
                    .collect()
            })
            .unwrap_or_default();
        let classifier = m
            .signoff
            .as_ref()
            .is_some_and(|s| s.task == "classification")
            || m.schema
                .outputs
                .iter()
                .any(|o| o.elem_type == "int64" || o.elem_type == "string");
        let prediction = if classifier {
            Histogram::new(SCORE_BOUNDS.to_vec())
        } else {
            // regressors: ten equal buckets over the golden outputs' range
            let vals: Vec<f64> = m
                .golden
                .samples
                .iter()
                .filter_map(|s| s.output.values().next().and_then(first_number))
                .collect();
            let (lo, hi) = vals
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                    (a.min(*v), b.max(*v))
                });
            if lo.is_finite() && hi > lo {
                let w = (hi - lo) / 10.0;
                Histogram::new((1..=10).map(|i| lo + w * i as f64).collect())
            } else {
                Histogram::new(vec![-100.0, -10.0, -1.0, 0.0, 1.0, 10.0, 100.0])
            }
        };
        Distributions {
            features,
            prediction,
            labels: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    fn observe(&self, m: &Manifest, row: &Map<String, Value>, out: &Map<String, Value>) {
        for (i, (name, h)) in self.features.iter().enumerate() {
            let v = match row.get(name) {
                Some(v) => v.as_f64(),
                // a single input holding the feature vector: by position in the schema
                None => row
                    .values()
                    .next()
                    .and_then(|v| v.as_array())
                    .and_then(|a| {
                        let pos = m
                            .schema
                            .features
                            .iter()
                            .position(|f| &f.name == name)
                            .unwrap_or(i);
                        a.get(pos).and_then(Value::as_f64)
                    }),
            };
            if let Some(v) = v {
                h.observe(v);
            }
        }
        let mut outs = out.values();
        match (outs.next(), outs.next()) {
            (Some(label @ (Value::String(_) | Value::Number(_))), Some(scores))
                if label.as_f64().is_none_or(|x| x.fract() == 0.0) =>
            {
                if let Ok(mut l) = self.labels.lock() {
                    // no allocation for a label seen before
                    let num;
                    let key = match label {
                        Value::String(s) => s.as_str(),
                        other => {
                            num = other.to_string();
                            num.as_str()
                        }
                    };
                    if let Some(c) = l.get_mut(key) {
                        *c += 1;
                    } else if l.len() < 1000 {
                        l.insert(key.to_string(), 1);
                    }
                }
                if let Some(top) = max_number(scores) {
                    self.prediction.observe(top);
                }
            }
            (Some(v), _) => {
                if let Some(x) = first_number(v) {
                    self.prediction.observe(x);
                }
            }
            _ => {}
        }
    }
}

fn first_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Array(a) => a.first().and_then(first_number),
        _ => None,
    }
}

fn max_number(v: &Value) -> Option<f64> {
    let it: Box<dyn Iterator<Item = &Value>> = match v {
        Value::Array(a) => Box::new(a.iter()),
        Value::Object(o) => Box::new(o.values()),
        other => Box::new(std::iter::once(other)),
    };
    it.filter_map(Value::as_f64).reduce(f64::max)
}

/// One version of a model, loaded and ready.
#[derive(Debug)]
pub struct Loaded {
    pub name: String,
    pub release: u64,
    pub version: String,
    pub manifest: Arc<Manifest>,
    pub model: Model,
    pub counters: Counters,
    pub distributions: Distributions,
    pub activated: Instant,
    /// Live p99 CPU time per row of the version this one replaced, when that one had
    /// answered at least [`MIN_FOR_P99`] requests: the health window compares live with live.
    pub baseline_p99_us: Option<u64>,
    /// Without a live baseline: the single-row p99 CPU time of (the replaced version, this
    /// one), measured together at activation (`store::paired_p99`).
    pub activation_p99_us: Option<(u64, u64)>,
    /// Range policy: refuse numeric feature values outside the bundle's observed
    /// `[min, max]` widened by this share of the range on each side (`None`: no check).
    pub range_margin: Option<f64>,
    /// The current drift window against the bundle's reference profile (none without one).
    pub drift: Option<Mutex<DriftState>>,
    /// Per reference feature: its name and position in the schema (for rows that send the
    /// whole feature vector as one input), computed once at load.
    drift_features: Vec<(String, usize)>,
    /// Index of the reference's `class_probability` class in the model's class labels (for
    /// probability outputs that are arrays, not ZipMap objects).
    prediction_class: Option<usize>,
    /// This version's key and task for the feedback loop.
    pub feedback_key: ModelKey,
    pub feedback_spec: Arc<ModelSpec>,
}

impl Loaded {
    pub fn new(manifest: Manifest, model: Model) -> Loaded {
        let distributions = Distributions::new(&manifest);
        let drift = manifest
            .reference
            .as_ref()
            .filter(|r| !r.features.is_empty() || r.predictions.is_some())
            .map(|r| Mutex::new(DriftState::new(r)));
        let drift_features = manifest
            .reference
            .as_ref()
            .map(|r| {
                r.features
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let pos = manifest
                            .schema
                            .features
                            .iter()
                            .position(|s| s.name == f.name)
                            .unwrap_or(i);
                        (f.name.clone(), pos)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let prediction_class = manifest
            .reference
            .as_ref()
            .and_then(|r| r.predictions.as_ref())
            .and_then(|p| p.class.as_ref())
            .and_then(|c| {
                let labels = model.class_labels()?;
                (0..labels.len()).position(|i| labels.key(i) == *c)
            });
        let feedback_key = ModelKey::new(&manifest.name, &manifest.version, manifest.release);
        let feedback_spec = Arc::new(ModelSpec::from_manifest(&manifest, model.class_labels()));
        Loaded {
            drift,
            drift_features,
            prediction_class,
            feedback_key,
            feedback_spec,
            distributions,
            name: manifest.name.clone(),
            release: manifest.release,
            version: manifest.version.clone(),
            manifest: Arc::new(manifest),
            model,
            counters: Counters::default(),
            activated: Instant::now(),
            baseline_p99_us: None,
            activation_p99_us: None,
            range_margin: None,
        }
    }
}

/// A request row refused, with where.
#[derive(Debug, Clone, PartialEq)]
pub struct RowError {
    /// 0-based row index in the request.
    pub row: usize,
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "row {}, field {field:?}: {}", self.row, self.message),
            None => write!(f, "row {}: {}", self.row, self.message),
        }
    }
}

/// Why a prediction failed.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("no model named {0:?}")]
    UnknownModel(String),
    #[error("{0}")]
    Invalid(RowError),
    #[error("inference failed: {0}")]
    Engine(String),
}

/// The result of a prediction: one output object per row, and the version that made it.
#[derive(Debug)]
pub struct Prediction {
    pub outputs: Vec<Map<String, Value>>,
    pub loaded: Arc<Loaded>,
}

fn non_finite(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.iter().any(non_finite),
        Value::Object(o) => o.values().any(non_finite),
        _ => false,
    }
}

/// Whether the value under `key` feeds a numeric input of `model`.
fn numeric_key(model: &Model, key: &str) -> bool {
    let inputs = model.inputs();
    match inputs.iter().find(|i| i.name == key) {
        Some(i) => i.map_value.is_none() && i.elem.is_numeric(),
        None => inputs.len() == 1 && inputs[0].elem.is_numeric(),
    }
}

/// Checks rows before the engine sees them: no missing values, and numbers (not strings such
/// as "" or "NaN", which the engine would read as NaN) for numeric inputs.
fn check_finite(model: &Model, row: usize, obj: &Map<String, Value>) -> Result<(), RowError> {
    for (k, v) in obj {
        let numeric = numeric_key(model, k);
        let is_text = |x: &Value| numeric && x.is_string();
        let bad = match v {
            Value::Null => Some("is null (a missing value)".to_string()),
            Value::Array(a) if a.iter().any(|x| x.is_null()) => {
                Some("holds null (a missing value)".to_string())
            }
            Value::String(t) if numeric => Some(format!("{t:?} is a string; expected a number")),
            Value::Array(a) if a.iter().any(is_text) => {
                Some("holds a string; expected numbers".to_string())
            }
            _ => None,
        };
        if let Some(m) = bad {
            return Err(RowError {
                row,
                field: Some(k.clone()),
                message: m,
            });
        }
    }
    Ok(())
}

/// Checks named numeric features against the bundle's observed range (the range policy).
fn check_range(
    l: &Loaded,
    margin: f64,
    row: usize,
    obj: &Map<String, Value>,
) -> Result<(), RowError> {
    for f in &l.manifest.schema.features {
        let (Some(lo), Some(hi)) = (f.min, f.max) else {
            continue;
        };
        let Some(v) = obj.get(&f.name).and_then(Value::as_f64) else {
            continue;
        };
        let pad = (hi - lo).abs() * margin;
        if v < lo - pad || v > hi + pad {
            return Err(RowError {
                row,
                field: Some(f.name.clone()),
                message: format!(
                    "{v} is outside the range seen in training [{lo}, {hi}] (range policy, margin {margin})"
                ),
            });
        }
    }
    Ok(())
}

/// Scores `rows` (JSON objects keyed by feature or input names) with `loaded`, recording
/// counters. `allow_missing` lets null values through as NaN (for models that impute).
pub fn predict_with(
    loaded: Arc<Loaded>,
    rows: &[Map<String, Value>],
    allow_missing: bool,
) -> Result<Prediction, PredictError> {
    let start = Instant::now();
    let cpu_start = thread_cpu_ns();
    let c = &loaded.counters;
    let mut b = loaded.model.batch_builder();
    for (i, row) in rows.iter().enumerate() {
        if !allow_missing {
            if let Err(e) =
                check_finite(&loaded.model, i, row).and_then(|()| match loaded.range_margin {
                    Some(m) => check_range(&loaded, m, i, row),
                    None => Ok(()),
                })
            {
                c.invalid.fetch_add(1, Ordering::Relaxed);
                return Err(PredictError::Invalid(e));
            }
        }
        if let Err(e) = b.push_json(row, i as u64) {
            c.invalid.fetch_add(1, Ordering::Relaxed);
            return Err(PredictError::Invalid(row_error(i, e)));
        }
    }
    let batch = b.take();
    let out = match loaded.model.run(&batch) {
        Ok(o) => o,
        Err(e) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            return Err(PredictError::Engine(e.to_string()));
        }
    };
    let mut outputs = Vec::with_capacity(rows.len());
    let mut nan = 0;
    for (r, row) in rows.iter().enumerate() {
        let obj = loaded.model.render_row(&out, r);
        if obj.values().any(non_finite) {
            nan += 1;
        }
        loaded.distributions.observe(&loaded.manifest, row, &obj);
        outputs.push(obj);
    }
    observe_drift(&loaded, rows, &outputs);
    c.ok.fetch_add(1, Ordering::Relaxed);
    c.rows.fetch_add(rows.len() as u64, Ordering::Relaxed);
    c.nan_rows.fetch_add(nan, Ordering::Relaxed);
    // per-row latency, so batches and single rows compare with the install measurement
    let n = rows.len().max(1) as u64;
    c.observe_latency(start.elapsed().as_micros() as u64 / n);
    c.observe_cpu(thread_cpu_ns().saturating_sub(cpu_start) / 1000 / n);
    Ok(Prediction { outputs, loaded })
}

/// The value of reference feature `name` (position `pos` in the schema) in a request row:
/// by name, or by position when the row holds one input with the whole feature vector.
/// NaN when absent or not a number (drift counts it as missing).
fn feature_value(row: &Map<String, Value>, name: &str, pos: usize) -> f64 {
    match row.get(name) {
        Some(v) => v.as_f64().unwrap_or(f64::NAN),
        None if row.len() == 1 => row
            .values()
            .next()
            .and_then(Value::as_array)
            .and_then(|a| a.get(pos))
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN),
        None => f64::NAN,
    }
}

/// The prediction score the bundle's prediction profile describes, from a rendered row.
pub fn prediction_score(
    p: &PredictionProfile,
    class_index: Option<usize>,
    out: &Map<String, Value>,
) -> Option<f64> {
    let v = out.get(&p.output)?;
    let top = |it: &mut dyn Iterator<Item = &Value>| it.filter_map(Value::as_f64).reduce(f64::max);
    match (v, p.score, &p.class) {
        (Value::Object(o), PredictionScore::ClassProbability, Some(c)) => {
            o.get(c).and_then(Value::as_f64)
        }
        (Value::Object(o), _, _) => top(&mut o.values()),
        // a probability tensor [N, classes]: the class's column, as `fleetctl bundle build`
        // profiled it
        (Value::Array(a), PredictionScore::ClassProbability, Some(_)) => {
            a.get(class_index?).and_then(Value::as_f64)
        }
        (Value::Array(a), PredictionScore::TopProbability, _) => top(&mut a.iter()),
        (Value::Array(a), PredictionScore::Value, _) if a.len() == 1 => a[0].as_f64(),
        (Value::Array(_), _, _) => None,
        (other, _, _) => other.as_f64(),
    }
}

/// Counts the rows and their prediction scores in the version's drift window (one lock per
/// request; the binning is a binary search per feature).
fn observe_drift(l: &Loaded, rows: &[Map<String, Value>], outputs: &[Map<String, Value>]) {
    let Some(drift) = &l.drift else { return };
    let Some(reference) = l.manifest.reference.as_ref() else {
        return;
    };
    let n = l.drift_features.len();
    let mut values = Vec::with_capacity(n * rows.len());
    for row in rows {
        for (name, pos) in &l.drift_features {
            values.push(feature_value(row, name, *pos));
        }
    }
    let scores: Vec<Option<f64>> = match &reference.predictions {
        Some(p) => outputs
            .iter()
            .map(|o| prediction_score(p, l.prediction_class, o))
            .collect(),
        None => Vec::new(),
    };
    let Ok(mut d) = drift.lock() else { return };
    if n > 0 {
        for chunk in values.chunks_exact(n) {
            let _ = d.observe_row(chunk);
        }
    }
    for s in scores {
        d.observe_prediction(s.unwrap_or(f64::NAN));
    }
}

fn row_error(row: usize, e: InputError) -> RowError {
    RowError {
        row,
        field: e.column.clone(),
        message: e.message.clone(),
    }
}

/// How a candidate version takes part in traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateMode {
    /// Runs on the same inputs as the active version; its outputs are only compared.
    Shadow,
    /// Serves this percentage of requests, chosen by a sticky key.
    Split(u8),
}

/// A candidate version next to the active one, with its comparison counters.
#[derive(Debug)]
pub struct Candidate {
    pub loaded: Arc<Loaded>,
    pub mode: CandidateMode,
    /// Shadow: rows compared with the active version's outputs, and those that agreed.
    pub compared: AtomicU64,
    pub agreed: AtomicU64,
    /// Shadow: comparisons skipped because the shadow was still busy.
    pub skipped: AtomicU64,
    busy: AtomicU64,
}

impl Candidate {
    pub fn new(loaded: Arc<Loaded>, mode: CandidateMode) -> Candidate {
        Candidate {
            loaded,
            mode,
            compared: AtomicU64::new(0),
            agreed: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            busy: AtomicU64::new(0),
        }
    }
}

/// Most shadow comparisons running at once; more are skipped (and counted).
const MAX_SHADOW_IN_FLIGHT: u64 = 4;

/// One model: its active version and an optional candidate.
#[derive(Debug, Clone)]
struct Entry {
    active: Arc<Loaded>,
    candidate: Option<Arc<Candidate>>,
}

/// FNV-1a: a stable hash for sticky routing keys.
fn sticky_bucket(key: &str) -> u8 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % 100) as u8
}

/// The active version of every model, swapped atomically.
#[derive(Debug, Default)]
pub struct Registry {
    models: RwLock<BTreeMap<String, Entry>>,
    unkeyed: AtomicU64,
}

impl Registry {
    /// The active version of `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Loaded>> {
        self.models.read().ok()?.get(name).map(|e| e.active.clone())
    }

    /// The candidate of `name`, if any.
    pub fn candidate(&self, name: &str) -> Option<Arc<Candidate>> {
        self.models.read().ok()?.get(name)?.candidate.clone()
    }

    /// The version that serves a request of `name` with sticky `key`: the split candidate
    /// for its share of keys (requests without a key are spread round-robin), else the
    /// active version.
    pub fn route(&self, name: &str, key: Option<&str>) -> Option<Arc<Loaded>> {
        let m = self.models.read().ok()?;
        let e = m.get(name)?;
        if let Some(c) = &e.candidate {
            if let CandidateMode::Split(pct) = c.mode {
                let bucket = match key {
                    Some(k) => sticky_bucket(k),
                    None => (self.unkeyed.fetch_add(1, Ordering::Relaxed) % 100) as u8,
                };
                if bucket < pct {
                    return Some(c.loaded.clone());
                }
            }
        }
        Some(e.active.clone())
    }

    /// Every active version, by name.
    pub fn all(&self) -> Vec<Arc<Loaded>> {
        self.models
            .read()
            .map(|m| m.values().map(|e| e.active.clone()).collect())
            .unwrap_or_default()
    }

    /// Every candidate, by model name.
    pub fn candidates(&self) -> Vec<Arc<Candidate>> {
        self.models
            .read()
            .map(|m| m.values().filter_map(|e| e.candidate.clone()).collect())
            .unwrap_or_default()
    }

    /// Makes `loaded` the active version of its model; returns the one it replaced, which
    /// finishes the requests already holding it. A candidate of the same release is dropped.
    pub fn activate(&self, loaded: Arc<Loaded>) -> Option<Arc<Loaded>> {
        let mut m = self.models.write().ok()?;
        let candidate = m
            .get(&loaded.name)
            .and_then(|e| e.candidate.clone())
            .filter(|c| c.loaded.release != loaded.release);
        m.insert(
            loaded.name.clone(),
            Entry {
                active: loaded,
                candidate,
            },
        )
        .map(|e| e.active)
    }

    /// Sets (or clears) the candidate of `name`.
    pub fn set_candidate(&self, name: &str, candidate: Option<Candidate>) {
        if let Ok(mut m) = self.models.write() {
            if let Some(e) = m.get_mut(name) {
                e.candidate = candidate.map(Arc::new);
            }
        }
    }

    /// Scores `rows` with the active version of `name` (or its split candidate for `key`),
    /// then lets a shadow candidate score the same rows off the request path.
    pub fn predict_routed(
        &self,
        name: &str,
        rows: &[Map<String, Value>],
        allow_missing: bool,
        key: Option<&str>,
    ) -> Result<Prediction, PredictError> {
        let loaded = self
            .route(name, key)
            .ok_or_else(|| PredictError::UnknownModel(name.to_string()))?;
        let p = predict_with(loaded, rows, allow_missing)?;
        self.shadow(name, rows, &p);
        Ok(p)
    }

    /// Scores `rows` with the active version of `name`.
    pub fn predict(
        &self,
        name: &str,
        rows: &[Map<String, Value>],
        allow_missing: bool,
    ) -> Result<Prediction, PredictError> {
        self.predict_routed(name, rows, allow_missing, None)
    }

    /// Runs a shadow candidate on `rows` in the background and compares with `served`
    /// (floats within the bundle's golden tolerance). Skipped when the shadow is busy.
    pub fn shadow(&self, name: &str, rows: &[Map<String, Value>], served: &Prediction) {
        let Some(c) = self.candidate(name) else {
            return;
        };
        if c.mode != CandidateMode::Shadow || served.loaded.release == c.loaded.release {
            return;
        }
        if c.busy.fetch_add(1, Ordering::AcqRel) >= MAX_SHADOW_IN_FLIGHT {
            c.busy.fetch_sub(1, Ordering::AcqRel);
            c.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let rows = rows.to_vec();
        let expected = served.outputs.clone();
        let job = move || {
            if let Ok(p) = predict_with(c.loaded.clone(), &rows, true) {
                let g = &c.loaded.manifest.golden;
                for (e, a) in expected.iter().zip(&p.outputs) {
                    c.compared.fetch_add(1, Ordering::Relaxed);
                    let same = shared::bundle::golden::compare(
                        &Value::Object(e.clone()),
                        &Value::Object(a.clone()),
                        g.rtol,
                        g.atol,
                        "shadow",
                    )
                    .is_ok();
                    if same {
                        c.agreed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            c.busy.fetch_sub(1, Ordering::AcqRel);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(job);
            }
            Err(_) => job(),
        }
    }
}

/// A health-window verdict.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    /// Still inside the window (or too few predictions).
    Pending,
    Healthy,
    /// Roll back, with the reason.
    Breach(String),
}

/// Health limits (from the config's `[health]`).
#[derive(Debug, Clone)]
pub struct HealthPolicy {
    pub window: Duration,
    pub min_predictions: u64,
    pub max_error_rate: f64,
    pub max_nan_rate: f64,
    pub max_p99_ratio: f64,
}

/// Requests a version must have answered before its p99 latency is judged (or used as the
/// next version's baseline): with fewer, the p99 is the slowest request, and one cold first
/// call after an activation would roll back a healthy model.
pub const MIN_FOR_P99: u64 = 100;

/// `us` rounded up to its latency bucket's bound (both sides of a latency comparison are).
fn bucket_bound(us: u64) -> u64 {
    LATENCY_BUCKETS_US
        .iter()
        .copied()
        .find(|&b| us <= b)
        .unwrap_or(u64::MAX)
}

/// Judges a version in its health window. Breaches are reported as soon as enough requests
/// were seen to judge them (error and NaN rates after 20, live p99 latency after
/// [`MIN_FOR_P99`]; the activation-time latency comparison at once), so a broken model
/// does not serve a whole window.
pub fn judge(l: &Loaded, p: &HealthPolicy) -> Health {
    if let Some((old, new)) = l.activation_p99_us {
        if bucket_bound(new) as f64 > p.max_p99_ratio * bucket_bound(old).max(1) as f64 {
            return Health::Breach(format!(
                "p99 latency (CPU time per row) {new} us exceeds {}x the previous version's {old} us (single rows, measured side by side at activation)",
                p.max_p99_ratio
            ));
        }
    }
    let c = &l.counters;
    let ok = c.ok.load(Ordering::Relaxed);
    let failed = c.failed.load(Ordering::Relaxed);
    let rows = c.rows.load(Ordering::Relaxed);
    let nan = c.nan_rows.load(Ordering::Relaxed);
    let requests = ok + failed;
    const MIN_TO_JUDGE: u64 = 20;
    if requests >= MIN_TO_JUDGE {
        let err = failed as f64 / requests as f64;
        if err > p.max_error_rate {
            return Health::Breach(format!(
                "error rate {err:.3} over {requests} requests exceeds {}",
                p.max_error_rate
            ));
        }
    }
    if rows >= MIN_TO_JUDGE {
        let nr = nan as f64 / rows as f64;
        if nr > p.max_nan_rate {
            return Health::Breach(format!(
                "NaN/inf output rate {nr:.3} over {rows} rows exceeds {}",
                p.max_nan_rate
            ));
        }
    }
    if ok >= MIN_FOR_P99 {
        if let (Some(base), Some(p99)) = (l.baseline_p99_us, c.cpu_quantile_us(0.99)) {
            // compare bucket bounds: the baseline is rounded up to its bucket too
            if p99 as f64 > p.max_p99_ratio * bucket_bound(base).max(1) as f64 {
                return Health::Breach(format!(
                    "p99 latency (CPU time per row) {p99} us exceeds {}x the previous version's {base} us",
                    p.max_p99_ratio
                ));
            }
        }
    }
    if l.activated.elapsed() >= p.window && rows >= p.min_predictions {
        Health::Healthy
    } else {
        Health::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded() -> Arc<Loaded> {
        let bytes = shared::engine::testing::scaler_model(2, Some(&["a", "b"]));
        let model = Model::from_bytes(&bytes).unwrap();
        let manifest = shared::bundle::testing::manifest("m", &[("model.onnx", &bytes)]);
        Arc::new(Loaded::new(manifest, model))
    }

    fn row(a: Value, b: Value) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("a".into(), a);
        m.insert("b".into(), b);
        m
    }

    #[test]
    fn class_probability_of_an_array_output_is_the_class_column() {
        let profile = PredictionProfile {
            output: "probabilities".into(),
            score: PredictionScore::ClassProbability,
            class: Some("1".into()),
            profile: shared::drift::profile("prediction", &[0.1, 0.9], 2),
        };
        let mut out = Map::new();
        out.insert("probabilities".into(), serde_json::json!([0.2, 0.8]));
        assert_eq!(prediction_score(&profile, Some(1), &out), Some(0.8));
        assert_eq!(prediction_score(&profile, Some(0), &out), Some(0.2));
        // the class is not one of the model's labels: no score rather than a wrong one
        assert_eq!(prediction_score(&profile, None, &out), None);
        out.insert(
            "probabilities".into(),
            serde_json::json!({"0": 0.3, "1": 0.7}),
        );
        assert_eq!(prediction_score(&profile, None, &out), Some(0.7));
    }

    #[test]
    fn predicts_and_names_bad_rows() {
        let reg = Registry::default();
        reg.activate(loaded());
        let p = reg
            .predict(
                "m",
                &[row(1.0.into(), 2.0.into()), row(3.0.into(), 4.0.into())],
                false,
            )
            .unwrap();
        assert_eq!(p.outputs.len(), 2);
        let err = reg
            .predict(
                "m",
                &[row(1.0.into(), 2.0.into()), row(Value::Null, 4.0.into())],
                false,
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "row 1, field \"a\": is null (a missing value)"
        );
        let err = reg
            .predict("m", &[row("x".into(), 2.0.into())], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 0, field \"a\""), "{err}");
        let err = reg
            .predict("m", &[row("NaN".into(), 2.0.into())], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("row 0, field \"a\": \"NaN\" is a string"),
            "{err}"
        );
        assert!(matches!(
            reg.predict("nope", &[], false),
            Err(PredictError::UnknownModel(_))
        ));
        let l = reg.get("m").unwrap();
        assert_eq!(l.counters.ok.load(Ordering::Relaxed), 1);
        assert_eq!(l.counters.invalid.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn split_is_sticky_and_shadow_compares() {
        let reg = Registry::default();
        reg.activate(loaded());
        let mut second = Loaded::new(
            shared::bundle::testing::manifest("m", &[]),
            reg.get("m").unwrap().model.clone(),
        );
        second.release = 9;
        let second = Arc::new(second);
        reg.set_candidate(
            "m",
            Some(Candidate::new(second.clone(), CandidateMode::Split(30))),
        );
        let mut to_candidate = 0;
        for k in 0..1000 {
            let key = format!("machine-{k}");
            let a = reg.route("m", Some(&key)).unwrap().release;
            assert_eq!(a, reg.route("m", Some(&key)).unwrap().release, "sticky");
            to_candidate += usize::from(a == 9);
        }
        assert!((250..350).contains(&to_candidate), "{to_candidate} of 1000");
        reg.set_candidate("m", Some(Candidate::new(second, CandidateMode::Shadow)));
        for _ in 0..5 {
            let p = reg
                .predict("m", &[row(1.0.into(), 2.0.into())], false)
                .unwrap();
            assert_ne!(p.loaded.release, 9, "a shadow never serves");
        }
        let c = reg.candidate("m").unwrap();
        assert_eq!(
            c.compared.load(Ordering::Relaxed) + c.skipped.load(Ordering::Relaxed),
            5
        );
        assert_eq!(
            c.agreed.load(Ordering::Relaxed),
            c.compared.load(Ordering::Relaxed)
        );
    }

    #[test]
    fn range_policy_refuses_values_far_outside_training() {
        let bytes = shared::engine::testing::scaler_model(2, Some(&["a", "b"]));
        let mut manifest = shared::bundle::testing::manifest("m", &[("model.onnx", &bytes)]);
        manifest.schema.features = vec![
            shared::bundle::FeatureSchema {
                name: "a".into(),
                min: Some(0.0),
                max: Some(10.0),
            },
            shared::bundle::FeatureSchema {
                name: "b".into(),
                min: None,
                max: None,
            },
        ];
        let mut l = Loaded::new(manifest, Model::from_bytes(&bytes).unwrap());
        l.range_margin = Some(0.1);
        let l = Arc::new(l);
        assert!(predict_with(l.clone(), &[row(10.9.into(), 1e9.into())], false).is_ok());
        let err = predict_with(l, &[row(11.5.into(), 1.0.into())], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("row 0, field \"a\": 11.5 is outside the range seen in training [0, 10]"),
            "{err}"
        );
    }

    #[test]
    fn health_judgement() {
        let policy = HealthPolicy {
            window: Duration::from_secs(0),
            min_predictions: 10,
            max_error_rate: 0.05,
            max_nan_rate: 0.01,
            max_p99_ratio: 3.0,
        };
        let l = loaded();
        assert_eq!(judge(&l, &policy), Health::Pending);
        for _ in 0..20 {
            predict_with(l.clone(), &[row(1.0.into(), 2.0.into())], false).unwrap();
        }
        assert_eq!(judge(&l, &policy), Health::Healthy);
        let l2 = loaded();
        l2.counters.ok.store(30, Ordering::Relaxed);
        l2.counters.rows.store(30, Ordering::Relaxed);
        l2.counters.nan_rows.store(5, Ordering::Relaxed);
        assert!(matches!(judge(&l2, &policy), Health::Breach(r) if r.contains("NaN")));
        let mut l3 = Loaded::new(shared::bundle::testing::manifest("m", &[]), l.model.clone());
        l3.baseline_p99_us = Some(100);
        // one slow request among fewer than MIN_FOR_P99 is not judged
        l3.counters.observe_cpu(2_000);
        for _ in 0..60 {
            l3.counters.observe_cpu(80);
        }
        l3.counters.ok.store(61, Ordering::Relaxed);
        l3.counters.rows.store(61, Ordering::Relaxed);
        assert_eq!(judge(&l3, &policy), Health::Healthy);
        // ... nor one among 100 (the p99 is the 99th)
        for _ in 0..39 {
            l3.counters.observe_cpu(80);
        }
        l3.counters.ok.store(100, Ordering::Relaxed);
        l3.counters.rows.store(100, Ordering::Relaxed);
        assert_eq!(judge(&l3, &policy), Health::Healthy);
        // without a live baseline, the side-by-side measurement at activation decides, at once
        let mut l4 = Loaded::new(shared::bundle::testing::manifest("m", &[]), l.model.clone());
        l4.activation_p99_us = Some((90, 240));
        assert_eq!(judge(&l4, &policy), Health::Pending);
        l4.activation_p99_us = Some((90, 2_400));
        assert!(matches!(judge(&l4, &policy), Health::Breach(r) if r.contains("side by side")));
        // a version slow throughout is
        for _ in 0..100 {
            l3.counters.observe_cpu(2_000);
        }
        l3.counters.ok.store(200, Ordering::Relaxed);
        assert!(matches!(judge(&l3, &policy), Health::Breach(r) if r.contains("p99")));
    }
}
