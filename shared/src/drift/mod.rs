//! Drift math: the reference profile of a numeric feature (quantile bins, proportions,
//! moments, missing rate) that bundles carry, and the on-device side that compares live data
//! against it: a per-window accumulator per feature ([`FeatureAccumulator`], [`DriftState`]),
//! the window summary wire type ([`DriftSummary`]) with its drift metrics, exact merging
//! across windows and devices, K-consecutive-window alerting ([`AlertTracker`]) and optional
//! differential privacy on the histograms ([`Privatizer`]).
//!
//! **Binning.** A window counts each non-missing value in the reference bin that holds it
//! ([`bin_index`]: bin *i* is `[edges[i], edges[i+1])`, the last bin also holds its right
//! edge, values below the first edge count in the first bin and above the last edge in the
//! last). NaN and ±infinity are missing (as in [`profile`]); they count in `missing` only.
//!
//! **Metrics** (all over non-missing values only; `a` = the window's bin shares
//! `count_i / Σ count`, `e` = the reference `proportions`):
//! - `psi`: population stability index `Σ (e_i − a_i)·ln(e_i / a_i)`. A share that is exactly
//!   0 is replaced, on its side, by `1e-4` ([`PSI_EPSILON`]), or by that side's smallest
//!   non-zero share / 10⁶ when that share is itself <= `1e-4`; no renormalisation. This is
//!   Evidently's rule (`evidently` 0.7 `get_binned_data(..., feel_zeroes=True)` + `_psi`),
//!   applied to the bundle's reference bins. Unitless.
//! - `js`: Jensen–Shannon *distance* (the square root of the divergence), natural log, as
//!   `scipy.spatial.distance.jensenshannon(e, a)` with the default `base=None`: in
//!   `[0, √ln 2 ≈ 0.8326]`.
//! - `wasserstein`: Wasserstein-1 between the two histograms with each bin's mass placed at
//!   the bin's midpoint `(edges[i] + edges[i+1]) / 2`, i.e.
//!   `scipy.stats.wasserstein_distance(mid, mid, a, e)` = `Σ_i |A_i − E_i|·(mid_{i+1} − mid_i)`
//!   with `A`, `E` the cumulative shares. In feature units. The outer bins are closed at the
//!   reference minimum and maximum: values beyond them count at the outer midpoints, so how
//!   far they lie outside the reference range shows in `min`/`max`/`mean`, not here.
//!   `wasserstein_norm` is that divided by the reference `std` (absent when it is 0), the
//!   scale Evidently uses for its Wasserstein test.
//! - `ks_bound`: `max_i |A_{i−1} − E_{i−1}|` over the inner edges `edges[1..B]`, where
//!   `A_{i−1}` is the window's share of values `< edges[i]` and `E_{i−1}` the reference's.
//!   Both are the exact left-limit empirical CDFs at those points, so this is a **lower
//!   bound** of the two-sample Kolmogorov–Smirnov statistic `sup_x |F_window(x) − F_ref(x)|`
//!   of the raw window against the raw reference sample the profile was built from
//!   (`scipy.stats.ks_2samp(window, reference).statistic >= ks_bound`). 0 for one bin.
//!
//! A metric is absent (`null`) when the window has no non-missing value, or the reference has
//! no bins (a feature that was always missing). A feature that was constant in the reference
//! has one zero-width bin, so its histogram metrics are always 0: a change shows in `mean`,
//! `std`, `min`, `max` only.
//!
//! **Merge semantics.** Accumulators ([`FeatureAccumulator::merge`], [`DriftState::merge`])
//! and summaries ([`DriftSummary::merge`]) of the same reference (same [`reference_id`])
//! merge into the summary of the union of their rows: counts, missing counts and histogram
//! counts add, `min`/`max` take the min/max, mean and variance combine with Chan et al.'s
//! pairwise formulas (exact up to floating-point rounding, ~1e-15 relative; a summary carries
//! the population `std`, from which `M2 = std²·count` is rebuilt), and the metrics are
//! recomputed from the merged histogram, never averaged. Merging is associative and
//! commutative, so windows may be merged across time and devices in any order.
//!
//! **Privacy.** With [`PrivacyConfig`], a window's histogram counts get Laplace noise
//! (scale `1/epsilon`, sensitivity 1 per row per feature) and small bins are suppressed
//! before the summary leaves the device; see [`privacy`] for exactly what is and is not
//! protected.

#![warn(missing_docs)]

mod accumulator;
pub mod alert;
pub mod metrics;
pub mod privacy;
mod summary;

pub use accumulator::{DriftState, FeatureAccumulator, RowLengthError};
pub use alert::{AlertChange, AlertConfig, AlertConfigError, AlertMetric, AlertTracker};
pub use metrics::{drift_metrics, PSI_EPSILON};
pub use privacy::{PrivacyConfig, PrivacyError, Privatizer};
pub use summary::{
    reference_id, DriftMetrics, DriftSummary, FeatureSummary, MergeError, DRIFT_SUMMARY_VERSION,
};

use crate::bundle::FeatureProfile;

/// Default number of quantile bins per feature.
pub const DEFAULT_BINS: usize = 10;

/// Linear-interpolation quantile (numpy's default `method="linear"`) of sorted, finite
/// `values`, bit for bit: index `q·(n−1)`, then numpy's `_lerp` (`a + (b−a)·t`, or
/// `b − (b−a)·(1−t)` when `t >= 0.5`).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    if n == 1 {
        return sorted[0];
    }
    let pos = (n - 1) as f64 * q;
    if pos >= (n - 1) as f64 {
        return sorted[n - 1];
    }
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    let t = pos - lo as f64;
    let (a, b) = (sorted[lo], sorted[hi]);
    let d = b - a;
    if t >= 0.5 {
        b - d * (1.0 - t)
    } else {
        a + d * t
    }
}

