//! `/metrics`: the agent's state in the Prometheus text exposition format (typed metric
//! families, one place), valid for `promtool check metrics`.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::outbox::{Class, DropReason};
use crate::runtime::{Histogram, Loaded, LATENCY_BUCKETS_US};
use crate::service::AppState;
use crate::telemetry::VersionDrift;

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(l: &Loaded) -> String {
    format!("model=\"{}\",release=\"{}\"", esc(&l.name), l.release)
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn fmt_f(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

fn histogram(out: &mut String, name: &str, lbl: &str, h: &Histogram) {
    let mut cum = 0u64;
    for (i, c) in h.counts.iter().enumerate() {
        cum += c.load(Ordering::Relaxed);
        let le = h.bounds.get(i).map_or("+Inf".to_string(), |b| fmt_f(*b));
        let _ = writeln!(out, "{name}_bucket{{{lbl},le=\"{le}\"}} {cum}");
    }
    let _ = writeln!(out, "{name}_sum{{{lbl}}} {}", fmt_f(h.sum()));
    let _ = writeln!(out, "{name}_count{{{lbl}}} {cum}");
}

/// Renders every metric family.
pub fn render(state: &AppState) -> String {
    let active = state.registry.all();
    let candidates = state.registry.candidates();
    // requests, rows and latency cover candidate versions too (distinct release labels)
    let models: Vec<_> = active
        .iter()
        .cloned()
        .chain(candidates.iter().map(|c| c.loaded.clone()))
        .collect();
    let mut out = String::with_capacity(4096);

    header(
        &mut out,
        "edge_agent_ready",
        "gauge",
        "1 when the active models are loaded and the API listens.",
    );
    let _ = writeln!(
        out,
        "edge_agent_ready {}",
        u8::from(state.ready.load(Ordering::SeqCst))
    );

    header(
        &mut out,
        "edge_agent_model_info",
        "gauge",
        "The active version of each model (value 1).",
    );
    for l in &active {
        let _ = writeln!(
            out,
            "edge_agent_model_info{{{},version=\"{}\"}} 1",
            labels(l),
            esc(&l.version)
        );
    }
    header(
        &mut out,
        "edge_agent_candidate_info",
        "gauge",
        "A shadow or split version beside the active one (value 1).",
    );
    for c in &candidates {
        let (mode, pct) = match c.mode {
            crate::runtime::CandidateMode::Shadow => ("shadow", 0),
            crate::runtime::CandidateMode::Split(p) => ("split", p),
        };
        let _ = writeln!(
            out,
            "edge_agent_candidate_info{{{},version=\"{}\",mode=\"{mode}\",percent=\"{pct}\"}} 1",
            labels(&c.loaded),
            esc(&c.loaded.version)
        );
    }
    header(
        &mut out,
        "edge_agent_shadow_rows_total",
        "counter",
        "Rows a shadow version scored, by agreement with the active version's outputs.",
    );
    for c in &candidates {
        let compared = c.compared.load(Ordering::Relaxed);
        let agreed = c.agreed.load(Ordering::Relaxed);
        let l = labels(&c.loaded);
        let _ = writeln!(
            out,
            "edge_agent_shadow_rows_total{{{l},outcome=\"agreed\"}} {agreed}"
        );
        let _ = writeln!(
            out,
            "edge_agent_shadow_rows_total{{{l},outcome=\"disagreed\"}} {}",
            compared.saturating_sub(agreed)
        );
    }
    header(
        &mut out,
        "edge_agent_shadow_skipped_total",
        "counter",
        "Requests not shadowed because the shadow was busy.",
    );
    for c in &candidates {
        let _ = writeln!(
            out,
            "edge_agent_shadow_skipped_total{{{}}} {}",
            labels(&c.loaded),
            c.skipped.load(Ordering::Relaxed)
        );
    }

    header(
        &mut out,
        "edge_agent_requests_total",
        "counter",
        "Inference requests by model, release and status.",
    );
    for l in &models {
        let c = &l.counters;
        for (status, v) in [("ok", &c.ok), ("invalid", &c.invalid), ("error", &c.failed)] {
            let _ = writeln!(
                out,
                "edge_agent_requests_total{{{},status=\"{status}\"}} {}",
                labels(l),
                v.load(Ordering::Relaxed)
            );
        }
    }
    header(
        &mut out,
        "edge_agent_rows_total",
        "counter",
        "Rows predicted.",
    );
    for l in &models {
        let _ = writeln!(
            out,
            "edge_agent_rows_total{{{}}} {}",
            labels(l),
            l.counters.rows.load(Ordering::Relaxed)
        );
    }
    header(
        &mut out,
        "edge_agent_nan_rows_total",
        "counter",
        "Rows whose outputs held NaN or infinity.",
    );
    for l in &models {
        let _ = writeln!(
            out,
            "edge_agent_nan_rows_total{{{}}} {}",
            labels(l),
            l.counters.nan_rows.load(Ordering::Relaxed)
        );
    }

    header(
        &mut out,
        "edge_agent_row_latency_seconds",
        "histogram",
        "Inference time per row (request time divided by its rows).",
    );
    for l in &models {
        let c = &l.counters;
        let mut cum = 0u64;
        for (i, b) in c.latency.iter().enumerate() {
            cum += b.load(Ordering::Relaxed);
            let le = LATENCY_BUCKETS_US
                .get(i)
                .map_or("+Inf".to_string(), |us| fmt_f(*us as f64 / 1e6));
            let _ = writeln!(
                out,
                "edge_agent_row_latency_seconds_bucket{{{},le=\"{le}\"}} {cum}",
                labels(l)
            );
        }
        let _ = writeln!(
            out,
            "edge_agent_row_latency_seconds_sum{{{}}} {}",
            labels(l),
            fmt_f(c.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6)
        );
        let _ = writeln!(
            out,
            "edge_agent_row_latency_seconds_count{{{}}} {cum}",
            labels(l)
        );
    }

    header(
        &mut out,
        "edge_agent_prediction_score",
        "histogram",
        "Classifiers: the top class score; regressors: the predicted value.",
    );
    for l in &models {
        histogram(
            &mut out,
            "edge_agent_prediction_score",
            &labels(l),
            &l.distributions.prediction,
        );
    }
    header(
        &mut out,
        "edge_agent_predicted_label_total",
        "counter",
        "Classifier predictions by label.",
    );
    for l in &models {
        if let Ok(m) = l.distributions.labels.lock() {
            for (label, n) in m.iter() {
                let _ = writeln!(
                    out,
                    "edge_agent_predicted_label_total{{{},label=\"{}\"}} {n}",
                    labels(l),
                    esc(label)
                );
            }
        }
    }
    header(
        &mut out,
        "edge_agent_feature_value",
        "histogram",
        "Input feature values, bucketed at the bundle's reference bin edges.",
    );
    for l in &models {
        for (name, h) in &l.distributions.features {
            histogram(
                &mut out,
                "edge_agent_feature_value",
                &format!("{},feature=\"{}\"", labels(l), esc(name)),
                h,
            );
        }
    }

    render_drift(&mut out, &state.telemetry.drift.snapshot());

    header(
        &mut out,
        "edge_agent_installs_total",
        "counter",
        "Bundles installed and activated.",
    );
    let _ = writeln!(
        out,
        "edge_agent_installs_total {}",
        state.lifecycle.installs.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "edge_agent_install_rejections_total",
        "counter",
        "Bundles refused, by reason.",
    );
    if let Ok(m) = state.lifecycle.rejections.lock() {
        for (reason, n) in m.iter() {
            let _ = writeln!(
                out,
                "edge_agent_install_rejections_total{{reason=\"{}\"}} {n}",
                esc(reason)
            );
        }
    }
    header(
        &mut out,
        "edge_agent_rollbacks_total",
        "counter",
        "Automatic rollbacks, by reason.",
    );
    if let Ok(m) = state.lifecycle.rollbacks.lock() {
        for (reason, n) in m.iter() {
            let _ = writeln!(
                out,
                "edge_agent_rollbacks_total{{reason=\"{}\"}} {n}",
                esc(reason)
            );
        }
    }
    header(
        &mut out,
        "edge_agent_mqtt_messages_total",
        "counter",
        "MQTT inference messages by outcome.",
    );
    let m = &state.mqtt;
    for (what, v) in [
        ("received", &m.received),
        ("published", &m.published),
        ("rejected", &m.rejected),
        ("dropped", &m.dropped),
    ] {
        let _ = writeln!(
            out,
            "edge_agent_mqtt_messages_total{{outcome=\"{what}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
    header(
        &mut out,
        "edge_agent_mqtt_reconnects_total",
        "counter",
        "MQTT connection errors (each followed by a backoff).",
    );
    let _ = writeln!(
        out,
        "edge_agent_mqtt_reconnects_total {}",
        m.reconnects.load(Ordering::Relaxed)
    );
    render_telemetry(state, &mut out);
    out
}

/// The data-drift families of the last telemetry window (one entry per active version with
/// a reference profile): the metrics per feature (the prediction distribution as feature
/// `__prediction__`), the alert flags and the rows observed. A metric that is undefined
/// (e.g. no rows in the window) or not finite has no series.
fn render_drift(out: &mut String, versions: &[VersionDrift]) {
    header(
        out,
        "edge_agent_drift_score",
        "gauge",
        "Data drift of a feature against the bundle's reference in the last telemetry window, by metric (psi, js, wasserstein, wasserstein_norm, ks_bound).",
    );
    for v in versions {
        let lbl = format!("model=\"{}\",release=\"{}\"", esc(&v.model), v.release);
        for f in &v.features {
            let m = &f.metrics;
            for (metric, value) in [
                ("psi", m.psi),
                ("js", m.js),
                ("wasserstein", m.wasserstein),
                ("wasserstein_norm", m.wasserstein_norm),
                ("ks_bound", m.ks_bound),
            ] {
                if let Some(value) = value.filter(|x| x.is_finite()) {
                    let _ = writeln!(
                        out,
                        "edge_agent_drift_score{{{lbl},feature=\"{}\",metric=\"{metric}\"}} {}",
                        esc(&f.feature),
                        fmt_f(value)
                    );
                }
            }
        }
    }
    header(
        out,
        "edge_agent_drift_alert",
        "gauge",
        "1 while a feature's drift alert is raised (the alert metric above its threshold for the configured number of windows).",
    );
    for v in versions {
        for f in &v.features {
            let _ = writeln!(
                out,
                "edge_agent_drift_alert{{model=\"{}\",release=\"{}\",feature=\"{}\"}} {}",
                esc(&v.model),
                v.release,
                esc(&f.feature),
                u8::from(f.alert)
            );
        }
    }
    header(
        out,
        "edge_agent_drift_window_rows",
        "gauge",
        "Rows observed in the last telemetry window (0: no data, no drift score).",
    );
    for v in versions {
        let _ = writeln!(
            out,
            "edge_agent_drift_window_rows{{model=\"{}\",release=\"{}\"}} {}",
            esc(&v.model),
            v.release,
            v.rows
        );
    }
}

/// The outbox, sync, feedback and health families.
fn render_telemetry(state: &AppState, out: &mut String) {
    if let Some(st) = state.telemetry.stats() {
        header(
            out,
            "edge_agent_outbox_records_total",
            "counter",
            "Records produced (stored in the outbox) and acknowledged by the fleet, per class.",
        );
        for c in Class::ALL {
            let cs = st.class(c);
            for (what, v) in [("produced", cs.produced), ("acknowledged", cs.acknowledged)] {
                let _ = writeln!(
                    out,
                    "edge_agent_outbox_records_total{{class=\"{}\",state=\"{what}\"}} {v}",
                    c.as_str()
                );
            }
        }
        header(
            out,
            "edge_agent_outbox_pending_records",
            "gauge",
            "Records in the outbox not yet acknowledged, per class.",
        );
        for c in Class::ALL {
            let _ = writeln!(
                out,
                "edge_agent_outbox_pending_records{{class=\"{}\"}} {}",
                c.as_str(),
                st.class(c).pending_records
            );
        }
        header(
            out,
            "edge_agent_outbox_dropped_total",
            "counter",
            "Records dropped without delivery, per class and reason (cap, ttl, io).",
        );
        for c in Class::ALL {
            for r in DropReason::ALL {
                let _ = writeln!(
                    out,
                    "edge_agent_outbox_dropped_total{{class=\"{}\",reason=\"{}\"}} {}",
                    c.as_str(),
                    r.as_str(),
                    st.class(c).dropped(r)
                );
            }
        }
        for (name, help, v) in [
            (
                "edge_agent_outbox_stored_bytes",
                "Bytes of pending records, as counted for the cap.",
                st.stored_bytes,
            ),
            (
                "edge_agent_outbox_max_bytes",
                "The outbox byte cap.",
                st.max_bytes,
            ),
            (
                "edge_agent_outbox_last_seq",
                "The last sequence number assigned.",
                st.last_seq,
            ),
            (
                "edge_agent_outbox_acked_through",
                "Every record up to this sequence number was acknowledged or dropped.",
                st.acked_through,
            ),
        ] {
            header(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        }
    }
    header(
        out,
        "edge_agent_outbox_unavailable_total",
        "counter",
        "Records dropped because the outbox could not be opened.",
    );
    let _ = writeln!(
        out,
        "edge_agent_outbox_unavailable_total {}",
        state.telemetry.unavailable.load(Ordering::Relaxed)
    );

    let s = &state.sync;
    header(
        out,
        "edge_agent_sync_connected",
        "gauge",
        "1 while connected to the fleet broker.",
    );
    let _ = writeln!(
        out,
        "edge_agent_sync_connected {}",
        s.connected.load(Ordering::Relaxed)
    );
    for (name, help, v) in [
        (
            "edge_agent_sync_published_records_total",
            "Records published to the fleet (replays included).",
            &s.published_records,
        ),
        (
            "edge_agent_sync_published_batches_total",
            "Batches published to the fleet (replays included).",
            &s.published_batches,
        ),
        (
            "edge_agent_sync_acks_total",
            "Acks received from the fleet.",
            &s.acks,
        ),
        (
            "edge_agent_sync_replays_total",
            "Rewinds to the last ack (reconnect or ack timeout).",
            &s.replays,
        ),
        (
            "edge_agent_sync_reconnects_total",
            "Fleet broker connection errors.",
            &s.reconnects,
        ),
    ] {
        header(out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
    }

    let summaries = state.feedback.summaries();
    if !summaries.is_empty() {
        header(
            out,
            "edge_agent_feedback_labelled_total",
            "counter",
            "Predictions that received their ground truth.",
        );
        for f in &summaries {
            let _ = writeln!(
                out,
                "edge_agent_feedback_labelled_total{{model=\"{}\",release=\"{}\"}} {}",
                esc(&f.model),
                f.release,
                f.labelled_total
            );
        }
        header(
            out,
            "edge_agent_feedback_metric",
            "gauge",
            "Live model quality from feedback, over the rolling window.",
        );
        for f in &summaries {
            for (metric, v) in [
                ("accuracy", f.window.accuracy),
                ("f1", f.window.f1),
                ("mae", f.window.mae),
                ("rmse", f.window.rmse),
            ] {
                if let Some(v) = v {
                    let _ = writeln!(
                        out,
                        "edge_agent_feedback_metric{{model=\"{}\",release=\"{}\",metric=\"{metric}\"}} {}",
                        esc(&f.model),
                        f.release,
                        fmt_f(v)
                    );
                }
            }
        }
        header(
            out,
            "edge_agent_concept_drift",
            "gauge",
            "1 while the recent error is significantly above the baseline.",
        );
        for f in &summaries {
            let _ = writeln!(
                out,
                "edge_agent_concept_drift{{model=\"{}\",release=\"{}\"}} {}",
                esc(&f.model),
                f.release,
                u8::from(f.drift.drifting)
            );
        }
    }

    let sample = state.health_sample.lock().ok().and_then(|s| s.clone());
    if let Some(h) = sample {
        for (name, help, v) in [
            (
                "edge_agent_cpu_system_percent",
                "CPU use of the whole machine (0-100).",
                h.cpu_system_pct,
            ),
            (
                "edge_agent_cpu_process_percent",
                "CPU use of the agent (100 = one core).",
                h.cpu_process_pct,
            ),
            (
                "edge_agent_memory_available_bytes",
                "Memory available on the machine.",
                Some(h.memory_available_bytes as f64),
            ),
            (
                "edge_agent_process_resident_memory_bytes",
                "Resident memory of the agent.",
                h.process_rss_bytes.map(|v| v as f64),
            ),
            (
                "edge_agent_disk_free_bytes",
                "Free space on the state directory's filesystem.",
                h.disk_free_bytes.map(|v| v as f64),
            ),
        ] {
            if let Some(v) = v {
                header(out, name, "gauge", help);
                let _ = writeln!(out, "{name} {}", fmt_f(v));
            }
        }
    }
}

/// The outbox and sync state as JSON (for `status --json` through the admin socket).
pub fn telemetry_json(state: &AppState) -> serde_json::Value {
    let outbox = state.telemetry.stats().map(|st| {
        let classes: serde_json::Map<String, serde_json::Value> = Class::ALL
            .iter()
            .map(|&c| {
                let cs = st.class(c);
                let dropped: serde_json::Map<String, serde_json::Value> = DropReason::ALL
                    .iter()
                    .map(|&r| (r.as_str().to_string(), cs.dropped(r).into()))
                    .collect();
                (
                    c.as_str().to_string(),
                    serde_json::json!({
                        "produced": cs.produced,
                        "acknowledged": cs.acknowledged,
                        "pending": cs.pending_records,
                        "pending_bytes": cs.pending_bytes,
                        "dropped": dropped,
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "classes": classes,
            "epoch": st.epoch,
            "last_seq": st.last_seq,
            "acked_through": st.acked_through,
            "stored_bytes": st.stored_bytes,
            "max_bytes": st.max_bytes,
            "size_on_disk": st.size_on_disk,
            "failed": st.failed,
        })
    });
    let s = &state.sync;
    serde_json::json!({
        "outbox": outbox,
        "outbox_error": state.telemetry.open_error,
        "sync": {
            "configured": state.config.sync.is_some(),
            "connected": s.connected.load(Ordering::Relaxed) == 1,
            "broker": s.current_broker(),
            "last_error": s.last_error(),
            "published_records": s.published_records.load(Ordering::Relaxed),
            "acks": s.acks.load(Ordering::Relaxed),
            "replays": s.replays.load(Ordering::Relaxed),
        },
        "feedback": state.feedback.summaries(),
        "health": state.health_sample.lock().ok().and_then(|s| s.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{FeatureDrift, PREDICTION_FEATURE};
    use shared::drift::DriftMetrics;

    fn sample_lines<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .collect()
    }

    #[test]
    fn drift_families_render_values_alerts_and_omit_undefined_metrics() {
        let versions = vec![VersionDrift {
            model: "pdm \"x\"\\y".into(),
            release: 7,
            rows: 250,
            features: vec![
                FeatureDrift {
                    feature: "torque".into(),
                    metrics: DriftMetrics {
                        psi: Some(3.25),
                        js: Some(0.5),
                        wasserstein: Some(120.0),
                        wasserstein_norm: Some(12.5),
                        ks_bound: Some(0.75),
                    },
                    alert: true,
                },
                FeatureDrift {
                    feature: "wear".into(),
                    metrics: DriftMetrics {
                        psi: Some(0.0125),
                        js: None,
                        wasserstein: Some(f64::NAN),
                        wasserstein_norm: None,
                        ks_bound: None,
                    },
                    alert: false,
                },
                FeatureDrift {
                    feature: PREDICTION_FEATURE.into(),
                    metrics: DriftMetrics::default(),
                    alert: false,
                },
            ],
        }];
        let mut out = String::new();
        render_drift(&mut out, &versions);
        let m = r#"model="pdm \"x\"\\y",release="7""#;
        assert_eq!(
            sample_lines(&out, "edge_agent_drift_score"),
            [
                format!(r#"edge_agent_drift_score{{{m},feature="torque",metric="psi"}} 3.25"#),
                format!(r#"edge_agent_drift_score{{{m},feature="torque",metric="js"}} 0.5"#),
                format!(
                    r#"edge_agent_drift_score{{{m},feature="torque",metric="wasserstein"}} 120"#
                ),
                format!(
                    r#"edge_agent_drift_score{{{m},feature="torque",metric="wasserstein_norm"}} 12.5"#
                ),
                format!(r#"edge_agent_drift_score{{{m},feature="torque",metric="ks_bound"}} 0.75"#),
                format!(r#"edge_agent_drift_score{{{m},feature="wear",metric="psi"}} 0.0125"#),
            ]
        );
        assert_eq!(
            sample_lines(&out, "edge_agent_drift_alert"),
            [
                format!(r#"edge_agent_drift_alert{{{m},feature="torque"}} 1"#),
                format!(r#"edge_agent_drift_alert{{{m},feature="wear"}} 0"#),
                format!(r#"edge_agent_drift_alert{{{m},feature="__prediction__"}} 0"#),
            ]
        );
        assert_eq!(
            sample_lines(&out, "edge_agent_drift_window_rows"),
            [format!("edge_agent_drift_window_rows{{{m}}} 250")]
        );
        assert!(!out.contains("NaN"), "{out}");
        for family in [
            "edge_agent_drift_score",
            "edge_agent_drift_alert",
            "edge_agent_drift_window_rows",
        ] {
            assert!(out.contains(&format!("# HELP {family} ")), "{out}");
            assert!(out.contains(&format!("# TYPE {family} gauge\n")), "{out}");
        }
    }

    #[test]
    fn no_drift_window_yet_renders_only_the_headers() {
        let mut out = String::new();
        render_drift(&mut out, &[]);
        assert_eq!(out.lines().count(), 6, "{out}");
        assert!(out.lines().all(|l| l.starts_with('#')), "{out}");
    }
}
