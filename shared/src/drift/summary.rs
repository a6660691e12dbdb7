//! The drift summary of a window (wire type, version [`DRIFT_SUMMARY_VERSION`]) and its exact
//! merge across windows and devices.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::{FeatureProfile, ReferenceProfile};

use super::metrics::drift_metrics;
use super::privacy::PrivacyConfig;

/// Wire version of [`DriftSummary`].
pub const DRIFT_SUMMARY_VERSION: u32 = 1;

/// The drift of one window (or of several merged windows) against a bundle's reference
/// profile. JSON; unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftSummary {
    /// [`DRIFT_SUMMARY_VERSION`].
    pub version: u32,
    /// The reference the histograms are binned against: [`reference_id`] of the bundle's
    /// reference profile (16 lowercase hex digits). Only summaries with equal ids merge.
    pub reference_id: String,
    /// Start of the (first merged) window, Unix milliseconds, inclusive.
    pub start_unix_ms: u64,
    /// End of the (last merged) window, Unix milliseconds, exclusive.
    pub end_unix_ms: u64,
    /// Number of windows merged into this summary (1 for one window).
    pub windows: u64,
    /// Rows observed (each row counts once whatever its missing values).
    pub rows: u64,
    /// One entry per reference feature, in the reference's order.
    pub features: Vec<FeatureSummary>,
    /// The prediction distribution, when the reference has a prediction profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictions: Option<FeatureSummary>,
    /// The differential-privacy treatment the histograms got (absent: exact counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyConfig>,
}

/// One feature (or the prediction) over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSummary {
    /// The feature name (the reference profile's `name`).
    pub name: String,
    /// Non-missing values observed (exact, also under differential privacy).
    pub count: u64,
    /// Missing values observed (NaN, ±infinity, null).
    pub missing: u64,
    /// Mean of the non-missing values, in feature units; absent when `count` is 0.
    pub mean: Option<f64>,
    /// Population standard deviation of the non-missing values, in feature units; absent
    /// when `count` is 0.
    pub std: Option<f64>,
    /// Smallest non-missing value; absent when `count` is 0.
    pub min: Option<f64>,
    /// Largest non-missing value; absent when `count` is 0.
    pub max: Option<f64>,
    /// Values per reference bin (one count per reference proportion). Exact, or noisy and
    /// rounded under differential privacy (suppressed bins then hold 0).
    pub histogram: Vec<u64>,
    /// Total of the suppressed bins' (noisy) counts, left out of `histogram` and of the
    /// metrics.
    #[serde(default)]
    pub suppressed: u64,
    /// Indexes of the bins suppressed in at least one merged window, ascending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suppressed_bins: Vec<u32>,
    /// Drift metrics of `histogram` against the reference proportions.
    pub metrics: DriftMetrics,
    /// Set by [`AlertTracker`](super::AlertTracker): the configured metric has been above
    /// its threshold for the configured number of consecutive windows. A merged summary
    /// carries the OR of its parts.
    #[serde(default)]
    pub alert: bool,
}

/// Drift metrics of a histogram against the reference (definitions in the
/// [module documentation](super)); each is absent when undefined.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftMetrics {
    /// Population stability index, unitless, zero shares floored at
    /// [`PSI_EPSILON`](super::PSI_EPSILON).
    pub psi: Option<f64>,
    /// Jensen–Shannon distance, natural log (`0..=√ln 2`).
    pub js: Option<f64>,
    /// Wasserstein-1 between the histograms with mass at bin midpoints, feature units.
    pub wasserstein: Option<f64>,
    /// `wasserstein` divided by the reference standard deviation, unitless.
    pub wasserstein_norm: Option<f64>,
    /// Largest CDF gap at the inner reference edges: a lower bound of the KS statistic.
    pub ks_bound: Option<f64>,
}

