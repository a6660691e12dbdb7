//! Signoff metrics for model bundles: classification, regression and group-fairness metrics
//! computed from a labelled evaluation set, and the `METRIC>=X` requirements they are checked
//! against before a bundle is signed off.
//!
//! Classification and regression metrics follow scikit-learn 1.9 (`accuracy_score`,
//! `precision_score`/`recall_score`/`f1_score` with zero division counted as 0,
//! `roc_auc_score`, `log_loss`, `mean_absolute_error`, `mean_squared_error`,
//! `root_mean_squared_error`, `r2_score`); fairness metrics follow AIF360 (unprivileged
//! minus privileged). A metric that cannot be computed is left out of [`Report::metrics`]
//! and [`Report::notes`] says why; a requirement on a missing metric is not met.
//!
//! Rows are slice positions (0-based) in error messages and notes.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Named metric values, in a stable order.
pub type Metrics = BTreeMap<String, f64>;

/// Metrics [`classification`] can report.
pub const CLASSIFICATION_METRICS: &[&str] = &[
    "accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "log_loss",
];
/// Metrics [`regression`] can report.
pub const REGRESSION_METRICS: &[&str] = &["mae", "mse", "rmse", "r2"];
/// Fairness metrics [`classification`] reports when rows carry a group.
pub const FAIRNESS_METRICS: &[&str] = &[
    "statistical_parity_difference",
    "equal_opportunity_difference",
    "average_odds_difference",
];

/// Whether `name` is a metric this module can report.
pub fn is_known_metric(name: &str) -> bool {
    known_metrics().any(|m| m == name)
}

fn known_metrics() -> impl Iterator<Item = &'static str> {
    CLASSIFICATION_METRICS
        .iter()
        .chain(REGRESSION_METRICS)
        .chain(FAIRNESS_METRICS)
        .copied()
}

/// Invalid evaluation data or requirement text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("no data: `{0}` is empty")]
    Empty(&'static str),
    #[error("`classes` has {0} entry; classification needs at least 2 classes")]
    TooFewClasses(usize),
    #[error("length mismatch: `{left}` has {left_len} rows but `{right}` has {right_len}")]
    LengthMismatch {
        left: &'static str,
        left_len: usize,
        right: &'static str,
        right_len: usize,
    },
    #[error("length mismatch: `proba` has {len} values but rows x classes is {rows} x {classes}")]
    ProbaShape {
        len: usize,
        rows: usize,
        classes: usize,
    },
    #[error("{slice}[{row}] = {index} is out of range: there are {classes} classes")]
    IndexOutOfRange {
        slice: &'static str,
        row: usize,
        index: usize,
        classes: usize,
    },
    #[error("positive class index {positive} is out of range: there are {classes} classes")]
    PositiveOutOfRange { positive: usize, classes: usize },
    #[error("proba row {row} is not finite: column {column} is {value}")]
    NonFiniteProba {
        row: usize,
        column: usize,
        value: f64,
    },
    #[error(
        "privileged group {group:?} does not occur in `groups`; groups seen: {}",
        quoted(seen)
    )]
    UnknownPrivilegedGroup { group: String, seen: Vec<String> },
    #[error("regression {slice}[{row}] is not finite: {value}")]
    NonFiniteValue {
        slice: &'static str,
        row: usize,
        value: f64,
    },
    #[error("requirement {requirement:?}: {reason}")]
    BadRequirement {
        requirement: String,
        reason: &'static str,
    },
    #[error(
        "requirement {requirement:?}: unknown metric {metric:?}; known metrics: {}",
        known_metrics().collect::<Vec<_>>().join(", ")
    )]
    UnknownMetric { requirement: String, metric: String },
    #[error("requirement {requirement:?}: {number:?} is not a finite number")]
    BadNumber { requirement: String, number: String },
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A labelled evaluation set for a classifier.
#[derive(Debug, Clone, Copy)]
pub struct Classification<'a> {
    /// Class labels in the model's probability-column order.
    pub classes: &'a [String],
    /// Per row: index into `classes` of the true label.
    pub truth: &'a [usize],
    /// Per row: index into `classes` of the predicted label.
    pub predicted: &'a [usize],
    /// Optional row-major probabilities, rows x classes.len().
    pub proba: Option<&'a [f64]>,
    /// Optional group value per row (for fairness metrics).
    pub groups: Option<&'a [String]>,
    /// Reference ("privileged") group; None = the group with the most rows (ties: smallest value).
    pub privileged: Option<&'a str>,
    /// Index of the positive class for binary metrics and fairness (binary: usually 1).
    pub positive: usize,
}

/// What [`classification`] or [`regression`] measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Every metric that could be computed (all values finite).
    pub metrics: Metrics,
    /// Per-group rates, sorted by group value (empty without groups).
    pub groups: Vec<GroupStats>,
    /// Why a metric is missing, which convention was applied, which group was the reference.
    pub notes: Vec<String>,
}

/// Rates of one group for the positive class (one-vs-rest for multi-class).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupStats {
    pub group: String,
    pub rows: u64,
    /// P(predicted = positive).
    pub selection_rate: f64,
    /// P(predicted = positive | true = positive); None when the group has no positive rows.
    pub true_positive_rate: Option<f64>,
    /// P(predicted = positive | true != positive); None when the group has no negative rows.
    pub false_positive_rate: Option<f64>,
}

/// `numerator / denominator`, 0 when the denominator is 0 (scikit-learn's default).
fn ratio(numerator: u64, denominator: u64) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

fn rate(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator != 0).then(|| numerator as f64 / denominator as f64)
}

impl Report {
    fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// Records a metric, or a note when the value is not finite (which would not survive JSON).
    fn set(&mut self, name: &str, value: f64) {
        if value.is_finite() {
            self.metrics.insert(name.to_string(), value);
        } else {
            self.note(format!("{name}: not finite ({value}); left out"));
        }
    }
}

fn check_lengths(
    left: &'static str,
    left_len: usize,
    right: &'static str,
    right_len: usize,
) -> Result<(), MetricsError> {
    if left_len == right_len {
        Ok(())
    } else {
        Err(MetricsError::LengthMismatch {
            left,
            left_len,
            right,
            right_len,
        })
    }
}

