//! On-device drift math against numpy/scipy (and Evidently) on the same data
//! (`fixtures/drift/drift.json`, made by `fixtures/drift/make_fixtures.py`): profiles,
//! window summaries and metrics, exact merging, alerting, differential privacy, and the
//! prediction reference of the bundle manifest.

use serde_json::Value;
use shared::bundle::manifest::{PredictionProfile, PredictionScore};
use shared::bundle::ReferenceProfile;
use shared::drift::{
    self, AlertConfig, AlertConfigError, AlertMetric, AlertTracker, DriftState, DriftSummary,
    FeatureAccumulator, MergeError, PrivacyConfig, PrivacyError, Privatizer,
};

struct Fixture {
    doc: Value,
    reference: ReferenceProfile,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/drift/drift.json"
    );
    let doc: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let reference: ReferenceProfile = serde_json::from_value(doc["reference"].clone()).unwrap();
    Fixture { doc, reference }
}

fn column(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN))
        .collect()
}

/// Rows (reference feature order) of a `{feature: [values]}` object.
fn rows(data: &Value, reference: &ReferenceProfile) -> Vec<Vec<f64>> {
    let cols: Vec<Vec<f64>> = reference
        .features
        .iter()
        .map(|f| column(&data[&f.name]))
        .collect();
    let n = cols[0].len();
    (0..n)
        .map(|r| cols.iter().map(|c| c[r]).collect())
        .collect()
}