/// The bin of `value` for ascending `edges` (`edges.len() - 1` bins): bin `i` holds
/// `[edges[i], edges[i+1])`, the last bin also its right edge; values below the first edge
/// fall in the first bin, above the last edge in the last bin.
pub fn bin_index(edges: &[f64], value: f64) -> usize {
    if edges.len() < 3 {
        return 0;
    }
    // the number of inner edges at or below the value: a branch-free count for the usual
    // handful of edges (no mispredictions on noisy data), a binary search beyond
    let inner = &edges[1..edges.len() - 1];
    if inner.len() <= LINEAR_EDGES {
        inner.iter().map(|e| usize::from(*e <= value)).sum()
    } else {
        inner.partition_point(|e| *e <= value)
    }
}

/// Up to this many inner edges, [`bin_index`] counts instead of bisecting.
const LINEAR_EDGES: usize = 16;

/// Profiles one feature. `values` holds one entry per row, NaN for a missing value.
/// Edges are the `bins`-quantiles of the non-missing values with duplicates removed, so a
/// feature with few distinct values gets fewer bins.
pub fn profile(name: &str, values: &[f64], bins: usize) -> FeatureProfile {
    let mut present: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let rows = values.len();
    let missing = rows - present.len();
    let missing_rate = if rows == 0 {
        0.0
    } else {
        missing as f64 / rows as f64
    };
    if present.is_empty() {
        return FeatureProfile {
            name: name.to_string(),
            count: 0,
            bin_edges: Vec::new(),
            proportions: Vec::new(),
            mean: 0.0,
            std: 0.0,
            missing_rate,
        };
    }
    present.sort_by(f64::total_cmp);
    let bins = bins.max(1);
    let mut edges: Vec<f64> = (0..=bins)
        .map(|k| quantile(&present, k as f64 / bins as f64))
        .collect();
    edges.dedup();
    if edges.len() == 1 {
        // a constant feature: one bin of zero width
        edges.push(edges[0]);
    }
    let mut counts = vec![0u64; edges.len() - 1];
    for &v in &present {
        counts[bin_index(&edges, v)] += 1;
    }
    let n = present.len() as f64;
    let mean = present.iter().sum::<f64>() / n;
    let var = present.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    FeatureProfile {
        name: name.to_string(),
        count: present.len() as u64,
        bin_edges: edges,
        proportions: counts.iter().map(|&c| c as f64 / n).collect(),
        mean,
        std: var.sqrt(),
        missing_rate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deciles_of_uniform_values() {
        let values: Vec<f64> = (0..1000).map(f64::from).collect();
        let p = profile("x", &values, 10);
        assert_eq!(p.bin_edges.len(), 11);
        assert_eq!(p.bin_edges[0], 0.0);
        assert_eq!(p.bin_edges[10], 999.0);
        assert!((p.bin_edges[5] - 499.5).abs() < 1e-12);
        for share in &p.proportions {
            assert!((share - 0.1).abs() < 1e-12, "{:?}", p.proportions);
        }
        assert!((p.mean - 499.5).abs() < 1e-9);
        // population std of 0..999
        assert!((p.std - 288.674_990_6).abs() < 1e-6, "{}", p.std);
        assert_eq!(p.missing_rate, 0.0);
    }

    #[test]
    fn missing_constant_and_discrete_features() {
        let p = profile("m", &[1.0, f64::NAN, 3.0, f64::NAN], 4);
        assert_eq!(p.missing_rate, 0.5);
        assert_eq!(p.count, 2);
        let sum: f64 = p.proportions.iter().sum();
        assert!((sum - 1.0).abs() < 1e-12);
        let c = profile("c", &[2.0; 10], 10);
        assert_eq!(c.bin_edges, vec![2.0, 2.0]);
        assert_eq!(c.proportions, vec![1.0]);
        let d = profile("d", &[0.0, 0.0, 0.0, 1.0, 1.0, 2.0], 10);
        assert!(
            d.bin_edges.windows(2).all(|w| w[0] < w[1]),
            "{:?}",
            d.bin_edges
        );
        let sum: f64 = d.proportions.iter().sum();
        assert!((sum - 1.0).abs() < 1e-12);
        let e = profile("e", &[f64::NAN], 10);
        assert_eq!((e.count, e.missing_rate), (0, 1.0));
    }

    #[test]
    fn bin_index_edges() {
        let edges = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(bin_index(&edges, -5.0), 0);
        assert_eq!(bin_index(&edges, 0.0), 0);
        assert_eq!(bin_index(&edges, 1.0), 1);
        assert_eq!(bin_index(&edges, 2.5), 2);
        assert_eq!(bin_index(&edges, 3.0), 2);
        assert_eq!(bin_index(&edges, 99.0), 2);
        assert_eq!(bin_index(&[2.0, 2.0], 2.0), 0);
        assert_eq!(bin_index(&[], 2.0), 0);
    }

    #[test]
    fn bin_index_count_equals_bisection() {
        // few edges take the counting path, many the binary search: same answers
        for inner in [5usize, 16, 17, 40] {
            let edges: Vec<f64> = (0..inner + 2).map(|i| (i * i) as f64 / 7.0).collect();
            let last = *edges.last().unwrap();
            let mut x = -3.0;
            while x < last + 3.0 {
                let want = edges[1..edges.len() - 1].partition_point(|e| *e <= x);
                assert_eq!(bin_index(&edges, x), want, "{inner} inner edges, x = {x}");
                x += 0.0625;
            }
            for e in &edges {
                let want = edges[1..edges.len() - 1].partition_point(|v| v <= e);
                assert_eq!(bin_index(&edges, *e), want);
            }
        }
    }
}
