//! Telemetry: every record the agent produces for the fleet (telemetry windows, drift and
//! feedback summaries, health samples, events) is built here and appended to the outbox,
//! which makes it "produced"; the sync task is woken after each append.
//!
//! Record bodies are JSON objects with a `kind` (`telemetry_window`, `drift_summary`,
//! `feedback_summary`, `health_sample`, `event`), documented in
//! `shared/docs/mqtt-protocol.md`. Producing never blocks inference: windows are cut on a
//! timer off the request path, a failed append is counted (the outbox counts `io` drops) and
//! logged, never retried in a loop, and without an outbox the record is counted as dropped.
//!
//! Each window also replaces [`DriftGauges`]: the last window's drift metrics and alert
//! flags per active (model, release), which `/metrics` exports.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use shared::drift::{AlertTracker, DriftMetrics, DriftSummary, Privatizer};
use tokio::sync::Notify;

use crate::config::Config;
use crate::outbox::{now_ms, Class, Outbox, OutboxError, OutboxStats};
use crate::runtime::{bucket_quantile, Loaded, LATENCY_BUCKETS_US};
use crate::service::AppState;
use crate::system::{HealthMonitor, HealthSample, LatencyWindow, ServingInput, SystemSampler};

/// The outbox handle plus what the service needs around it.
#[derive(Debug)]
pub struct Telemetry {
    outbox: Option<Outbox>,
    /// Woken after every append (the sync task waits on it).
    pub wake: Arc<Notify>,
    /// Records that could not be stored because the outbox could not be opened at all.
    pub unavailable: AtomicU64,
    /// Why the outbox is unavailable, if it is.
    pub open_error: Option<String>,
    /// The last telemetry window's drift per active version (for `/metrics`).
    pub drift: DriftGauges,
}

/// The `feature` label value of the prediction distribution's drift in `/metrics` (input
/// features keep their reference names; an input feature with this exact name is not
/// exported, it would collide).
pub const PREDICTION_FEATURE: &str = "__prediction__";

/// At most this many versions are kept in [`DriftGauges`] (one per active model; more
/// active models than this are left out of `/metrics`, not of the drift records).
pub const MAX_DRIFT_VERSIONS: usize = 256;

/// One feature's (or the prediction distribution's) drift in the last window.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureDrift {
    /// The feature name, [`PREDICTION_FEATURE`] for the prediction distribution.
    pub feature: String,
    /// The metrics against the reference; each absent when undefined (e.g. no rows).
    pub metrics: DriftMetrics,
    /// The [`AlertTracker`] flag: the alert metric above its threshold for the configured
    /// number of consecutive windows.
    pub alert: bool,
}

/// The last window's drift of one active version.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionDrift {
    pub model: String,
    pub release: u64,
    /// Rows observed in the window (0: no data, the metrics are absent).
    pub rows: u64,
    /// Input features in the reference's order, then the prediction distribution.
    pub features: Vec<FeatureDrift>,
}

impl VersionDrift {
    /// The gauges of `summary` (after [`AlertTracker::update`] set its flags).
    pub fn from_summary(model: &str, release: u64, summary: &DriftSummary) -> VersionDrift {
        let inputs = summary
            .features
            .iter()
            .filter(|f| f.name != PREDICTION_FEATURE)
            .map(|f| FeatureDrift {
                feature: f.name.clone(),
                metrics: f.metrics,
                alert: f.alert,
            });
        let prediction = summary.predictions.iter().map(|f| FeatureDrift {
            feature: PREDICTION_FEATURE.to_string(),
            metrics: f.metrics,
            alert: f.alert,
        });
        VersionDrift {
            model: model.to_string(),
            release,
            rows: summary.rows,
            features: inputs.chain(prediction).collect(),
        }
    }
}

/// The last window's drift per active (model, release): replaced as a whole every window,
/// so a version no longer active disappears; bounded by [`MAX_DRIFT_VERSIONS`].
#[derive(Debug, Default)]
pub struct DriftGauges {
    last: Mutex<BTreeMap<(String, u64), VersionDrift>>,
}

impl DriftGauges {
    /// Replaces every entry with `versions` (the active versions of the window just cut);
    /// beyond [`MAX_DRIFT_VERSIONS`] the rest are left out.
    pub fn replace(&self, versions: Vec<VersionDrift>) {
        let map: BTreeMap<(String, u64), VersionDrift> = versions
            .into_iter()
            .take(MAX_DRIFT_VERSIONS)
            .map(|v| ((v.model.clone(), v.release), v))
            .collect();
        if let Ok(mut last) = self.last.lock() {
            *last = map;
        }
    }