fn current(f: &Fixture, name: &str) -> Value {
    f.doc["currents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

fn close(what: &str, got: Option<f64>, want: &Value, rel: f64) {
    match (got, want.as_f64()) {
        (None, None) => {}
        (Some(g), Some(w)) => {
            let tol = rel * w.abs().max(1e-3);
            assert!((g - w).abs() <= tol, "{what}: got {g}, scipy/numpy {w}");
        }
        (g, _) => panic!("{what}: got {g:?}, expected {want}"),
    }
}

fn observe_all(state: &mut DriftState, rows: &[Vec<f64>]) {
    for r in rows {
        state.observe_row(r).unwrap();
    }
}

#[test]
fn profile_matches_numpy() {
    let f = fixture();
    for want in &f.reference.features {
        let values = column(&f.doc["reference_data"][&want.name]);
        let got = drift::profile(&want.name, &values, 10);
        assert_eq!(got.count, want.count, "{}", want.name);
        // numpy's linear quantile, bit for bit
        assert_eq!(got.bin_edges, want.bin_edges, "{}", want.name);
        for (g, w) in got.proportions.iter().zip(&want.proportions) {
            assert!((g - w).abs() < 1e-15, "{}: {g} vs {w}", want.name);
        }
        assert!((got.mean - want.mean).abs() <= 1e-12 * want.mean.abs().max(1.0));
        assert!((got.std - want.std).abs() <= 1e-12 * want.std.abs().max(1.0));
        assert_eq!(got.missing_rate, want.missing_rate);
    }
}

#[test]
fn window_summaries_match_scipy() {
    let f = fixture();
    let mut checked = 0;
    for cur in f.doc["currents"].as_array().unwrap() {
        let mut state = DriftState::new(&f.reference);
        let rows = rows(&cur["data"], &f.reference);
        observe_all(&mut state, &rows);
        let s = state.summary(1_000, 61_000);
        assert_eq!(s.rows, cur["rows"].as_u64().unwrap());
        assert_eq!(s.reference_id, drift::reference_id(&f.reference));
        for fs in &s.features {
            let want = &cur["expected"][&fs.name];
            let ctx = format!("{} / {}", cur["name"], fs.name);
            assert_eq!(fs.count, want["count"].as_u64().unwrap(), "{ctx}");
            assert_eq!(fs.missing, want["missing"].as_u64().unwrap(), "{ctx}");
            let hist: Vec<u64> = want["histogram"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(fs.histogram, hist, "{ctx}");
            close(&format!("{ctx} mean"), fs.mean, &want["mean"], 1e-9);
            close(&format!("{ctx} std"), fs.std, &want["std"], 1e-9);
            close(&format!("{ctx} min"), fs.min, &want["min"], 0.0);
            close(&format!("{ctx} max"), fs.max, &want["max"], 0.0);
            let m = &fs.metrics;
            close(&format!("{ctx} psi"), m.psi, &want["psi"], 1e-9);
            close(&format!("{ctx} js"), m.js, &want["js"], 1e-9);
            close(
                &format!("{ctx} w1"),
                m.wasserstein,
                &want["wasserstein"],
                1e-9,
            );
            close(
                &format!("{ctx} w1 norm"),
                m.wasserstein_norm,
                &want["wasserstein_norm"],
                1e-9,
            );
            close(&format!("{ctx} ks"), m.ks_bound, &want["ks_bound"], 1e-9);
            if !want["psi_evidently"].is_null() {
                close(
                    &format!("{ctx} psi (evidently)"),
                    m.psi,
                    &want["psi_evidently"],
                    1e-9,
                );
                close(
                    &format!("{ctx} js (evidently)"),
                    m.js,
                    &want["js_evidently"],
                    1e-9,
                );
            }
            // the bound never exceeds the raw-data KS statistic
            if let (Some(b), Some(raw)) = (m.ks_bound, want["ks_raw"].as_f64()) {
                assert!(b <= raw + 1e-12, "{ctx}: ks bound {b} > ks_2samp {raw}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 6 * 5);
    // the cases the fixture is meant to exercise did happen
    let f2 = fixture();
    let mut state = DriftState::new(&f2.reference);
    observe_all(
        &mut state,
        &rows(&current(&f2, "shifted")["data"], &f2.reference),
    );
    let s = state.summary(0, 1);
    assert!(s.features[0].metrics.psi.unwrap() > 0.2);
    let mut state = DriftState::new(&f2.reference);
    observe_all(
        &mut state,
        &rows(&current(&f2, "empty")["data"], &f2.reference),
    );
    let s = state.summary(0, 1);
    assert_eq!(s.features[2].count, 0);
    assert_eq!(s.features[2].metrics.psi, None);
    assert_eq!(s.features[2].mean, None);
}

#[test]
fn merged_windows_equal_the_whole() {
    let f = fixture();
    let all = rows(&current(&f, "shifted")["data"], &f.reference);
    let mut whole = DriftState::new(&f.reference);
    observe_all(&mut whole, &all);
    let want = whole.summary(0, 3_000);

    // three uneven windows on two "devices", merged as summaries in a scrambled order
    let cuts = [(0usize, 137usize), (137, 700), (700, all.len())];
    let mut parts: Vec<DriftSummary> = Vec::new();
    let mut states: Vec<DriftState> = Vec::new();
    for (i, &(a, b)) in cuts.iter().enumerate() {
        let mut st = DriftState::new(&f.reference);
        observe_all(&mut st, &all[a..b]);
        parts.push(st.summary(i as u64 * 1_000, (i as u64 + 1) * 1_000));
        states.push(st);
    }
    // over the wire and back
    let parts: Vec<DriftSummary> = parts
        .iter()
        .map(|p| serde_json::from_str(&serde_json::to_string(p).unwrap()).unwrap())
        .collect();
    let mut merged = parts[2].clone();
    merged.merge(&parts[0], &f.reference).unwrap();
    merged.merge(&parts[1], &f.reference).unwrap();
    assert_eq!(merged.windows, 3);
    assert_eq!((merged.start_unix_ms, merged.end_unix_ms), (0, 3_000));
    assert_eq!(merged.rows, want.rows);
    for (m, w) in merged.features.iter().zip(&want.features) {
        assert_eq!(m.count, w.count);
        assert_eq!(m.missing, w.missing);
        assert_eq!(m.histogram, w.histogram);
        assert_eq!((m.min, m.max), (w.min, w.max));
        // metrics come from the merged histogram: identical
        assert_eq!(m.metrics, w.metrics, "{}", m.name);
        let rel = |a: Option<f64>, b: Option<f64>| {
            let (a, b) = (a.unwrap(), b.unwrap());
            (a - b).abs() / b.abs().max(1e-300)
        };
        assert!(
            rel(m.mean, w.mean) < 1e-12 || m.mean == w.mean,
            "{}",
            m.name
        );
        if w.std.unwrap() > 0.0 {
            assert!(rel(m.std, w.std) < 1e-12, "{} std", m.name);
        } else {
            assert_eq!(m.std, Some(0.0));
        }
    }

    // accumulators merge the same way
    let mut acc = states.pop().unwrap();
    for st in &states {
        assert!(acc.merge(st));
    }
    let from_acc = acc.summary(0, 3_000);
    for (m, w) in from_acc.features.iter().zip(&want.features) {
        assert_eq!(m.histogram, w.histogram);
        assert_eq!(m.metrics, w.metrics);
        assert!((m.mean.unwrap() - w.mean.unwrap()).abs() <= 1e-12 * w.mean.unwrap().abs());
    }

    // a summary of another reference does not merge, and nothing changes
    let mut other_ref = f.reference.clone();
    other_ref.features[0].bin_edges[1] += 0.5;
    let mut foreign = DriftState::new(&other_ref);
    observe_all(&mut foreign, &all[..10]);
    let before = merged.clone();
    let err = merged
        .merge(&foreign.summary(0, 1), &f.reference)
        .unwrap_err();
    assert!(matches!(err, MergeError::Reference { .. }), "{err}");
    assert_eq!(merged, before);
    assert!(!acc.merge(&foreign));
    let mut short = parts[0].clone();
    short.features.pop();
    assert!(matches!(
        merged.merge(&short, &f.reference),
        Err(MergeError::FeatureCount {
            expected: 5,
            found: 4
        })
    ));
}

#[test]
fn accumulator_basics() {
    let mut a = FeatureAccumulator::new(&[0.0, 1.0, 2.0, 3.0]);
    for v in [-5.0, 0.0, 1.0, 2.5, 3.0, 99.0, f64::NAN, f64::INFINITY] {
        a.observe(v);
    }
    assert_eq!(a.histogram(), &[2, 1, 3]);
    assert_eq!((a.count(), a.missing()), (6, 2));
    assert_eq!(a.min_max(), Some((-5.0, 99.0)));
    let values = [-5.0, 0.0, 1.0, 2.5, 3.0, 99.0];
    let mean = values.iter().sum::<f64>() / 6.0;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 6.0;
    assert!((a.mean().unwrap() - mean).abs() < 1e-12);
    assert!((a.std().unwrap() - var.sqrt()).abs() < 1e-12);
    // Welford stays accurate with a large offset where naive sums of squares fail
    let mut b = FeatureAccumulator::new(&[]);
    for i in 0..1000 {
        b.observe(1e9 + f64::from(i % 2));
    }
    assert!((b.std().unwrap() - 0.5).abs() < 1e-9, "{:?}", b.std());
    assert!(!b.merge(&a));
    a.reset();
    assert_eq!((a.count(), a.missing(), a.mean()), (0, 0, None));
    assert_eq!(a.histogram(), &[0, 0, 0]);

    let f = fixture();
    let mut st = DriftState::new(&f.reference);
    let err = st.observe_row(&[1.0, 2.0]).unwrap_err();
    assert_eq!((err.expected, err.found), (5, 2));
    assert_eq!(st.rows(), 0);
    assert_eq!(
        st.feature_names().collect::<Vec<_>>(),
        ["normal", "skewed", "sparse", "constant", "discrete"]
    );
}

fn window(f: &Fixture, name: &str) -> DriftSummary {
    let mut st = DriftState::new(&f.reference);
    observe_all(&mut st, &rows(&current(f, name)["data"], &f.reference));
    st.summary(0, 60_000)
}

#[test]
fn alert_after_k_windows_and_clear() {
    let f = fixture();
    let cfg: AlertConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg, AlertConfig::default());
    assert_eq!(
        (cfg.metric, cfg.threshold, cfg.windows),
        (AlertMetric::Psi, 0.2, 3)
    );
    let mut t = AlertTracker::new(cfg);
    // "shifted": normal psi 0.209 > 0.2, skewed 0.173 < 0.2
    for k in 1..=3 {
        let mut s = window(&f, "shifted");
        let changes = t.update(&mut s);
        let normal = &s.features[0];
        assert_eq!(normal.alert, k == 3, "window {k}");
        assert!(!s.features[1].alert);
        if k == 3 {
            assert!(changes
                .iter()
                .any(|c| c.feature == "normal" && c.raised && !c.prediction));
        } else {
            assert!(changes.is_empty());
        }
    }
    assert!(t.is_raised("normal") && !t.is_raised("skewed"));
    // a window with no data for "sparse" leaves its state alone; a calm window clears
    let mut s = window(&f, "same");
    let changes = t.update(&mut s);
    assert!(!s.features[0].alert);
    assert!(changes.iter().any(|c| c.feature == "normal" && !c.raised));
    assert!(!t.is_raised("normal"));

    let ks: AlertConfig =
        serde_json::from_str(r#"{"metric":"ks","threshold":0.5,"windows":1}"#).unwrap();
    let mut t = AlertTracker::new(ks);
    let mut s = window(&f, "shifted");
    t.update(&mut s);
    // discrete ks bound 0.5655 > 0.5
    assert!(s.features[4].alert && !s.features[0].alert);
    assert!(serde_json::from_str::<AlertConfig>(r#"{"metric":"kl"}"#).is_err());
    let bad = AlertConfig {
        threshold: f64::NAN,
        ..AlertConfig::default()
    };
    assert!(matches!(
        bad.validate(),
        Err(AlertConfigError::Threshold(_))
    ));
    let bad = AlertConfig {
        windows: 0,
        ..AlertConfig::default()
    };
    assert_eq!(bad.validate(), Err(AlertConfigError::Windows));
}

#[test]
fn laplace_noise_has_the_configured_scale() {
    let f = fixture();
    // a window with large counts (no clamping at 0): the reference rows 20 times
    let rows = rows(&f.doc["reference_data"], &f.reference);
    let mut st = DriftState::new(&f.reference);
    for _ in 0..20 {
        observe_all(&mut st, &rows);
    }
    let exact = st.summary(0, 1);
    let cfg = PrivacyConfig {
        epsilon: Some(0.1),
        min_count: 0,
    };
    let mut p = Privatizer::seeded(cfg.clone(), 7).unwrap();
    let mut noise = Vec::new();
    for _ in 0..1000 {
        let mut s = exact.clone();
        p.apply(&mut s, &f.reference).unwrap();
        assert_eq!(s.privacy.as_ref(), Some(&cfg));
        for (n, e) in s.features.iter().zip(&exact.features) {
            assert_eq!(n.count, e.count, "count is not noised");
            for (a, b) in n.histogram.iter().zip(&e.histogram) {
                noise.push(*a as f64 - *b as f64);
            }
        }
    }
    // 1000 windows x 25 bins; Laplace(b = 10): E|X| = b, Var X = 2 b^2 (+1/12 rounding)
    let n = noise.len() as f64;
    let mean = noise.iter().sum::<f64>() / n;
    let mad = noise.iter().map(|x| x.abs()).sum::<f64>() / n;
    let var = noise.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    assert!(mean.abs() < 0.3, "mean {mean}");
    assert!((mad - 10.0).abs() < 0.3, "mean |noise| {mad}");
    assert!((var / 200.0 - 1.0).abs() < 0.06, "variance {var}");

    // seedable: the same seed gives the same noise, another seed other noise
    let once = |seed| {
        let mut s = exact.clone();
        Privatizer::seeded(cfg.clone(), seed)
            .unwrap()
            .apply(&mut s, &f.reference)
            .unwrap();
        s
    };
    assert_eq!(once(1), once(1));
    assert_ne!(once(1), once(2));
    // the OS-seeded privatizer works too
    let mut s = exact.clone();
    Privatizer::new(cfg.clone())
        .unwrap()
        .apply(&mut s, &f.reference)
        .unwrap();
    // twice is refused
    let mut again = once(3);
    assert!(matches!(
        Privatizer::seeded(cfg.clone(), 3)
            .unwrap()
            .apply(&mut again, &f.reference),
        Err(PrivacyError::AlreadyApplied)
    ));
    for e in [0.0, -1.0, f64::INFINITY, f64::NAN] {
        let bad = PrivacyConfig {
            epsilon: Some(e),
            min_count: 0,
        };
        assert!(matches!(
            Privatizer::seeded(bad, 1),
            Err(PrivacyError::Epsilon(_))
        ));
    }
    // summaries with different privacy do not merge
    let mut plain = exact.clone();
    assert!(matches!(
        plain.merge(&once(4), &f.reference),
        Err(MergeError::Privacy { .. })
    ));
}

#[test]
fn small_bins_are_suppressed_and_counted() {
    let f = fixture();
    let exact = window(&f, "shifted");
    let cfg = PrivacyConfig {
        epsilon: None,
        min_count: 60,
    };
    let mut s = exact.clone();
    Privatizer::seeded(cfg, 1)
        .unwrap()
        .apply(&mut s, &f.reference)
        .unwrap();
    let mut any = false;
    for (p, e) in s.features.iter().zip(&exact.features) {
        let small: Vec<u32> = e
            .histogram
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0 && **c < 60)
            .map(|(i, _)| i as u32)
            .collect();
        any |= !small.is_empty();
        assert_eq!(p.suppressed_bins, small, "{}", p.name);
        let kept: u64 = p.histogram.iter().sum();
        assert_eq!(kept + p.suppressed, e.histogram.iter().sum::<u64>());
        for &i in &small {
            assert_eq!(p.histogram[i as usize], 0);
        }
    }
    // the metrics are those of the published histogram
    for (p, r) in s.features.iter().zip(&f.reference.features) {
        assert_eq!(
            p.metrics,
            drift::drift_metrics(r, &p.histogram),
            "{}",
            p.name
        );
    }
    assert_ne!(s.features[0].metrics, exact.features[0].metrics);
    assert!(any, "the fixture has small bins to suppress");
    // suppressed totals add on merge and the bin lists are unioned
    let mut twice = s.clone();
    twice.merge(&s, &f.reference).unwrap();
    for (t, p) in twice.features.iter().zip(&s.features) {
        assert_eq!(t.suppressed, 2 * p.suppressed);
        assert_eq!(t.suppressed_bins, p.suppressed_bins);
    }
}

#[test]
fn prediction_reference_and_summary() {
    let f = fixture();
    let scores: Vec<f64> = (0..1000).map(|i| f64::from(i) / 1000.0).collect();
    let mut reference = f.reference.clone();
    reference.predictions = Some(PredictionProfile {
        output: "probabilities".into(),
        score: PredictionScore::ClassProbability,
        class: Some("1".into()),
        profile: drift::profile("prediction", &scores, 10),
    });
    // the manifest field is optional: absent in JSON when None, and old JSON still parses
    let old = serde_json::to_value(&f.reference).unwrap();
    assert!(old.get("predictions").is_none());
    let new = serde_json::to_value(&reference).unwrap();
    assert_eq!(new["predictions"]["score"], "class_probability");
    let back: ReferenceProfile = serde_json::from_value(new).unwrap();
    assert_eq!(back, reference);
    assert_ne!(
        drift::reference_id(&reference),
        drift::reference_id(&f.reference)
    );

    let mut st = DriftState::new(&reference);
    for s in &scores {
        st.observe_prediction(s + 0.5);
    }
    st.observe_prediction(f64::NAN);
    let s = st.take_summary(0, 1);
    let p = s.predictions.as_ref().unwrap();
    assert_eq!((p.count, p.missing), (1000, 1));
    assert_eq!(p.histogram[9], 600);
    assert!(p.metrics.psi.unwrap() > 1.0 && p.metrics.ks_bound.unwrap() > 0.45);
    assert_eq!(st.predictions().unwrap().count(), 0, "take_summary resets");
    // a prediction summary does not merge under a reference without predictions
    let mut s2 = s.clone();
    assert!(s2.merge(&s, &f.reference).is_err());
    s2.merge(&s, &reference).unwrap();
    assert_eq!(s2.predictions.as_ref().unwrap().count, 2000);

    // the alert tracks the prediction separately from a feature of the same name
    let cfg = AlertConfig {
        windows: 1,
        ..AlertConfig::default()
    };
    let mut t = AlertTracker::new(cfg);
    let mut s3 = s.clone();
    let changes = t.update(&mut s3);
    assert!(s3.predictions.as_ref().unwrap().alert);
    assert!(changes.iter().any(|c| c.prediction && c.raised));
    assert!(t.prediction_raised());
    assert!(!t.is_raised("prediction"));
}