fn validate(c: &Classification) -> Result<(), MetricsError> {
    let k = c.classes.len();
    if k == 0 {
        return Err(MetricsError::Empty("classes"));
    }
    if k < 2 {
        return Err(MetricsError::TooFewClasses(k));
    }
    if c.positive >= k {
        return Err(MetricsError::PositiveOutOfRange {
            positive: c.positive,
            classes: k,
        });
    }
    let rows = c.truth.len();
    if rows == 0 {
        return Err(MetricsError::Empty("truth"));
    }
    check_lengths("truth", rows, "predicted", c.predicted.len())?;
    if let Some(groups) = c.groups {
        check_lengths("truth", rows, "groups", groups.len())?;
    }
    if let Some(proba) = c.proba {
        if rows.checked_mul(k) != Some(proba.len()) {
            return Err(MetricsError::ProbaShape {
                len: proba.len(),
                rows,
                classes: k,
            });
        }
    }
    for (row, (&t, &p)) in c.truth.iter().zip(c.predicted).enumerate() {
        for (slice, index) in [("truth", t), ("predicted", p)] {
            if index >= k {
                return Err(MetricsError::IndexOutOfRange {
                    slice,
                    row,
                    index,
                    classes: k,
                });
            }
        }
    }
    if let Some(proba) = c.proba {
        for (row, values) in proba.chunks_exact(k).enumerate() {
            if let Some((column, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite())
            {
                return Err(MetricsError::NonFiniteProba { row, column, value });
            }
        }
    }
    Ok(())
}

/// Classification metrics (see [`CLASSIFICATION_METRICS`]) and, when `c.groups` is given,
/// per-group rates and [`FAIRNESS_METRICS`].
///
/// Two classes: precision, recall and f1 of class `c.positive`, roc_auc from its probability
/// column. More classes: macro averages over the classes that occur in `truth` or `predicted`
/// (scikit-learn's default without `labels`), roc_auc one-vs-rest macro. roc_auc and log_loss
/// need `c.proba`.
pub fn classification(c: &Classification) -> Result<Report, MetricsError> {
    validate(c)?;
    let k = c.classes.len();
    let rows = c.truth.len() as u64;
    let mut report = Report::default();

    let mut true_count = vec![0u64; k];
    let mut predicted_count = vec![0u64; k];
    let mut hits = vec![0u64; k];
    for (&t, &p) in c.truth.iter().zip(c.predicted) {
        true_count[t] += 1;
        predicted_count[p] += 1;
        if t == p {
            hits[t] += 1;
        }
    }
    report.set("accuracy", ratio(hits.iter().sum(), rows));

    let prf = |class: usize| {
        let tp = hits[class];
        (
            ratio(tp, predicted_count[class]),
            ratio(tp, true_count[class]),
            ratio(2 * tp, predicted_count[class] + true_count[class]),
        )
    };
    let zero_division_notes = |report: &mut Report, class: usize| {
        let name = &c.classes[class];
        if predicted_count[class] == 0 {
            report.note(format!(
                "precision of class {name:?}: never predicted (0/0), counted as 0"
            ));
        }
        if true_count[class] == 0 {
            report.note(format!(
                "recall of class {name:?}: no true rows (0/0), counted as 0"
            ));
        }
    };
    if k == 2 {
        let (precision, recall, f1) = prf(c.positive);
        zero_division_notes(&mut report, c.positive);
        report.set("precision", precision);
        report.set("recall", recall);
        report.set("f1", f1);
    } else {
        let present: Vec<usize> = (0..k)
            .filter(|&i| true_count[i] + predicted_count[i] > 0)
            .collect();
        let (mut precision, mut recall, mut f1) = (0.0, 0.0, 0.0);
        for &class in &present {
            let (p, r, f) = prf(class);
            precision += p;
            recall += r;
            f1 += f;
            zero_division_notes(&mut report, class);
        }
        let n = present.len() as f64;
        if present.len() < k {
            let missing: Vec<String> = (0..k)
                .filter(|i| !present.contains(i))
                .map(|i| c.classes[i].clone())
                .collect();
            report.note(format!(
                "precision, recall, f1: macro average over the {} classes that occur in truth \
                 or predictions; not occurring: {}",
                present.len(),
                quoted(&missing)
            ));
        }
        report.set("precision", precision / n);
        report.set("recall", recall / n);
        report.set("f1", f1 / n);
    }

    match c.proba {
        Some(proba) => {
            roc_auc(c, proba, &true_count, &mut report);
            log_loss(c, proba, &mut report);
        }
        None => report.note("roc_auc, log_loss: no probabilities given"),
    }

    if let Some(groups) = c.groups {
        fairness(c, groups, &mut report)?;
    }
    Ok(report)
}

/// Area under the ROC curve of `scores` (true = positive row), with tied scores forming one
/// threshold (scikit-learn's `roc_curve` + trapezoidal `auc`). None without positives or
/// without negatives.
fn auc(mut scored: Vec<(f64, bool)>) -> Option<f64> {
    let positives = scored.iter().filter(|s| s.1).count() as u128;
    let negatives = scored.len() as u128 - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    // Twice the area in units of (1 / negatives) x (1 / positives): an exact integer.
    let (mut tp, mut fp, mut area2) = (0u128, 0u128, 0u128);
    let mut i = 0;
    while i < scored.len() {
        let score = scored[i].0;
        let (tp0, fp0) = (tp, fp);
        // `==`, not total_cmp: -0.0 and 0.0 are one threshold, as in numpy.
        while i < scored.len() && scored[i].0 == score {
            if scored[i].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        area2 += (fp - fp0) * (tp + tp0);
    }
    Some(area2 as f64 / (2 * positives * negatives) as f64)
}

fn roc_auc(c: &Classification, proba: &[f64], true_count: &[u64], report: &mut Report) {
    let k = c.classes.len();
    let rows = c.truth.len() as u64;
    let column = |class: usize| -> Vec<(f64, bool)> {
        proba
            .chunks_exact(k)
            .zip(c.truth)
            .map(|(p, &t)| (p[class], t == class))
            .collect()
    };
    if k == 2 {
        match auc(column(c.positive)) {
            Some(v) => report.set("roc_auc", v),
            None => report.note(format!(
                "roc_auc: undefined: every true label is {:?}",
                c.classes[c.truth[0]]
            )),
        }
        return;
    }
    let absent: Vec<String> = (0..k)
        .filter(|&i| true_count[i] == 0 || true_count[i] == rows)
        .map(|i| c.classes[i].clone())
        .collect();
    if !absent.is_empty() {
        report.note(format!(
            "roc_auc: undefined: one-vs-rest needs every class among the true labels, and \
             these are not: {}",
            quoted(&absent)
        ));
        return;
    }
    // numpy.allclose(1, row sum), which scikit-learn requires for multi-class roc_auc.
    if let Some(row) = proba.chunks_exact(k).position(|p| {
        let sum: f64 = p.iter().sum();
        (1.0 - sum).abs() > 1e-8 + 1e-5 * sum.abs()
    }) {
        report.note(format!(
            "roc_auc: not computed: multi-class roc_auc needs probabilities that sum to 1, \
             and row {row} does not"
        ));
        return;
    }
    let mut total = 0.0;
    for class in 0..k {
        match auc(column(class)) {
            Some(v) => total += v,
            None => return, // unreachable: every class has positives and negatives
        }
    }
    report.set("roc_auc", total / k as f64);
}

fn log_loss(c: &Classification, proba: &[f64], report: &mut Report) {
    let k = c.classes.len();
    if let Some(row) = proba
        .chunks_exact(k)
        .position(|p| p.iter().any(|v| !(0.0..=1.0).contains(v)))
    {
        report.note(format!(
            "log_loss: not computed: row {row} has a probability outside [0, 1]"
        ));
        return;
    }
    // scikit-learn clips to [eps, 1 - eps] with eps the dtype's machine epsilon.
    let eps = f64::EPSILON;
    let mut total = 0.0;
    let mut unnormalized = None;
    for (row, (p, &t)) in proba.chunks_exact(k).zip(c.truth).enumerate() {
        total -= p[t].clamp(eps, 1.0 - eps).ln();
        let sum: f64 = p.iter().sum();
        if unnormalized.is_none() && (sum - 1.0).abs() > eps.sqrt() {
            unnormalized = Some(row);
        }
    }
    if let Some(row) = unnormalized {
        report.note(format!(
            "log_loss: probabilities of row {row} (and maybe others) do not sum to 1; used as given"
        ));
    }
    report.set("log_loss", total / c.truth.len() as f64);
}

#[derive(Default)]
struct GroupCounts {
    rows: u64,
    selected: u64,
    positives: u64,
    negatives: u64,
    true_positives: u64,
    false_positives: u64,
}

fn fairness(
    c: &Classification,
    groups: &[String],
    report: &mut Report,
) -> Result<(), MetricsError> {
    let mut counts: BTreeMap<&str, GroupCounts> = BTreeMap::new();
    for ((g, &t), &p) in groups.iter().zip(c.truth).zip(c.predicted) {
        let n = counts.entry(g.as_str()).or_default();
        let (actual, selected) = (t == c.positive, p == c.positive);
        n.rows += 1;
        n.selected += u64::from(selected);
        n.positives += u64::from(actual);
        n.negatives += u64::from(!actual);
        n.true_positives += u64::from(actual && selected);
        n.false_positives += u64::from(!actual && selected);
    }
    let reference = match c.privileged {
        Some(p) if counts.contains_key(p) => p,
        Some(p) => {
            return Err(MetricsError::UnknownPrivilegedGroup {
                group: p.to_string(),
                seen: counts.keys().map(|g| g.to_string()).collect(),
            })
        }
        // Most rows; among equals the smallest value (max_by keeps the last maximum, so
        // iterate in reverse order).
        None => counts
            .iter()
            .rev()
            .max_by_key(|(_, n)| n.rows)
            .map(|(g, _)| *g)
            .unwrap_or_default(),
    };
    report.groups = counts
        .iter()
        .map(|(g, n)| GroupStats {
            group: g.to_string(),
            rows: n.rows,
            selection_rate: ratio(n.selected, n.rows),
            true_positive_rate: rate(n.true_positives, n.positives),
            false_positive_rate: rate(n.false_positives, n.negatives),
        })
        .collect();
    if counts.len() < 2 {
        report.note(format!(
            "fairness metrics: not computed: every row is in group {reference:?}"
        ));
        return Ok(());
    }
    let positive = &c.classes[c.positive];
    report.note(format!(
        "fairness: positive class {positive:?}; reference group {reference:?} ({})",
        if c.privileged.is_some() {
            "given"
        } else {
            "most rows"
        }
    ));

    let stats = |g: &str| report.groups.iter().find(|s| s.group == g).cloned();
    let Some(base) = stats(reference) else {
        return Ok(());
    };
    let undefined = |s: &GroupStats| {
        let mut missing = Vec::new();
        if s.true_positive_rate.is_none() {
            missing.push(format!(
                "no rows with true class {positive:?} (TPR undefined)"
            ));
        }
        if s.false_positive_rate.is_none() {
            missing.push(format!(
                "no rows whose true class is not {positive:?} (FPR undefined)"
            ));
        }
        missing.join(", ")
    };

    type Diff = fn(&GroupStats, &GroupStats) -> Option<f64>;
    let metrics: [(&str, Diff); 3] = [
        ("statistical_parity_difference", |g, r| {
            Some(g.selection_rate - r.selection_rate)
        }),
        ("equal_opportunity_difference", |g, r| {
            Some(g.true_positive_rate? - r.true_positive_rate?)
        }),
        ("average_odds_difference", |g, r| {
            let fpr = g.false_positive_rate? - r.false_positive_rate?;
            let tpr = g.true_positive_rate? - r.true_positive_rate?;
            Some((fpr + tpr) / 2.0)
        }),
    ];
    let mut notes = Vec::new();
    for (name, diff) in metrics {
        if diff(&base, &base).is_none() {
            notes.push(format!(
                "{name}: not computed: reference group {reference:?} has {}",
                undefined(&base)
            ));
            continue;
        }
        // Largest absolute value, sign kept; among equals the first group in sorted order.
        let mut worst: Option<(&str, f64)> = None;
        for g in report.groups.iter().filter(|s| s.group != reference) {
            match diff(g, &base) {
                Some(v) => {
                    if worst.is_none_or(|(_, w)| v.abs() > w.abs()) {
                        worst = Some((&g.group, v));
                    }
                }
                None => notes.push(format!(
                    "{name}: group {:?} left out: {}",
                    g.group,
                    undefined(g)
                )),
            }
        }
        match worst {
            Some((group, value)) => {
                notes.push(format!(
                    "{name}: {value} from group {group:?} against reference {reference:?}"
                ));
                if value.is_finite() {
                    report.metrics.insert(name.to_string(), value);
                }
            }
            None => notes.push(format!(
                "{name}: not computed: no group other than {reference:?} has the rates it needs"
            )),
        }
    }
    report.notes.extend(notes);
    Ok(())
}

/// Regression metrics (see [`REGRESSION_METRICS`]). r2 follows scikit-learn's `force_finite`
/// convention: 1.0 for perfect predictions, 0.0 for imperfect predictions of a constant truth;
/// it is left out for fewer than 2 rows.
pub fn regression(truth: &[f64], predicted: &[f64]) -> Result<Report, MetricsError> {
    if truth.is_empty() {
        return Err(MetricsError::Empty("truth"));
    }
    check_lengths("truth", truth.len(), "predicted", predicted.len())?;
    for (row, (&t, &p)) in truth.iter().zip(predicted).enumerate() {
        for (slice, value) in [("truth", t), ("predicted", p)] {
            if !value.is_finite() {
                return Err(MetricsError::NonFiniteValue { slice, row, value });
            }
        }
    }
    let n = truth.len() as f64;
    let (mut abs_sum, mut sq_sum) = (0.0, 0.0);
    for (&t, &p) in truth.iter().zip(predicted) {
        abs_sum += (t - p).abs();
        sq_sum += (t - p) * (t - p);
    }
    let mut report = Report::default();
    let mse = sq_sum / n;
    report.set("mae", abs_sum / n);
    report.set("mse", mse);
    report.set("rmse", mse.sqrt());

    if truth.len() < 2 {
        report.note("r2: undefined for fewer than 2 rows");
        return Ok(report);
    }
    let constant = truth.iter().all(|&t| t == truth[0]);
    let r2 = if sq_sum == 0.0 {
        1.0
    } else if constant {
        report.note(
            "r2: truth is constant; 0.0 for imperfect predictions (scikit-learn's convention)",
        );
        0.0
    } else {
        let mean = truth.iter().sum::<f64>() / n;
        let spread: f64 = truth.iter().map(|&t| (t - mean) * (t - mean)).sum();
        if spread == 0.0 {
            0.0
        } else {
            1.0 - sq_sum / spread
        }
    };
    report.set("r2", r2);
    Ok(report)
}

/// A comparison operator of a [`Requirement`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cmp {
    Ge,
    Gt,
    Le,
    Lt,
}

impl Cmp {
    pub fn symbol(self) -> &'static str {
        match self {
            Cmp::Ge => ">=",
            Cmp::Gt => ">",
            Cmp::Le => "<=",
            Cmp::Lt => "<",
        }
    }

    /// `value OP threshold`; false when either is NaN.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Cmp::Ge => value >= threshold,
            Cmp::Gt => value > threshold,
            Cmp::Le => value <= threshold,
            Cmp::Lt => value < threshold,
        }
    }
}