    /// The entries, ordered by model and release.
    pub fn snapshot(&self) -> Vec<VersionDrift> {
        self.last
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

impl Telemetry {
    /// Opens `<state_dir>/outbox`. A database sled cannot open is quarantined and replaced
    /// (an event says so); one that cannot be opened at all leaves the agent running without
    /// an outbox (records counted as dropped), never in a crash loop. Another process holding
    /// the database is an error: two agents on one state directory.
    pub fn open(config: &Config, root: &Path) -> Result<Telemetry, OutboxError> {
        let dir = root.join("outbox");
        let t = match Outbox::open(&dir, &config.outbox) {
            Ok((outbox, quarantined)) => {
                let t = Telemetry {
                    outbox: Some(outbox),
                    wake: Arc::new(Notify::new()),
                    unavailable: AtomicU64::new(0),
                    open_error: None,
                    drift: DriftGauges::default(),
                };
                if let Some(q) = quarantined {
                    tracing::error!(moved_to = %q.moved_to.display(), error = %q.error, "outbox database did not open; quarantined and recreated");
                    t.event(
                        "",
                        "outbox_quarantined",
                        json!({"moved_to": q.moved_to.display().to_string(), "error": q.error}),
                    );
                }
                t
            }
            Err(e @ OutboxError::Locked { .. }) => return Err(e),
            Err(e) => {
                tracing::error!(error = %e, "outbox unavailable; records will be counted as dropped");
                Telemetry {
                    outbox: None,
                    wake: Arc::new(Notify::new()),
                    unavailable: AtomicU64::new(0),
                    open_error: Some(e.to_string()),
                    drift: DriftGauges::default(),
                }
            }
        };
        Ok(t)
    }

    pub fn outbox(&self) -> Option<&Outbox> {
        self.outbox.as_ref()
    }

    /// Appends records (one durable batch) and wakes the sync task. Blocking (an fsync):
    /// call it off the async workers.
    pub fn emit(&self, records: Vec<(Class, Value)>) {
        if records.is_empty() {
            return;
        }
        let Some(outbox) = &self.outbox else {
            self.unavailable
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            return;
        };
        let encoded: Vec<(Class, Vec<u8>)> = records
            .into_iter()
            .filter_map(|(c, v)| serde_json::to_vec(&v).ok().map(|b| (c, b)))
            .collect();
        match outbox.append(&encoded) {
            Ok(_) => self.wake.notify_one(),
            Err(e) => tracing::warn!(error = %e, records = encoded.len(), "outbox append failed"),
        }
    }

    /// Appends one event record.
    pub fn event(&self, model: &str, event: &str, detail: Value) {
        self.emit(vec![(Class::Event, event_body(model, event, detail))]);
    }

    pub fn stats(&self) -> Option<OutboxStats> {
        self.outbox.as_ref().map(Outbox::stats)
    }

    /// Flushes the outbox (shutdown).
    pub fn flush(&self) {
        if let Some(o) = &self.outbox {
            if let Err(e) = o.flush() {
                tracing::warn!(error = %e, "outbox flush failed");
            }
        }
    }
}

/// When this process started (Unix ms), for the birth message.
pub fn started_at_ms() -> u64 {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *START.get_or_init(now_ms)
}

/// The retained birth message: this device, its tags, the agent version, the versions it
/// serves; an active version carries its model's phase from `phases` (model name ->
/// `health_window` | `committed`, the store's state).
pub fn birth(
    device: &str,
    registry: &crate::runtime::Registry,
    tags: &std::collections::BTreeMap<String, String>,
    phases: &std::collections::BTreeMap<String, String>,
) -> shared::wire::Birth {
    let mut models: Vec<shared::wire::ModelVersion> = registry
        .all()
        .iter()
        .map(|l| shared::wire::ModelVersion {
            name: l.name.clone(),
            version: l.version.clone(),
            release: Some(l.release),
            role: "active".into(),
            phase: phases.get(&l.name).cloned(),
        })
        .collect();
    for c in registry.candidates() {
        models.push(shared::wire::ModelVersion {
            name: c.loaded.name.clone(),
            version: c.loaded.version.clone(),
            release: Some(c.loaded.release),
            role: match c.mode {
                crate::runtime::CandidateMode::Shadow => "shadow".into(),
                crate::runtime::CandidateMode::Split(_) => "split".into(),
            },
            phase: None,
        });
    }
    shared::wire::Birth {
        v: shared::wire::VERSION,
        device: device.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        models,
        started_at_ms: started_at_ms(),
        sent_at_ms: 0,
        tags: tags.clone(),
    }
}

/// Applies a `POST /v1/feedback` (or MQTT feedback) body: the HTTP status and the response
/// body. Concept-drift flag changes become events. Blocking (an event is an outbox append).
pub fn receive_feedback(state: &AppState, body: &[u8]) -> (u16, Value) {
    use crate::feedback::{parse_request, DriftChange, FeedbackRequest};
    let req = match parse_request(body) {
        Ok(r) => r,
        Err(e) => return (400, json!({"error": e.to_string()})),
    };
    let single = matches!(req, FeedbackRequest::One(_));
    let outcome = state.feedback.apply_batch(req.into_items());
    let events: Vec<(Class, Value)> = outcome
        .drift_changes
        .iter()
        .map(|(k, ch)| {
            let (name, z) = match ch {
                DriftChange::Started { z } => ("concept_drift_started", z),
                DriftChange::Cleared { z } => ("concept_drift_cleared", z),
            };
            (
                Class::Event,
                event_body(
                    &k.name,
                    name,
                    json!({"version": &*k.version, "release": k.release, "z": z}),
                ),
            )
        })
        .collect();
    state.telemetry.emit(events);
    if single {
        let item = outcome.items.into_iter().next();
        let status = match &item {
            Some(i) if i.status == "refused" => match i.reason.as_deref() {
                Some("unknown_id") | Some("expired") => 404,
                Some("already_labelled") => 409,
                _ => 422,
            },
            _ => 200,
        };
        return (status, serde_json::to_value(item).unwrap_or_default());
    }
    (
        200,
        json!({
            "applied": outcome.applied,
            "duplicates": outcome.duplicates,
            "refused": outcome.refused,
            "results": outcome.items,
        }),
    )
}

/// The body of an event record.
pub fn event_body(model: &str, event: &str, detail: Value) -> Value {
    json!({
        "kind": "event",
        "event": event,
        "model": model,
        "at_ms": now_ms(),
        "detail": detail,
    })
}

/// Cumulative counters of one version at the previous window.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    ok: u64,
    failed: u64,
    invalid: u64,
    rows: u64,
    nan_rows: u64,
    latency: Vec<u64>,
}

fn snapshot(l: &Loaded) -> Snapshot {
    let c = &l.counters;
    Snapshot {
        ok: c.ok.load(Ordering::Relaxed),
        failed: c.failed.load(Ordering::Relaxed),
        invalid: c.invalid.load(Ordering::Relaxed),
        rows: c.rows.load(Ordering::Relaxed),
        nan_rows: c.nan_rows.load(Ordering::Relaxed),
        latency: c
            .latency
            .iter()
            .map(|x| x.load(Ordering::Relaxed))
            .collect(),
    }
}

/// Cuts windows and samples: owned by one periodic task, run on the blocking pool.
pub struct Producer {
    state: Arc<AppState>,
    window_start_ms: u64,
    last: HashMap<(String, u64), Snapshot>,
    trackers: HashMap<(String, u64), AlertTracker>,
    privatizer: Option<Privatizer>,
    sampler: SystemSampler,
    latency: LatencyWindow,
    monitor: HealthMonitor,
    /// The most recent health sample (for `/metrics` and status).
    pub last_sample: Arc<Mutex<Option<HealthSample>>>,
}

impl Producer {
    pub fn new(state: Arc<AppState>, root: &Path) -> Producer {
        let privatizer = state.config.drift.privacy.clone().and_then(|p| {
            Privatizer::new(p)
                .map_err(|e| tracing::error!(error = %e, "drift privacy disabled"))
                .ok()
        });
        let last_sample = state.health_sample.clone();
        Producer {
            state,
            window_start_ms: now_ms(),
            last: HashMap::new(),
            trackers: HashMap::new(),
            privatizer,
            sampler: SystemSampler::new(root),
            latency: LatencyWindow::new(),
            monitor: HealthMonitor::with_defaults(),
            last_sample,
        }
    }

