//! Drift math: the reference profile of a numeric feature (quantile bins, proportions,
//! moments, missing rate) that bundles carry and devices compare live data against.

use crate::bundle::FeatureProfile;

/// Default number of quantile bins per feature.
pub const DEFAULT_BINS: usize = 10;

/// Linear-interpolation quantile (numpy's default) of sorted, finite `values`.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    if n == 1 {
        return sorted[0];
    }
    let pos = q * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// The bin of `value` for ascending `edges` (`edges.len() - 1` bins): bin `i` holds
/// `[edges[i], edges[i+1])`, the last bin also its right edge; values below the first edge
/// fall in the first bin, above the last edge in the last bin.
pub fn bin_index(edges: &[f64], value: f64) -> usize {
    if edges.len() < 3 {
        return 0;
    }
    // the number of inner edges at or below the value
    edges[1..edges.len() - 1].partition_point(|e| *e <= value)
}

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
}