/// Why two summaries do not merge.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MergeError {
    /// The summary has another wire version.
    #[error("summary version {found} (this build reads version {DRIFT_SUMMARY_VERSION})")]
    Version {
        /// The summary's version.
        found: u32,
    },
    /// The summary was binned against another reference.
    #[error("reference_id {found:?} differs from {expected:?}: binned against another reference")]
    Reference {
        /// The reference's id.
        expected: String,
        /// The summary's id.
        found: String,
    },
    /// A feature is not the reference's feature at that position.
    #[error("feature {index}: {found:?} where the reference has {expected:?}")]
    Feature {
        /// Position in `features`.
        index: usize,
        /// The reference's name.
        expected: String,
        /// The summary's name.
        found: String,
    },
    /// The summary has another number of features.
    #[error("{found} features where the reference has {expected}")]
    FeatureCount {
        /// Features in the reference.
        expected: usize,
        /// Features in the summary.
        found: usize,
    },
    /// A histogram has another number of bins.
    #[error("feature {name:?}: {found} histogram bins where the reference has {expected}")]
    Bins {
        /// The feature.
        name: String,
        /// Bins in the reference.
        expected: usize,
        /// Bins in the summary.
        found: usize,
    },
    /// One side has a prediction summary or profile and the other not.
    #[error("predictions: present in one summary or reference and absent in the other")]
    Predictions,
    /// The two summaries got different privacy treatments.
    #[error("privacy settings differ ({expected:?} vs {found:?})")]
    Privacy {
        /// The receiving summary's settings.
        expected: Option<PrivacyConfig>,
        /// The merged summary's settings.
        found: Option<PrivacyConfig>,
    },
}