/// A signoff condition such as `accuracy>=0.9` or `abs(statistical_parity_difference)<=0.1`.
#[derive(Debug, Clone, PartialEq)]
pub struct Requirement {
    pub metric: String,
    /// Compare the metric's absolute value.
    pub abs: bool,
    pub op: Cmp,
    pub threshold: f64,
    /// Canonical text: no whitespace, the number as written.
    pub text: String,
}

/// The result of checking one [`Requirement`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The requirement's canonical text.
    pub requirement: String,
    /// The value compared (absolute value for `abs(...)`); None when the metric is missing.
    pub measured: Option<f64>,
    pub met: bool,
}

const SYNTAX: &str = "expected METRIC>=X, METRIC>X, METRIC<=X, METRIC<X or abs(METRIC)<=X";

impl Requirement {
    /// Parses `METRIC>=X`, `METRIC>X`, `METRIC<=X`, `METRIC<X`, with `abs(METRIC)` allowed on
    /// the left and whitespace around the parts.
    pub fn parse(s: &str) -> Result<Requirement, MetricsError> {
        let bad = |reason| MetricsError::BadRequirement {
            requirement: s.to_string(),
            reason,
        };
        let Some(at) = s.find(['<', '>']) else {
            return Err(bad(SYNTAX));
        };
        let (left, rest) = s.split_at(at);
        let (op, number) = if let Some(n) = rest.strip_prefix(">=") {
            (Cmp::Ge, n)
        } else if let Some(n) = rest.strip_prefix("<=") {
            (Cmp::Le, n)
        } else if let Some(n) = rest.strip_prefix('>') {
            (Cmp::Gt, n)
        } else if let Some(n) = rest.strip_prefix('<') {
            (Cmp::Lt, n)
        } else {
            return Err(bad(SYNTAX));
        };
        let left = left.trim();
        if left.ends_with(['=', '!']) {
            return Err(bad("unsupported operator: use >=, >, <= or <"));
        }
        let (abs, metric) = match left
            .strip_prefix("abs")
            .map(str::trim_start)
            .and_then(|l| l.strip_prefix('('))
        {
            Some(inner) => match inner.strip_suffix(')') {
                Some(m) => (true, m.trim()),
                None => return Err(bad("abs( without closing parenthesis")),
            },
            None => (false, left),
        };
        if metric.is_empty() {
            return Err(bad("missing metric name"));
        }
        if !is_known_metric(metric) {
            return Err(MetricsError::UnknownMetric {
                requirement: s.to_string(),
                metric: metric.to_string(),
            });
        }
        let number = number.trim();
        let threshold = match number.parse::<f64>() {
            Ok(v) if v.is_finite() => v,
            _ => {
                return Err(MetricsError::BadNumber {
                    requirement: s.to_string(),
                    number: number.to_string(),
                })
            }
        };
        let text = if abs {
            format!("abs({metric}){}{number}", op.symbol())
        } else {
            format!("{metric}{}{number}", op.symbol())
        };
        Ok(Requirement {
            metric: metric.to_string(),
            abs,
            op,
            threshold,
            text,
        })
    }

