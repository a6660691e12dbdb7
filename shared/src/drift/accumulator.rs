//! Per-window accumulators: one [`FeatureAccumulator`] per feature (histogram over the
//! reference bins, missing count, Welford moments, min, max) and [`DriftState`], which holds
//! them for all features of one model and turns a window into a [`DriftSummary`].

use crate::bundle::{FeatureProfile, ReferenceProfile};

use super::bin_index;
use super::summary::{chan, reference_id, DriftSummary, FeatureSummary, DRIFT_SUMMARY_VERSION};

/// Counts of one feature over a window against fixed reference bins.
///
/// [`observe`](FeatureAccumulator::observe) does not allocate: a binary search over the
/// reference edges, one increment and a Welford update.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureAccumulator {
    edges: Box<[f64]>,
    counts: Box<[u64]>,
    missing: u64,
    count: u64,
    mean: f64,
    /// Sum of squared deviations from `mean`.
    m2: f64,
    min: f64,
    max: f64,
}

impl FeatureAccumulator {
    /// An empty accumulator over the bins of `edges` (ascending, as in
    /// [`FeatureProfile::bin_edges`]): `edges.len() - 1` bins, at least one.
    pub fn new(edges: &[f64]) -> FeatureAccumulator {
        FeatureAccumulator {
            edges: edges.into(),
            counts: vec![0; edges.len().max(2) - 1].into(),
            missing: 0,
            count: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    /// Counts one value: NaN and ±infinity count as missing; any other value in its bin
    /// ([`bin_index`]) and in the moments, min and max.
    #[inline]
    pub fn observe(&mut self, value: f64) {
        if !value.is_finite() {
            self.missing += 1;
            return;
        }
        let bin = bin_index(&self.edges, value);
        if let Some(c) = self.counts.get_mut(bin) {
            *c += 1;
        }
        self.count += 1;
        let delta = value - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (value - self.mean);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Adds `other`'s counts (the same bins) to `self`: the accumulator of the union of both
    /// windows (Chan's combination for the moments). Returns `false`, leaving `self`
    /// unchanged, when the bin edges differ.
    pub fn merge(&mut self, other: &FeatureAccumulator) -> bool {
        if self.edges.len() != other.edges.len()
            || self
                .edges
                .iter()
                .zip(other.edges.iter())
                .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return false;
        }
        let (mean, m2) = chan(
            (self.count, self.mean, self.m2),
            (other.count, other.mean, other.m2),
        );
        self.mean = mean;
        self.m2 = m2;
        self.count += other.count;
        self.missing += other.missing;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += *b;
        }
        true
    }

    /// Forgets everything observed (keeps the bins): the start of a new window.
    pub fn reset(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.missing = 0;
        self.count = 0;
        self.mean = 0.0;
        self.m2 = 0.0;
        self.min = f64::INFINITY;
        self.max = f64::NEG_INFINITY;
    }

    /// Non-missing values observed.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Missing values observed.
    pub fn missing(&self) -> u64 {
        self.missing
    }

    /// Values per bin.
    pub fn histogram(&self) -> &[u64] {
        &self.counts
    }

    /// Mean of the non-missing values (`None` before the first).
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then_some(self.mean)
    }

    /// Population standard deviation of the non-missing values (`None` before the first).
    pub fn std(&self) -> Option<f64> {
        (self.count > 0).then(|| (self.m2.max(0.0) / self.count as f64).sqrt())
    }

    /// Smallest and largest non-missing values (`None` before the first).
    pub fn min_max(&self) -> Option<(f64, f64)> {
        (self.count > 0).then_some((self.min, self.max))
    }

    /// The summary of this accumulator against `reference` (the profile whose edges it was
    /// built from), metrics included.
    pub fn summary(&self, reference: &FeatureProfile) -> FeatureSummary {
        FeatureSummary::from_parts(
            reference,
            (self.count, self.mean, self.m2),
            self.missing,
            (self.min, self.max),
            self.counts.to_vec(),
        )
    }
}

/// Row length did not match the reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("row has {found} values, the drift reference has {expected} features")]
pub struct RowLengthError {
    /// Features in the reference.
    pub expected: usize,
    /// Values in the row.
    pub found: usize,
}

