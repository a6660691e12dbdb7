//! Drift metrics of one histogram against a reference profile's bins: PSI, Jensen–Shannon
//! distance, binned Wasserstein-1 and the KS lower bound (definitions in the
//! [module documentation](super)).

use crate::bundle::FeatureProfile;

use super::summary::DriftMetrics;

/// The share that replaces an empty bin's share (0) in the PSI, on either side, unless that
/// side has a non-empty share at or below it, in which case the replacement is that smallest
/// non-empty share divided by 10⁶: Evidently's rule (`get_binned_data`, `feel_zeroes`).
/// Shares are not renormalised afterwards.
pub const PSI_EPSILON: f64 = 1e-4;

/// Evidently's replacement for the zero shares of one side.
fn zero_fill(shares: &[f64]) -> f64 {
    let smallest = shares
        .iter()
        .copied()
        .filter(|s| *s != 0.0)
        .fold(f64::INFINITY, f64::min);
    if smallest <= PSI_EPSILON {
        smallest / 1e6
    } else {
        PSI_EPSILON
    }
}

/// The drift metrics of `histogram` (counts per reference bin) against `reference`.
///
/// Every metric is `None` when the histogram is empty (no non-missing value), when the
/// reference has no bins, or when the histogram does not have one count per reference bin.
/// `wasserstein_norm` is also `None` when the reference `std` is 0 or not finite.
pub fn drift_metrics(reference: &FeatureProfile, histogram: &[u64]) -> DriftMetrics {
    let bins = reference.proportions.len();
    let total: u64 = histogram.iter().fold(0u64, |acc, &c| acc.saturating_add(c));
    let ref_total: f64 = reference.proportions.iter().sum();
    if bins == 0
        || histogram.len() != bins
        || total == 0
        || reference.bin_edges.len() != bins + 1
        || !(ref_total > 0.0 && ref_total.is_finite())
    {
        return DriftMetrics::default();
    }
    let n = total as f64;
    let a: Vec<f64> = histogram.iter().map(|&c| c as f64 / n).collect();
    let e = &reference.proportions;

    let (fill_a, fill_e) = (zero_fill(&a), zero_fill(e));
    let psi = a
        .iter()
        .zip(e)
        .map(|(&a, &e)| {
            let a = if a == 0.0 { fill_a } else { a };
            let e = if e == 0.0 { fill_e } else { e };
            (e - a) * (e / a).ln()
        })
        .sum::<f64>();

    // scipy normalises both vectors, then sqrt((KL(p‖m) + KL(q‖m)) / 2), natural log
    let a_sum: f64 = a.iter().sum();
    let mut kl = 0.0;
    for (&a, &e) in a.iter().zip(e) {
        let p = e / ref_total;
        let q = a / a_sum;
        let m = (p + q) / 2.0;
        kl += rel_entr(p, m) + rel_entr(q, m);
    }
    let js = (kl / 2.0).max(0.0).sqrt();

    // cumulative shares below each inner edge
    let edges = &reference.bin_edges;
    let (mut ca, mut ce) = (0.0, 0.0);
    let mut w1 = 0.0;
    let mut ks: f64 = 0.0;
    for i in 0..bins - 1 {
        ca += a[i] / a_sum;
        ce += e[i] / ref_total;
        let gap = (ca - ce).abs();
        ks = ks.max(gap);
        let mid = (edges[i] + edges[i + 1]) / 2.0;
        let next_mid = (edges[i + 1] + edges[i + 2]) / 2.0;
        w1 += gap * (next_mid - mid);
    }
    let wasserstein_norm =
        (reference.std > 0.0 && reference.std.is_finite()).then(|| w1 / reference.std);
    DriftMetrics {
        psi: Some(psi),
        js: Some(js),
        wasserstein: Some(w1),
        wasserstein_norm,
        ks_bound: Some(ks),
    }
}

/// scipy.special.rel_entr: `x·ln(x/y)` for positive `x`, `y`; 0 when `x` is 0.
fn rel_entr(x: f64, y: f64) -> f64 {
    if x > 0.0 && y > 0.0 {
        x * (x / y).ln()
    } else if x == 0.0 && y >= 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(edges: Vec<f64>, proportions: Vec<f64>, std: f64) -> FeatureProfile {
        FeatureProfile {
            name: "x".into(),
            count: 100,
            bin_edges: edges,
            proportions,
            mean: 0.0,
            std,
            missing_rate: 0.0,
        }
    }

    #[test]
    fn identical_distribution_has_zero_drift() {
        let r = reference(vec![0.0, 1.0, 2.0, 3.0], vec![0.25, 0.5, 0.25], 1.0);
        let m = drift_metrics(&r, &[10, 20, 10]);
        assert!(m.psi.unwrap().abs() < 1e-15);
        assert!(m.js.unwrap().abs() < 1e-7);
        assert!(m.wasserstein.unwrap().abs() < 1e-15);
        assert!(m.ks_bound.unwrap().abs() < 1e-15);
    }

    #[test]
    fn hand_computed_values() {
        // a = [0, 0, 1] against e = [0.5, 0.5, 0]: everything moved to the last bin
        let r = reference(vec![0.0, 1.0, 2.0, 4.0], vec![0.5, 0.5, 0.0], 2.0);
        let m = drift_metrics(&r, &[0, 0, 7]);
        let psi = 2.0 * (1e-4 - 0.5) * (1e-4f64 / 0.5).ln() + (1.0 - 1e-4) * (1.0f64 / 1e-4).ln();
        assert!((m.psi.unwrap() - psi).abs() < 1e-12, "{m:?}");
        // disjoint supports: JS distance = sqrt(ln 2)
        assert!((m.js.unwrap() - 2f64.ln().sqrt()).abs() < 1e-12);
        // mids 0.5, 1.5, 3: cdf gaps 0.5 over [0.5,1.5], 1.0 over [1.5,3]
        assert!((m.wasserstein.unwrap() - 2.0).abs() < 1e-12);
        assert!((m.wasserstein_norm.unwrap() - 1.0).abs() < 1e-12);
        assert!((m.ks_bound.unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn undefined_cases() {
        let r = reference(vec![0.0, 1.0, 2.0], vec![0.5, 0.5], 0.0);
        assert_eq!(drift_metrics(&r, &[0, 0]), DriftMetrics::default());
        assert_eq!(drift_metrics(&r, &[1, 2, 3]), DriftMetrics::default());
        let m = drift_metrics(&r, &[1, 1]);
        assert!(m.psi.is_some() && m.wasserstein_norm.is_none());
        let empty = reference(Vec::new(), Vec::new(), 0.0);
        assert_eq!(drift_metrics(&empty, &[5]), DriftMetrics::default());
        // a constant reference feature: one zero-width bin, no drift measurable
        let c = reference(vec![2.0, 2.0], vec![1.0], 0.0);
        let m = drift_metrics(&c, &[9]);
        assert_eq!(
            (m.psi, m.wasserstein, m.ks_bound),
            (Some(0.0), Some(0.0), Some(0.0))
        );
    }
}
