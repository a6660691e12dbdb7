//! Drift alerting: a configured metric above its threshold for K consecutive windows raises
//! a per-feature alert flag; one window at or below the threshold clears it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::summary::{DriftMetrics, DriftSummary};

/// The metric an alert watches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertMetric {
    /// Population stability index.
    #[default]
    Psi,
    /// Jensen–Shannon distance (natural log).
    Js,
    /// Binned Wasserstein-1 in feature units.
    Wasserstein,
    /// Binned Wasserstein-1 divided by the reference standard deviation.
    WassersteinNorm,
    /// The KS lower bound.
    Ks,
}

impl AlertMetric {
    /// This metric's value in `m`.
    pub fn value(self, m: &DriftMetrics) -> Option<f64> {
        match self {
            AlertMetric::Psi => m.psi,
            AlertMetric::Js => m.js,
            AlertMetric::Wasserstein => m.wasserstein,
            AlertMetric::WassersteinNorm => m.wasserstein_norm,
            AlertMetric::Ks => m.ks_bound,
        }
    }
}

fn default_threshold() -> f64 {
    0.2
}

fn default_windows() -> u32 {
    3
}

/// Alert configuration (a config-file section): defaults `metric = "psi"`,
/// `threshold = 0.2`, `windows = 3`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// The watched metric.
    #[serde(default)]
    pub metric: AlertMetric,
    /// The alert needs the metric strictly above this value.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Consecutive windows above the threshold that raise the alert (K >= 1).
    #[serde(default = "default_windows")]
    pub windows: u32,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            metric: AlertMetric::default(),
            threshold: default_threshold(),
            windows: default_windows(),
        }
    }
}

/// An invalid [`AlertConfig`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AlertConfigError {
    /// The threshold is negative or not finite.
    #[error("drift alert threshold {0} must be finite and non-negative")]
    Threshold(f64),
    /// `windows` is 0.
    #[error("drift alert windows must be at least 1")]
    Windows,
}

impl AlertConfig {
    /// Checks the threshold (finite, >= 0) and the window count (>= 1).
    pub fn validate(&self) -> Result<(), AlertConfigError> {
        if !(self.threshold.is_finite() && self.threshold >= 0.0) {
            return Err(AlertConfigError::Threshold(self.threshold));
        }
        if self.windows == 0 {
            return Err(AlertConfigError::Windows);
        }
        Ok(())
    }
}

/// A feature whose alert flag changed in a window.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertChange {
    /// The feature name (the prediction profile's name for the prediction).
    pub feature: String,
    /// The change is about the prediction distribution, not an input feature.
    pub prediction: bool,
    /// `true`: raised; `false`: cleared.
    pub raised: bool,
    /// The metric's value in that window.
    pub value: Option<f64>,
}

/// Per-feature streaks of windows above the threshold, across consecutive window summaries.
#[derive(Debug, Clone)]
pub struct AlertTracker {
    config: AlertConfig,
    /// (is the prediction, feature name) -> (windows above in a row, flag).
    streaks: BTreeMap<(bool, String), (u32, bool)>,
}

impl AlertTracker {
    /// A tracker with no history. Validate `config` first ([`AlertConfig::validate`]); a
    /// `windows` of 0 acts as 1.
    pub fn new(config: AlertConfig) -> AlertTracker {
        AlertTracker {
            config,
            streaks: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &AlertConfig {
        &self.config
    }

    /// Whether input feature `feature`'s alert is raised.
    pub fn is_raised(&self, feature: &str) -> bool {
        self.streaks
            .get(&(false, feature.to_string()))
            .is_some_and(|s| s.1)
    }

    /// Whether the prediction distribution's alert is raised.
    pub fn prediction_raised(&self) -> bool {
        self.streaks
            .iter()
            .any(|((prediction, _), s)| *prediction && s.1)
    }

    /// Takes the next window's summary (of one window, in time order): updates each
    /// feature's streak, sets each feature summary's `alert` flag, and returns the flags
    /// that changed. A window where the metric is above the threshold extends the streak; one
    /// at or below it resets the streak and clears the flag; one where the metric is absent
    /// (no data) leaves both as they were.
    pub fn update(&mut self, summary: &mut DriftSummary) -> Vec<AlertChange> {
        let k = self.config.windows.max(1);
        let mut changes = Vec::new();
        let features = summary
            .features
            .iter_mut()
            .map(|f| (false, f))
            .chain(summary.predictions.as_mut().map(|f| (true, f)));
        for (prediction, f) in features {
            let value = self.config.metric.value(&f.metrics);
            let entry = self
                .streaks
                .entry((prediction, f.name.clone()))
                .or_insert((0, false));
            let was = entry.1;
            match value {
                Some(v) if v > self.config.threshold => {
                    entry.0 = entry.0.saturating_add(1);
                    if entry.0 >= k {
                        entry.1 = true;
                    }
                }
                Some(_) => *entry = (0, false),
                None => {}
            }
            f.alert = entry.1;
            if entry.1 != was {
                changes.push(AlertChange {
                    feature: f.name.clone(),
                    prediction,
                    raised: entry.1,
                    value,
                });
            }
        }
        changes
    }
}