    /// Cuts the telemetry, drift and feedback window of every active version.
    pub fn window(&mut self) {
        let end = now_ms();
        let start = std::mem::replace(&mut self.window_start_ms, end);
        let mut records = Vec::new();
        let mut events = Vec::new();
        let models = self.state.registry.all();
        let mut seen = Vec::new();
        let mut gauges = Vec::new();
        for l in &models {
            let key = (l.name.clone(), l.release);
            seen.push(key.clone());
            let now = snapshot(l);
            let prev = self
                .last
                .insert(key.clone(), now.clone())
                .unwrap_or_default();
            let lat: Vec<u64> = now
                .latency
                .iter()
                .zip(prev.latency.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect();
            let requests_ok = now.ok.saturating_sub(prev.ok);
            records.push((
                Class::Telemetry,
                json!({
                    "kind": "telemetry_window",
                    "model": l.name,
                    "version": l.version,
                    "release": l.release,
                    "start_ms": start,
                    "end_ms": end,
                    "requests_ok": requests_ok,
                    "requests_failed": now.failed.saturating_sub(prev.failed),
                    "requests_invalid": now.invalid.saturating_sub(prev.invalid),
                    "rows": now.rows.saturating_sub(prev.rows),
                    "nan_rows": now.nan_rows.saturating_sub(prev.nan_rows),
                    "latency_p50_us": bucket_quantile(&LATENCY_BUCKETS_US, &lat, 0.5),
                    "latency_p90_us": bucket_quantile(&LATENCY_BUCKETS_US, &lat, 0.9),
                    "latency_p99_us": bucket_quantile(&LATENCY_BUCKETS_US, &lat, 0.99),
                }),
            ));
            if let Some(d) = &l.drift {
                let summary = d.lock().ok().map(|mut d| d.take_summary(start, end));
                if let Some(mut summary) = summary {
                    if let (Some(p), Some(r)) =
                        (&mut self.privatizer, l.manifest.reference.as_ref())
                    {
                        if let Err(e) = p.apply(&mut summary, r) {
                            tracing::warn!(error = %e, "drift privacy not applied");
                        }
                    }
                    let tracker = self.trackers.entry(key.clone()).or_insert_with(|| {
                        AlertTracker::new(self.state.config.drift.alert.clone())
                    });
                    for ch in tracker.update(&mut summary) {
                        events.push(event_body(
                            &l.name,
                            if ch.raised {
                                "drift_alert_raised"
                            } else {
                                "drift_alert_cleared"
                            },
                            json!({
                                "release": l.release,
                                "feature": ch.feature,
                                "prediction": ch.prediction,
                                "metric": self.state.config.drift.alert.metric,
                                "value": ch.value,
                                "threshold": self.state.config.drift.alert.threshold,
                            }),
                        ));
                    }
                    gauges.push(VersionDrift::from_summary(&l.name, l.release, &summary));
                    records.push((
                        Class::Drift,
                        json!({
                            "kind": "drift_summary",
                            "model": l.name,
                            "version": l.version,
                            "release": l.release,
                            "summary": summary,
                        }),
                    ));
                }
            }
            if let Some(f) = self.state.feedback.summary(&l.feedback_key) {
                records.push((
                    Class::Drift,
                    json!({"kind": "feedback_summary", "model": l.name, "release": l.release, "summary": f}),
                ));
            }
        }
        self.last.retain(|k, _| seen.contains(k));
        self.trackers.retain(|k, _| seen.contains(k));
        self.state.telemetry.drift.replace(gauges);
        records.extend(events.into_iter().map(|e| (Class::Event, e)));
        self.state.telemetry.emit(records);
    }

    /// Samples system health, runs the control charts, emits the sample and any flag.
    pub fn health(&mut self) {
        let models = self.state.registry.all();
        let mut input = ServingInput::default();
        let mut buckets = vec![0u64; LATENCY_BUCKETS_US.len() + 1];
        for l in &models {
            let s = snapshot(l);
            input.ok_total += s.ok;
            input.failed_total += s.failed;
            input.invalid_total += s.invalid;
            for (b, v) in buckets.iter_mut().zip(s.latency) {
                *b += v;
            }
        }
        let [p50, p90, p99] = self.latency.update(&LATENCY_BUCKETS_US, &buckets);
        input.latency_p50_us = p50;
        input.latency_p90_us = p90;
        input.latency_p99_us = p99;
        let sample = self.sampler.sample(&input);
        let mut records = vec![(
            Class::Health,
            json!({"kind": "health_sample", "sample": sample}),
        )];
        for e in self.monitor.observe(&sample) {
            let name = match serde_json::to_value(e.state) {
                Ok(Value::String(s)) => format!("spc_{s}"),
                _ => "spc".to_string(),
            };
            records.push((
                Class::Event,
                event_body("", &name, serde_json::to_value(&e).unwrap_or_default()),
            ));
        }
        if let Ok(mut last) = self.last_sample.lock() {
            *last = Some(sample);
        }
        self.state.telemetry.emit(records);
    }

    /// A version was activated: the latency and error charts start a new calibration.
    pub fn recalibrate(&mut self) {
        self.monitor.recalibrate(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::drift::{AlertConfig, FeatureSummary, DRIFT_SUMMARY_VERSION};

    fn feature(name: &str, psi: Option<f64>) -> FeatureSummary {
        FeatureSummary {
            name: name.into(),
            count: u64::from(psi.is_some()) * 100,
            missing: 0,
            mean: None,
            std: None,
            min: None,
            max: None,
            histogram: vec![0; 10],
            suppressed: 0,
            suppressed_bins: Vec::new(),
            metrics: DriftMetrics {
                psi,
                js: psi.map(|p| p / 10.0),
                ..DriftMetrics::default()
            },
            alert: false,
        }
    }

    fn summary(rows: u64, features: Vec<FeatureSummary>, pred: Option<f64>) -> DriftSummary {
        DriftSummary {
            version: DRIFT_SUMMARY_VERSION,
            reference_id: "0123456789abcdef".into(),
            start_unix_ms: 0,
            end_unix_ms: 1000,
            windows: 1,
            rows,
            features,
            predictions: Some(feature("prediction", pred)),
            privacy: None,
        }
    }

    #[test]
    fn version_drift_carries_metrics_alerts_and_the_prediction() {
        let mut tracker = AlertTracker::new(AlertConfig {
            windows: 2,
            ..AlertConfig::default()
        });
        let mut s = summary(
            100,
            vec![feature("torque", Some(3.5)), feature("wear", Some(0.01))],
            Some(0.4),
        );
        tracker.update(&mut s);
        let first = VersionDrift::from_summary("pdm", 4, &s);
        assert!(first.features.iter().all(|f| !f.alert), "{first:?}");
        // the second window above the threshold raises torque and the prediction
        tracker.update(&mut s);
        let v = VersionDrift::from_summary("pdm", 4, &s);
        assert_eq!((v.model.as_str(), v.release, v.rows), ("pdm", 4, 100));
        let names: Vec<(&str, bool, Option<f64>)> = v
            .features
            .iter()
            .map(|f| (f.feature.as_str(), f.alert, f.metrics.psi))
            .collect();
        assert_eq!(
            names,
            [
                ("torque", true, Some(3.5)),
                ("wear", false, Some(0.01)),
                (PREDICTION_FEATURE, true, Some(0.4)),
            ]
        );
        // a window without data keeps the flags, the metrics are absent
        let mut empty = summary(
            0,
            vec![feature("torque", None), feature("wear", None)],
            None,
        );
        tracker.update(&mut empty);
        let v = VersionDrift::from_summary("pdm", 4, &empty);
        assert_eq!(v.rows, 0);
        assert!(v.features[0].alert && v.features[0].metrics.psi.is_none());
    }

    #[test]
    fn an_input_named_like_the_prediction_label_is_left_out() {
        let s = summary(5, vec![feature(PREDICTION_FEATURE, Some(1.0))], Some(0.1));
        let v = VersionDrift::from_summary("m", 1, &s);
        assert_eq!(v.features.len(), 1);
        assert_eq!(v.features[0].metrics.psi, Some(0.1));
    }

    #[test]
    fn gauges_are_replaced_per_window_and_bounded() {
        let g = DriftGauges::default();
        let v = |model: &str, release| VersionDrift {
            model: model.into(),
            release,
            rows: 1,
            features: Vec::new(),
        };
        g.replace(vec![v("b", 2), v("a", 1)]);
        let keys: Vec<(String, u64)> = g
            .snapshot()
            .into_iter()
            .map(|v| (v.model, v.release))
            .collect();
        assert_eq!(keys, [("a".to_string(), 1), ("b".to_string(), 2)]);
        // b@2 is no longer active: gone after the next window
        g.replace(vec![v("a", 1), v("b", 3)]);
        let keys: Vec<u64> = g.snapshot().into_iter().map(|v| v.release).collect();
        assert_eq!(keys, [1, 3]);
        g.replace(
            (0..MAX_DRIFT_VERSIONS as u64 + 10)
                .map(|r| v("m", r))
                .collect(),
        );
        assert_eq!(g.snapshot().len(), MAX_DRIFT_VERSIONS);
    }
}