/// The drift accumulators of one model for the current window: one per reference feature
/// (in the reference's order) and one for the prediction when the reference profiles it.
#[derive(Debug, Clone)]
pub struct DriftState {
    reference: ReferenceProfile,
    reference_id: String,
    features: Vec<FeatureAccumulator>,
    predictions: Option<FeatureAccumulator>,
    rows: u64,
}

impl DriftState {
    /// Empty accumulators over the bins of `reference`.
    pub fn new(reference: &ReferenceProfile) -> DriftState {
        DriftState {
            reference_id: reference_id(reference),
            features: reference
                .features
                .iter()
                .map(|f| FeatureAccumulator::new(&f.bin_edges))
                .collect(),
            predictions: reference
                .predictions
                .as_ref()
                .map(|p| FeatureAccumulator::new(&p.profile.bin_edges)),
            reference: reference.clone(),
            rows: 0,
        }
    }

    /// The reference the state bins against.
    pub fn reference(&self) -> &ReferenceProfile {
        &self.reference
    }

    /// [`reference_id`] of the reference.
    pub fn reference_id(&self) -> &str {
        &self.reference_id
    }

    /// The feature names, in the order [`observe_row`](DriftState::observe_row) expects.
    pub fn feature_names(&self) -> impl Iterator<Item = &str> {
        self.reference.features.iter().map(|f| f.name.as_str())
    }

    /// Counts one row: one value per reference feature, in the reference's order; NaN for
    /// a missing value. A row of the wrong length is refused and nothing is counted.
    #[inline]
    pub fn observe_row(&mut self, row: &[f64]) -> Result<(), RowLengthError> {
        if row.len() != self.features.len() {
            return Err(RowLengthError {
                expected: self.features.len(),
                found: row.len(),
            });
        }
        for (acc, &v) in self.features.iter_mut().zip(row) {
            acc.observe(v);
        }
        self.rows += 1;
        Ok(())
    }

    /// Counts one prediction score (see the reference's
    /// [`PredictionProfile`](crate::bundle::manifest::PredictionProfile) for which score);
    /// ignored when the reference has no prediction profile.
    #[inline]
    pub fn observe_prediction(&mut self, score: f64) {
        if let Some(p) = self.predictions.as_mut() {
            p.observe(score);
        }
    }

    /// The accumulator of feature `index` (reference order).
    pub fn feature(&self, index: usize) -> Option<&FeatureAccumulator> {
        self.features.get(index)
    }

    /// The prediction accumulator, when the reference profiles predictions.
    pub fn predictions(&self) -> Option<&FeatureAccumulator> {
        self.predictions.as_ref()
    }

    /// Rows observed in this window.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The summary of the window `[start_unix_ms, end_unix_ms)` so far (one window).
    pub fn summary(&self, start_unix_ms: u64, end_unix_ms: u64) -> DriftSummary {
        DriftSummary {
            version: DRIFT_SUMMARY_VERSION,
            reference_id: self.reference_id.clone(),
            start_unix_ms,
            end_unix_ms,
            windows: 1,
            rows: self.rows,
            features: self
                .features
                .iter()
                .zip(&self.reference.features)
                .map(|(a, r)| a.summary(r))
                .collect(),
            predictions: match (&self.predictions, &self.reference.predictions) {
                (Some(a), Some(r)) => Some(a.summary(&r.profile)),
                _ => None,
            },
            privacy: None,
        }
    }

    /// The window's summary, then a reset for the next window.
    pub fn take_summary(&mut self, start_unix_ms: u64, end_unix_ms: u64) -> DriftSummary {
        let s = self.summary(start_unix_ms, end_unix_ms);
        self.reset();
        s
    }

    /// Forgets everything observed.
    pub fn reset(&mut self) {
        self.features.iter_mut().for_each(FeatureAccumulator::reset);
        if let Some(p) = self.predictions.as_mut() {
            p.reset();
        }
        self.rows = 0;
    }

    /// Adds `other`'s counts (same reference) to `self`. Returns `false`, leaving `self`
    /// unchanged, when the references differ.
    pub fn merge(&mut self, other: &DriftState) -> bool {
        if self.reference_id != other.reference_id || self.reference != other.reference {
            return false;
        }
        for (a, b) in self.features.iter_mut().zip(&other.features) {
            a.merge(b);
        }
        if let (Some(a), Some(b)) = (self.predictions.as_mut(), other.predictions.as_ref()) {
            a.merge(b);
        }
        self.rows += other.rows;
        true
    }
}