/// The fingerprint a summary names its reference by: the first 16 lowercase hex digits of
/// the SHA-256 of the reference profile's compact JSON (`serde_json::to_vec`).
pub fn reference_id(reference: &ReferenceProfile) -> String {
    let bytes = serde_json::to_vec(reference).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl FeatureSummary {
    /// A summary from raw parts: moments as `(count, mean, m2)` with `m2` the sum of squared
    /// deviations from the mean; metrics computed against `reference`.
    pub(crate) fn from_parts(
        reference: &FeatureProfile,
        moments: (u64, f64, f64),
        missing: u64,
        min_max: (f64, f64),
        histogram: Vec<u64>,
    ) -> FeatureSummary {
        let (count, mean, m2) = moments;
        let some = |v: f64| (count > 0).then_some(v);
        let metrics = drift_metrics(reference, &histogram);
        FeatureSummary {
            name: reference.name.clone(),
            count,
            missing,
            mean: some(mean),
            std: some((m2.max(0.0) / count.max(1) as f64).sqrt()),
            min: some(min_max.0),
            max: some(min_max.1),
            histogram,
            suppressed: 0,
            suppressed_bins: Vec::new(),
            metrics,
            alert: false,
        }
    }

    /// Recomputes the metrics from the histogram against `reference`.
    pub fn recompute(&mut self, reference: &FeatureProfile) {
        self.metrics = drift_metrics(reference, &self.histogram);
    }

    /// Merges `other` (same feature, same bins) into `self` and recomputes the metrics.
    fn merge(&mut self, other: &FeatureSummary, reference: &FeatureProfile) {
        let (na, nb) = (self.count, other.count);
        let n = na + nb;
        if nb > 0 {
            let ma = self.mean.unwrap_or(0.0);
            let mb = other.mean.unwrap_or(0.0);
            let sa = self.std.unwrap_or(0.0);
            let sb = other.std.unwrap_or(0.0);
            let (mean, m2) = chan((na, ma, sa * sa * na as f64), (nb, mb, sb * sb * nb as f64));
            self.mean = Some(mean);
            self.std = Some((m2.max(0.0) / n as f64).sqrt());
            self.min = min_opt(self.min, other.min, f64::min);
            self.max = min_opt(self.max, other.max, f64::max);
        }
        self.count = n;
        self.missing += other.missing;
        for (a, b) in self.histogram.iter_mut().zip(&other.histogram) {
            *a = a.saturating_add(*b);
        }
        self.suppressed = self.suppressed.saturating_add(other.suppressed);
        self.suppressed_bins.extend(&other.suppressed_bins);
        self.suppressed_bins.sort_unstable();
        self.suppressed_bins.dedup();
        self.alert |= other.alert;
        self.recompute(reference);
    }
}

fn min_opt(a: Option<f64>, b: Option<f64>, pick: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(pick(x, y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Chan et al.'s pairwise combination of `(count, mean, m2)`: the mean and `m2` of the union.
pub(crate) fn chan(a: (u64, f64, f64), b: (u64, f64, f64)) -> (f64, f64) {
    let (na, ma, m2a) = a;
    let (nb, mb, m2b) = b;
    if na == 0 {
        return (mb, m2b);
    }
    if nb == 0 {
        return (ma, m2a);
    }
    let (fa, fb) = (na as f64, nb as f64);
    let n = fa + fb;
    let delta = mb - ma;
    let mean = ma + delta * (fb / n);
    let m2 = m2a + m2b + delta * delta * (fa * fb / n);
    (mean, m2)
}

fn check_feature(
    index: usize,
    s: &FeatureSummary,
    reference: &FeatureProfile,
) -> Result<(), MergeError> {
    if s.name != reference.name {
        return Err(MergeError::Feature {
            index,
            expected: reference.name.clone(),
            found: s.name.clone(),
        });
    }
    let bins = reference.proportions.len().max(1);
    if s.histogram.len() != bins {
        return Err(MergeError::Bins {
            name: s.name.clone(),
            expected: bins,
            found: s.histogram.len(),
        });
    }
    Ok(())
}

impl DriftSummary {
    /// Checks that `self` is a summary against `reference`: version, reference id, feature
    /// names and bin counts.
    pub fn check(&self, reference: &ReferenceProfile) -> Result<(), MergeError> {
        if self.version != DRIFT_SUMMARY_VERSION {
            return Err(MergeError::Version {
                found: self.version,
            });
        }
        let id = reference_id(reference);
        if self.reference_id != id {
            return Err(MergeError::Reference {
                expected: id,
                found: self.reference_id.clone(),
            });
        }
        if self.features.len() != reference.features.len() {
            return Err(MergeError::FeatureCount {
                expected: reference.features.len(),
                found: self.features.len(),
            });
        }
        for (i, (s, r)) in self.features.iter().zip(&reference.features).enumerate() {
            check_feature(i, s, r)?;
        }
        match (&self.predictions, &reference.predictions) {
            (Some(s), Some(r)) => check_feature(self.features.len(), s, &r.profile)?,
            (None, None) => {}
            _ => return Err(MergeError::Predictions),
        }
        Ok(())
    }

    /// Merges `other` into `self`: both must be summaries against `reference` (see
    /// [`DriftSummary::check`]) with the same privacy settings. Counts and histograms add,
    /// moments combine by Chan's formulas, the window span widens, and every metric is
    /// recomputed from the merged histogram. On error `self` is unchanged.
    pub fn merge(
        &mut self,
        other: &DriftSummary,
        reference: &ReferenceProfile,
    ) -> Result<(), MergeError> {
        self.check(reference)?;
        other.check(reference)?;
        if self.privacy != other.privacy {
            return Err(MergeError::Privacy {
                expected: self.privacy.clone(),
                found: other.privacy.clone(),
            });
        }
        for ((a, b), r) in self
            .features
            .iter_mut()
            .zip(&other.features)
            .zip(&reference.features)
        {
            a.merge(b, r);
        }
        if let (Some(a), Some(b), Some(r)) = (
            self.predictions.as_mut(),
            other.predictions.as_ref(),
            reference.predictions.as_ref(),
        ) {
            a.merge(b, &r.profile);
        }
        self.start_unix_ms = self.start_unix_ms.min(other.start_unix_ms);
        self.end_unix_ms = self.end_unix_ms.max(other.end_unix_ms);
        self.windows = self.windows.saturating_add(other.windows);
        self.rows = self.rows.saturating_add(other.rows);
        Ok(())
    }

    /// The feature summaries followed by the prediction summary, if any.
    pub fn all(&self) -> impl Iterator<Item = &FeatureSummary> {
        self.features.iter().chain(self.predictions.as_ref())
    }
}
