//! `/metrics`: the agent's state in the Prometheus text exposition format (typed metric
//! families, one place), valid for `promtool check metrics`.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::runtime::{Histogram, Loaded, LATENCY_BUCKETS_US};
use crate::service::AppState;

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
    out
}