    /// Checks the requirement against measured metrics; a missing metric is not met.
    pub fn check(&self, m: &Metrics) -> Outcome {
        let measured = m
            .get(&self.metric)
            .map(|&v| if self.abs { v.abs() } else { v });
        Outcome {
            requirement: self.text.clone(),
            measured,
            met: measured.is_some_and(|v| self.op.holds(v, self.threshold)),
        }
    }
}

impl std::str::FromStr for Requirement {
    type Err = MetricsError;

    fn from_str(s: &str) -> Result<Requirement, MetricsError> {
        Requirement::parse(s)
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Expected values from `shared/tests/fixtures/metrics/generate.py` (scikit-learn 1.9,
    /// numpy formulas for fairness).
    const CASES: &str = include_str!("../tests/fixtures/metrics/cases.json");

    /// Relative tolerance for fixture comparisons; values within `ABS_FLOOR` of each other
    /// also pass (for expected values that are 0 or differences near 0).
    const REL_TOL: f64 = 1e-9;
    const ABS_FLOOR: f64 = 1e-15;

    fn close(got: f64, want: f64) -> bool {
        let diff = (got - want).abs();
        diff <= REL_TOL * got.abs().max(want.abs()) || diff <= ABS_FLOOR
    }

    fn cases() -> Value {
        serde_json::from_str(CASES).expect("cases.json parses")
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|s| s.as_str().expect("string").to_string())
            .collect()
    }

    fn indices(v: &Value) -> Vec<usize> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|i| i.as_u64().expect("index") as usize)
            .collect()
    }

    fn floats(v: &Value) -> Vec<f64> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect()
    }

    fn opt_rate(v: &Value) -> Option<f64> {
        v.as_f64()
    }

    /// Every expected metric present and close, every listed-absent metric missing with a
    /// note that names it, and nothing else reported.
    fn compare(name: &str, report: &Report, case: &Value) -> usize {
        let expected = case["expected"].as_object().expect("expected");
        let absent = strings(&case["absent"]);
        let mut compared = 0;
        for (metric, want) in expected {
            let want = want.as_f64().expect("number");
            let got = report.metrics.get(metric).copied();
            assert!(
                got.is_some_and(|g| close(g, want)),
                "{name}: {metric} = {got:?}, want {want}"
            );
            compared += 1;
        }
        for metric in &absent {
            assert!(
                !report.metrics.contains_key(metric),
                "{name}: {metric} should be absent, got {:?}",
                report.metrics.get(metric)
            );
        }
        let mut reported: Vec<&String> = report.metrics.keys().collect();
        reported.retain(|m| !expected.contains_key(*m));
        assert!(
            reported.is_empty(),
            "{name}: unexpected metrics {reported:?}"
        );
        compared
    }

    fn note_mentions(report: &Report, words: &[&str]) -> bool {
        report
            .notes
            .iter()
            .any(|n| words.iter().all(|w| n.contains(w)))
    }

    #[test]
    fn fixture_generated_by_sklearn_1_9() {
        let v = cases();
        assert!(
            v["sklearn_version"]
                .as_str()
                .is_some_and(|s| s.starts_with("1.9")),
            "{}",
            v["sklearn_version"]
        );
    }

    #[test]
    fn classification_matches_fixtures() {
        let v = cases();
        let mut compared = 0;
        let all = v["classification"]
            .as_array()
            .expect("classification cases");
        assert!(all.len() >= 10);
        for case in all {
            let name = case["name"].as_str().expect("name");
            let classes = strings(&case["classes"]);
            let truth = indices(&case["truth"]);
            let predicted = indices(&case["predicted"]);
            let proba = (!case["proba"].is_null()).then(|| floats(&case["proba"]));
            let groups = (!case["groups"].is_null()).then(|| strings(&case["groups"]));
            let c = Classification {
                classes: &classes,
                truth: &truth,
                predicted: &predicted,
                proba: proba.as_deref(),
                groups: groups.as_deref(),
                privileged: case["privileged"].as_str(),
                positive: case["positive"].as_u64().expect("positive") as usize,
            };
            let report = classification(&c).unwrap_or_else(|e| panic!("{name}: {e}"));
            compared += compare(name, &report, case);
            for metric in strings(&case["absent"]) {
                // Fairness metrics are expected absent without groups, silently.
                if groups.is_some() || !FAIRNESS_METRICS.contains(&metric.as_str()) {
                    assert!(
                        report.notes.iter().any(|n| n.contains(&metric)
                            || (FAIRNESS_METRICS.contains(&metric.as_str())
                                && n.contains("fairness metrics"))),
                        "{name}: no note explains missing {metric}: {:?}",
                        report.notes
                    );
                }
            }
            let want = case["group_stats"].as_array().expect("group_stats");
            assert_eq!(report.groups.len(), want.len(), "{name}: group count");
            for (got, want) in report.groups.iter().zip(want) {
                assert_eq!(got.group, want["group"].as_str().expect("group"), "{name}");
                assert_eq!(got.rows, want["rows"].as_u64().expect("rows"), "{name}");
                let want_sel = want["selection_rate"].as_f64().expect("rate");
                assert!(close(got.selection_rate, want_sel), "{name}: {got:?}");
                for (g, w) in [
                    (
                        got.true_positive_rate,
                        opt_rate(&want["true_positive_rate"]),
                    ),
                    (
                        got.false_positive_rate,
                        opt_rate(&want["false_positive_rate"]),
                    ),
                ] {
                    match (g, w) {
                        (Some(g), Some(w)) => assert!(close(g, w), "{name}: {got:?}"),
                        (None, None) => {}
                        _ => panic!("{name}: {got:?} vs {want}"),
                    }
                }
            }
        }
        assert!(compared >= 70, "compared only {compared} values");
    }

    #[test]
    fn regression_matches_fixtures() {
        let v = cases();
        let all = v["regression"].as_array().expect("regression cases");
        assert!(all.len() >= 5);
        for case in all {
            let name = case["name"].as_str().expect("name");
            let report = regression(&floats(&case["truth"]), &floats(&case["predicted"]))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            compare(name, &report, case);
            if !strings(&case["absent"]).is_empty() {
                assert!(
                    note_mentions(&report, &["r2"]),
                    "{name}: {:?}",
                    report.notes
                );
            }
        }
    }

    #[test]
    fn close_rejects_differences_beyond_tolerance() {
        assert!(close(
            0.8107416879795397,
            0.8107416879795397 * (1.0 + 5e-10)
        ));
        assert!(!close(
            0.8107416879795397,
            0.8107416879795397 * (1.0 + 5e-9)
        ));
        assert!(!close(0.0, 1e-12));
        assert!(close(0.0, 0.0));
    }

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn binary<'a>(
        classes: &'a [String],
        truth: &'a [usize],
        predicted: &'a [usize],
    ) -> Classification<'a> {
        Classification {
            classes,
            truth,
            predicted,
            proba: None,
            groups: None,
            privileged: None,
            positive: 1,
        }
    }

    #[test]
    fn r2_of_constant_truth_is_zero_even_when_the_mean_rounds() {
        // sklearn 1.9 returns about -1.7e31 here: numpy's mean of [0.1, 0.1, 0.1] is not 0.1,
        // so its denominator is tiny but not zero. The documented convention is 0.0.
        let r = regression(&[0.1, 0.1, 0.1], &[0.1, 0.1, 0.2]).unwrap();
        assert_eq!(r.metrics["r2"], 0.0);
        assert!(note_mentions(&r, &["r2", "constant"]));
        let r = regression(&[0.1, 0.1, 0.1], &[0.1, 0.1, 0.1]).unwrap();
        assert_eq!(r.metrics["r2"], 1.0);
    }

    #[test]
    fn roc_auc_treats_signed_zeros_as_one_threshold() {
        let classes = labels(&["n", "p"]);
        let truth = [0, 1, 0, 1];
        let predicted = [0, 0, 0, 0];
        let proba = [1.0, -0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0];
        let c = Classification {
            proba: Some(&proba),
            ..binary(&classes, &truth, &predicted)
        };
        let r = classification(&c).unwrap();
        assert_eq!(r.metrics["roc_auc"], 0.5);
        // log_loss is computed (values within [0, 1]; -0.0 counts as 0).
        assert!(r.metrics.contains_key("log_loss"));
    }

    #[test]
    fn roc_auc_with_one_true_class_is_absent_with_note() {
        let classes = labels(&["n", "p"]);
        let truth = [1, 1, 1];
        let predicted = [1, 0, 1];
        let proba = [0.2, 0.8, 0.6, 0.4, 0.1, 0.9];
        let c = Classification {
            proba: Some(&proba),
            ..binary(&classes, &truth, &predicted)
        };
        let r = classification(&c).unwrap();
        assert!(!r.metrics.contains_key("roc_auc"));
        assert!(note_mentions(&r, &["roc_auc", "\"p\""]), "{:?}", r.notes);
        assert!(r.metrics.contains_key("log_loss"));
    }

    #[test]
    fn scores_outside_unit_interval_skip_log_loss_and_multiclass_roc_auc() {
        let classes = labels(&["n", "p"]);
        let truth = [0, 1, 0, 1];
        let predicted = [0, 1, 1, 1];
        let margins = [2.0, -2.0, -1.0, 1.0, -0.5, 0.5, -3.0, 3.0];
        let c = Classification {
            proba: Some(&margins),
            ..binary(&classes, &truth, &predicted)
        };
        let r = classification(&c).unwrap();
        assert_eq!(r.metrics["roc_auc"], 1.0); // binary roc_auc only ranks scores
        assert!(!r.metrics.contains_key("log_loss"));
        assert!(
            note_mentions(&r, &["log_loss", "row 0", "outside [0, 1]"]),
            "{:?}",
            r.notes
        );

        let classes = labels(&["a", "b", "c"]);
        let truth = [0, 1, 2];
        let predicted = [0, 1, 2];
        let proba = [0.8, 0.1, 0.1, 0.1, 0.8, 0.1, 0.1, 0.1, 0.5];
        let c = Classification {
            proba: Some(&proba),
            ..binary(&classes, &truth, &predicted)
        };
        let r = classification(&c).unwrap();
        assert!(!r.metrics.contains_key("roc_auc"));
        assert!(
            note_mentions(&r, &["roc_auc", "row 2", "sum to 1"]),
            "{:?}",
            r.notes
        );
        assert!(
            note_mentions(&r, &["log_loss", "row 2", "do not sum to 1"]),
            "{:?}",
            r.notes
        );
        assert!(r.metrics.contains_key("log_loss"));
    }

    #[test]
    fn classification_without_proba_notes_missing_metrics() {
        let classes = labels(&["n", "p"]);
        let r = classification(&binary(&classes, &[0, 1], &[0, 0])).unwrap();
        assert!(note_mentions(
            &r,
            &["roc_auc", "log_loss", "no probabilities"]
        ));
        assert!(note_mentions(
            &r,
            &["precision", "\"p\"", "never predicted"]
        ));
        assert_eq!(r.metrics["precision"], 0.0);
        assert_eq!(r.metrics["f1"], 0.0);
    }

    #[test]
    fn fairness_ties_keep_first_group_and_undefined_fpr_is_left_out() {
        let classes = labels(&["n", "p"]);
        let groups = labels(&["r", "r", "r", "r", "a", "a", "b", "b", "c"]);
        let truth = [1, 0, 1, 0, 1, 0, 1, 0, 1];
        // Selection: r 2/4 = 0.5, a 2/2 = 1.0 (+0.5), b 0/2 = 0.0 (-0.5), c 1/1.
        let predicted = [1, 0, 1, 0, 1, 1, 0, 0, 1];
        let c = Classification {
            groups: Some(&groups),
            ..binary(&classes, &truth, &predicted)
        };
        let r = classification(&c).unwrap();
        // c: 1.0 - 0.5 = +0.5 too; a comes first among the equals.
        assert_eq!(r.metrics["statistical_parity_difference"], 0.5);
        assert!(note_mentions(
            &r,
            &["statistical_parity_difference", "group \"a\""]
        ));
        assert!(note_mentions(&r, &["reference group \"r\"", "most rows"]));
        // c has no negatives: FPR undefined, left out of average_odds only.
        let gc = r.groups.iter().find(|g| g.group == "c").unwrap();
        assert_eq!(gc.false_positive_rate, None);
        assert!(note_mentions(
            &r,
            &["average_odds_difference", "group \"c\" left out", "FPR"]
        ));
        // EOD: a 1-1 = 0, b 0-1 = -1, c 1-1 = 0 -> -1 from b.
        assert_eq!(r.metrics["equal_opportunity_difference"], -1.0);
        // AOD: a ((1-0)+(1-1))/2 = 0.5, b ((0-0)+(0-1))/2 = -0.5 -> a first.
        assert_eq!(r.metrics["average_odds_difference"], 0.5);
    }

    #[test]
    fn fairness_single_group_and_missing_reference_rates() {
        let classes = labels(&["n", "p"]);
        let groups = labels(&["x", "x"]);
        let c = Classification {
            groups: Some(&groups),
            ..binary(&classes, &[0, 1], &[0, 1])
        };
        let r = classification(&c).unwrap();
        for m in FAIRNESS_METRICS {
            assert!(!r.metrics.contains_key(*m));
        }
        assert!(note_mentions(&r, &["fairness metrics", "\"x\""]));
        assert_eq!(r.groups.len(), 1);

        // Reference "x" has no positives: equal_opportunity and average_odds absent.
        let groups = labels(&["x", "x", "y"]);
        let c = Classification {
            groups: Some(&groups),
            privileged: Some("x"),
            ..binary(&classes, &[0, 0, 1], &[0, 1, 1])
        };
        let r = classification(&c).unwrap();
        assert_eq!(r.metrics["statistical_parity_difference"], 0.5);
        for m in ["equal_opportunity_difference", "average_odds_difference"] {
            assert!(!r.metrics.contains_key(m));
            assert!(note_mentions(
                &r,
                &[m, "reference group \"x\"", "TPR undefined"]
            ));
        }
    }

    // ---- errors ----

    fn err(c: &Classification) -> (MetricsError, String) {
        let e = classification(c).unwrap_err();
        let text = e.to_string();
        (e, text)
    }

    #[test]
    fn error_empty_inputs() {
        let classes = labels(&["n", "p"]);
        let (e, text) = err(&binary(&classes, &[], &[]));
        assert_eq!(e, MetricsError::Empty("truth"));
        assert!(text.contains("`truth` is empty"), "{text}");
        let (e, _) = err(&binary(&[], &[0], &[0]));
        assert_eq!(e, MetricsError::Empty("classes"));
        let one = labels(&["only"]);
        let c = Classification {
            positive: 0,
            ..binary(&one, &[0], &[0])
        };
        let (e, text) = err(&c);
        assert_eq!(e, MetricsError::TooFewClasses(1));
        assert!(text.contains("at least 2"), "{text}");
        let e = regression(&[], &[]).unwrap_err();
        assert_eq!(e, MetricsError::Empty("truth"));
    }

    #[test]
    fn error_length_mismatches_name_slices_and_lengths() {
        let classes = labels(&["n", "p"]);
        let (_, text) = err(&binary(&classes, &[0, 1, 1], &[0, 1]));
        assert_eq!(
            text,
            "length mismatch: `truth` has 3 rows but `predicted` has 2"
        );
        let groups = labels(&["a"]);
        let c = Classification {
            groups: Some(&groups),
            ..binary(&classes, &[0, 1], &[0, 1])
        };
        let (_, text) = err(&c);
        assert_eq!(
            text,
            "length mismatch: `truth` has 2 rows but `groups` has 1"
        );
        let proba = [0.5, 0.5, 0.5];
        let c = Classification {
            proba: Some(&proba),
            ..binary(&classes, &[0, 1], &[0, 1])
        };
        let (e, text) = err(&c);
        assert_eq!(
            e,
            MetricsError::ProbaShape {
                len: 3,
                rows: 2,
                classes: 2
            }
        );
        assert!(
            text.contains("`proba` has 3 values") && text.contains("2 x 2"),
            "{text}"
        );
        let text = regression(&[1.0, 2.0], &[1.0]).unwrap_err().to_string();
        assert_eq!(
            text,
            "length mismatch: `truth` has 2 rows but `predicted` has 1"
        );
    }

    #[test]
    fn error_index_out_of_range_names_row() {
        let classes = labels(&["n", "p"]);
        let (e, text) = err(&binary(&classes, &[0, 1, 2], &[0, 1, 1]));
        assert_eq!(
            e,
            MetricsError::IndexOutOfRange {
                slice: "truth",
                row: 2,
                index: 2,
                classes: 2
            }
        );
        assert_eq!(text, "truth[2] = 2 is out of range: there are 2 classes");
        let (_, text) = err(&binary(&classes, &[0, 1, 1], &[0, 7, 1]));
        assert_eq!(
            text,
            "predicted[1] = 7 is out of range: there are 2 classes"
        );
        let c = Classification {
            positive: 2,
            ..binary(&classes, &[0], &[0])
        };
        let (_, text) = err(&c);
        assert_eq!(
            text,
            "positive class index 2 is out of range: there are 2 classes"
        );
    }

    #[test]
    fn error_non_finite_proba_names_row() {
        let classes = labels(&["n", "p"]);
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let proba = [0.5, 0.5, 0.2, 0.8, 0.1, bad];
            let c = Classification {
                proba: Some(&proba),
                ..binary(&classes, &[0, 1, 1], &[0, 1, 1])
            };
            let (e, text) = err(&c);
            assert!(
                matches!(
                    e,
                    MetricsError::NonFiniteProba {
                        row: 2,
                        column: 1,
                        ..
                    }
                ),
                "{e:?}"
            );
            assert!(text.starts_with("proba row 2 is not finite"), "{text}");
        }
    }

    #[test]
    fn error_unknown_privileged_group_lists_groups() {
        let classes = labels(&["n", "p"]);
        let groups = labels(&["south", "north", "south"]);
        let c = Classification {
            groups: Some(&groups),
            privileged: Some("east"),
            ..binary(&classes, &[0, 1, 1], &[0, 1, 1])
        };
        let (_, text) = err(&c);
        assert_eq!(
            text,
            "privileged group \"east\" does not occur in `groups`; groups seen: \"north\", \"south\""
        );
    }

    #[test]
    fn error_regression_non_finite_names_row() {
        let e = regression(&[1.0, f64::NAN], &[1.0, 2.0]).unwrap_err();
        assert_eq!(e.to_string(), "regression truth[1] is not finite: NaN");
        let e = regression(&[1.0, 2.0, 3.0], &[1.0, 2.0, f64::INFINITY]).unwrap_err();
        assert_eq!(e.to_string(), "regression predicted[2] is not finite: inf");
    }

    // ---- requirements ----

    #[test]
    fn requirement_parses_good_strings() {
        let cases = [
            (
                "accuracy>=0.9",
                "accuracy",
                false,
                Cmp::Ge,
                0.9,
                "accuracy>=0.9",
            ),
            (" f1 > 0.5 ", "f1", false, Cmp::Gt, 0.5, "f1>0.5"),
            (
                "log_loss<=0.35",
                "log_loss",
                false,
                Cmp::Le,
                0.35,
                "log_loss<=0.35",
            ),
            ("mse <1e-3", "mse", false, Cmp::Lt, 1e-3, "mse<1e-3"),
            ("r2>=-0.5", "r2", false, Cmp::Ge, -0.5, "r2>=-0.5"),
            (
                "abs(statistical_parity_difference)<=0.1",
                "statistical_parity_difference",
                true,
                Cmp::Le,
                0.1,
                "abs(statistical_parity_difference)<=0.1",
            ),
            (
                "  abs ( average_odds_difference ) < .2",
                "average_odds_difference",
                true,
                Cmp::Lt,
                0.2,
                "abs(average_odds_difference)<.2",
            ),
        ];
        for (s, metric, abs, op, threshold, text) in cases {
            let r = Requirement::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(
                r,
                Requirement {
                    metric: metric.to_string(),
                    abs,
                    op,
                    threshold,
                    text: text.to_string()
                },
                "{s}"
            );
            assert_eq!(r.to_string(), text);
            assert_eq!(s.parse::<Requirement>().unwrap(), r);
        }
    }

    #[test]
    fn requirement_rejects_bad_strings() {
        for s in [
            "",
            "accuracy",
            "accuracy=0.9",
            "accuracy==0.9",
            ">=0.5",
            "abs()<=0.1",
        ] {
            let e = Requirement::parse(s).unwrap_err();
            assert!(
                matches!(e, MetricsError::BadRequirement { .. }),
                "{s}: {e:?}"
            );
        }
        for s in ["accuracy=>0.9", "accuracy!<0.9"] {
            let e = Requirement::parse(s).unwrap_err();
            assert!(e.to_string().contains("unsupported operator"), "{s}: {e}");
        }
        let e = Requirement::parse("abs(f1<=0.3").unwrap_err();
        assert!(e.to_string().contains("parenthesis"), "{e}");
        for s in [
            "accuracy>=",
            "accuracy>=abc",
            "accuracy>=NaN",
            "accuracy>=inf",
            "f1>=0.9<=1",
            "f1>=<1",
        ] {
            let e = Requirement::parse(s).unwrap_err();
            assert!(matches!(e, MetricsError::BadNumber { .. }), "{s}: {e:?}");
            assert!(e.to_string().contains("is not a finite number"), "{s}: {e}");
        }
        let e = Requirement::parse("acc>=0.9").unwrap_err();
        assert_eq!(
            e,
            MetricsError::UnknownMetric {
                requirement: "acc>=0.9".to_string(),
                metric: "acc".to_string()
            }
        );
        let text = e.to_string();
        for m in known_metrics() {
            assert!(text.contains(m), "{text} lacks {m}");
        }
        assert_eq!(known_metrics().count(), 13);
        // Names are case-sensitive.
        assert!(Requirement::parse("Accuracy>=0.9").is_err());
    }

    #[test]
    fn requirement_check() {
        let m: Metrics = [
            ("accuracy".to_string(), 0.9),
            ("statistical_parity_difference".to_string(), -0.15),
            ("r2".to_string(), f64::NAN),
        ]
        .into_iter()
        .collect();
        let check = |s: &str| Requirement::parse(s).unwrap().check(&m);
        for (s, met) in [
            ("accuracy>=0.9", true),
            ("accuracy>0.9", false),
            ("accuracy<=0.9", true),
            ("accuracy<0.9", false),
            ("accuracy>=0.91", false),
            ("accuracy<0.91", true),
            ("statistical_parity_difference<=0.1", true),
            ("abs(statistical_parity_difference)<=0.1", false),
            ("abs(statistical_parity_difference)<=0.15", true),
            ("r2>=0", false),
            ("r2<0", false),
        ] {
            assert_eq!(check(s).met, met, "{s}");
        }
        let o = check(" abs( statistical_parity_difference )  <= 0.2");
        assert_eq!(
            o,
            Outcome {
                requirement: "abs(statistical_parity_difference)<=0.2".to_string(),
                measured: Some(0.15),
                met: true
            }
        );
        let o = check("f1>=0.5");
        assert_eq!(
            o,
            Outcome {
                requirement: "f1>=0.5".to_string(),
                measured: None,
                met: false
            }
        );
    }
}
