//! `fleetctl bundle build`: model + data -> schema, reference profile, holdout signoff
//! metrics with `--require` gates, golden samples, provenance -> a signed bundle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde_json::{json, Map, Value};
use shared::bundle::manifest::{
    check_model_name, GroupMetrics, PredictionProfile, PredictionScore, RequirementResult,
};
use shared::bundle::{
    self, Compatibility, DataFile, FeatureSchema, Golden, GoldenSample, Limits, Manifest, Payload,
    Provenance, ReferenceProfile, Schema, Signoff, TensorSchema, MANIFEST_FORMAT,
};
use shared::engine::{ElemType, EngineError, Labels, Model};
use shared::metrics::{self, Classification, Requirement};
use shared::trust::{format_time, KeyringFile, SecretKey, Trust};
use time::OffsetDateTime;

use super::table::Table;
use super::{cant_create, fmt_metric, mlflow, no_input, trust_file_error, CtlError, Output};

/// Rows scored per engine call.
const BATCH: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Task {
    Classification,
    Regression,
}

/// Arguments of `fleetctl bundle build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The ONNX model.
    #[arg(
        long,
        value_name = "FILE.onnx",
        required_unless_present = "mlflow_model",
        conflicts_with = "mlflow_model"
    )]
    pub model: Option<PathBuf>,
    /// An MLflow model directory (MLmodel with the onnx flavor) instead of --model.
    #[arg(long, value_name = "DIR")]
    pub mlflow_model: Option<PathBuf>,
    /// Model name ([A-Za-z0-9._-], at most 64 bytes).
    #[arg(long)]
    pub name: String,
    /// Version string shown to people.
    #[arg(long)]
    pub version: String,
    /// Release number, monotonic per model name.
    #[arg(long)]
    pub release: u64,
    /// The signing key (NAME.key from `fleetctl keygen`).
    #[arg(long, value_name = "FILE.key")]
    pub key: PathBuf,
    /// The keyring the devices hold: the key must be in it, valid, and allowed for --name.
    #[arg(long, value_name = "FILE")]
    pub keyring: Option<PathBuf>,
    /// CSV sample of the training distribution: the drift reference profile.
    #[arg(long, value_name = "FILE.csv")]
    pub reference: Option<PathBuf>,
    /// Labelled CSV for signoff metrics: the model's feature columns plus --label-column.
    #[arg(long, value_name = "FILE.csv")]
    pub holdout: Option<PathBuf>,
    /// The holdout column holding the true label (or target value).
    #[arg(long, value_name = "COL")]
    pub label_column: Option<String>,
    /// The holdout column holding the group for fairness metrics.
    #[arg(long, value_name = "COL")]
    pub group_column: Option<String>,
    /// The reference ("privileged") group for fairness metrics (default: the largest).
    #[arg(long, value_name = "VALUE")]
    pub reference_group: Option<String>,
    /// The positive class (default: the second class of a binary classifier).
    #[arg(long, value_name = "LABEL")]
    pub positive_label: Option<String>,
    /// A signoff gate such as 'roc_auc>=0.9' or 'abs(statistical_parity_difference)<=0.1';
    /// repeatable. Any unmet gate fails the build (exit 1) and no bundle is written.
    #[arg(long = "require", value_name = "METRIC>=X")]
    pub require: Vec<String>,
    /// Number of golden samples (rows re-run on the device before activation).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub golden: u32,
    /// Golden relative tolerance for floats.
    #[arg(long, default_value_t = 1e-4)]
    pub golden_rtol: f64,
    /// Golden absolute tolerance for floats.
    #[arg(long, default_value_t = 1e-5)]
    pub golden_atol: f64,
    /// Task (default: classification when the model has a classifier node).
    #[arg(long, value_enum)]
    pub task: Option<Task>,
    /// Quantile bins per feature in the reference profile.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub bins: u32,
    /// Git commit of the training code (default: $GITHUB_SHA, $CI_COMMIT_SHA, $GIT_COMMIT).
    #[arg(long)]
    pub git_commit: Option<String>,
    /// Training run id (default: the MLflow run_id, or $MLFLOW_RUN_ID).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Mark the bundle as an explicit, signed rollback that may replace a higher release.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// Where to write the bundle (written only when every gate passed).
    #[arg(long, value_name = "FILE.bundle")]
    pub out: PathBuf,
}

/// How data columns feed the model.
#[derive(Debug, Clone)]
enum Layout {
    /// One 2-D input; features are columns named by `names`.
    Single { input: String, names: Vec<String> },
    /// One column per input (each input takes one value per row).
    PerInput {
        names: Vec<String>,
        elems: Vec<ElemType>,
    },
}

impl Layout {
    fn names(&self) -> &[String] {
        match self {
            Layout::Single { names, .. } | Layout::PerInput { names, .. } => names,
        }
    }

    fn elem(&self, model: &Model, ix: usize) -> ElemType {
        match self {
            Layout::Single { .. } => model.inputs()[0].elem,
            Layout::PerInput { elems, .. } => elems[ix],
        }
    }
}

fn usage(m: impl Into<String>) -> CtlError {
    CtlError::Usage(m.into())
}

fn engine_error(path: &Path, e: EngineError) -> CtlError {
    match e {
        EngineError::Io { source, .. } => no_input(path, source),
        other => CtlError::Data(format!("{}: {other}", path.display())),
    }
}

/// Decides the feature columns: the model's `feature_names`, else the data's columns (minus
/// label and group), else `f0..fN`; per-input models use their input names.
fn layout(model: &Model, data: Option<&Table>, exclude: &[&str]) -> Result<Layout, CtlError> {
    let inputs = model.inputs();
    match inputs {
        [only] if only.map_value.is_none() && only.shape.len() == 2 => {
            let width = only.shape[1];
            let names: Vec<String> = if let Some(f) = model.feature_names() {
                f.to_vec()
            } else if let Some(t) = data {
                t.header
                    .iter()
                    .filter(|h| !exclude.contains(&h.as_str()))
                    .cloned()
                    .collect()
            } else {
                (0..width.unwrap_or(0)).map(|i| format!("f{i}")).collect()
            };
            if let Some(w) = width {
                if names.len() != w {
                    return Err(CtlError::Data(format!(
                        "the model's input {:?} takes {w} features, {} feature columns were found ({})",
                        only.name,
                        names.len(),
                        names.join(", ")
                    )));
                }
            }
            Ok(Layout::Single {
                input: only.name.clone(),
                names,
            })
        }
        _ => {
            if let Some(bad) = inputs
                .iter()
                .find(|i| i.map_value.is_some() || i.width() != 1)
            {
                return Err(CtlError::Data(format!(
                    "input {:?} takes {} per row; bundle build reads one CSV column per input",
                    bad.name,
                    if bad.map_value.is_some() {
                        "a map".to_string()
                    } else {
                        format!("{} values", bad.width())
                    }
                )));
            }
            Ok(Layout::PerInput {
                names: inputs.iter().map(|i| i.name.clone()).collect(),
                elems: inputs.iter().map(|i| i.elem).collect(),
            })
        }
    }
}

/// Parses a numeric cell: empty or NaN is missing (NaN), anything else must be a number.
fn number(t: &Table, row: usize, col: &str, cell: &str) -> Result<f64, CtlError> {
    let c = cell.trim();
    if c.is_empty() || c.eq_ignore_ascii_case("nan") {
        return Ok(f64::NAN);
    }
    c.parse::<f64>().map_err(|_| {
        CtlError::Data(format!(
            "{}: line {}, column {col:?}: {c:?} is not a number",
            t.path.display(),
            t.line(row)
        ))
    })
}

/// The column indexes of the layout's features in `t`.
fn feature_columns(t: &Table, layout: &Layout) -> Result<Vec<usize>, CtlError> {
    layout
        .names()
        .iter()
        .map(|n| t.column(n, "a model feature"))
        .collect()
}

/// Numeric values per feature (NaN = missing); `None` for non-numeric features.
fn feature_values(
    t: &Table,
    layout: &Layout,
    model: &Model,
    cols: &[usize],
) -> Result<Vec<Option<Vec<f64>>>, CtlError> {
    let mut out = Vec::with_capacity(cols.len());
    for (fi, &c) in cols.iter().enumerate() {
        if !layout.elem(model, fi).is_numeric() {
            out.push(None);
            continue;
        }
        let name = &layout.names()[fi];
        let mut v = Vec::with_capacity(t.records.len());
        for (r, rec) in t.records.iter().enumerate() {
            v.push(number(t, r, name, rec.get(c).unwrap_or(""))?);
        }
        out.push(Some(v));
    }
    Ok(out)
}

/// One row as the engine's JSON input.
fn json_row(
    t: &Table,
    row: usize,
    layout: &Layout,
    model: &Model,
    cols: &[usize],
) -> Result<Option<Map<String, Value>>, CtlError> {
    let rec = &t.records[row];
    let mut values = Vec::with_capacity(cols.len());
    for (fi, &c) in cols.iter().enumerate() {
        let cell = rec.get(c).unwrap_or("");
        let name = &layout.names()[fi];
        let v = match layout.elem(model, fi) {
            ElemType::String => Value::String(cell.to_string()),
            ElemType::Bool => Value::Bool(matches!(cell.trim(), "1" | "true" | "True")),
            ElemType::I64 | ElemType::I32 => match cell.trim().parse::<i64>() {
                Ok(i) => json!(i),
                Err(_) => return Ok(None),
            },
            _ => {
                let x = number(t, row, name, cell)?;
                if !x.is_finite() {
                    return Ok(None); // rows with missing values are not used as golden
                }
                json!(x)
            }
        };
        values.push(v);
    }
    let mut obj = Map::new();
    match layout {
        Layout::Single { input, .. } if model.feature_names().is_none() => {
            obj.insert(input.clone(), Value::Array(values));
        }
        _ => {
            for (name, v) in layout.names().iter().zip(values) {
                obj.insert(name.clone(), v);
            }
        }
    }
    Ok(Some(obj))
}

/// Runs `rows` of `t` through the model in batches, calling `each(row, outputs, i)`.
fn score(
    model: &Model,
    t: &Table,
    layout: &Layout,
    cols: &[usize],
    mut each: impl FnMut(usize, &shared::engine::Outputs, usize) -> Result<(), CtlError>,
) -> Result<(), CtlError> {
    let mut start = 0;
    while start < t.records.len() {
        let end = (start + BATCH).min(t.records.len());
        let mut b = model.batch_builder();
        b.set_header(layout.names())
            .map_err(|e| CtlError::Data(format!("{}: {e}", t.path.display())))?;
        for r in start..end {
            let rec = &t.records[r];
            let cells: Vec<&str> = cols.iter().map(|&c| rec.get(c).unwrap_or("")).collect();
            b.push_csv(&cells, t.line(r))
                .map_err(|e| CtlError::Data(format!("{}: {e}", t.path.display())))?;
        }
        let batch = b.take();
        let out = model
            .run(&batch)
            .map_err(|e| CtlError::Data(format!("{}: {e}", t.path.display())))?;
        for r in start..end {
            each(r, &out, r - start)?;
        }
        start = end;
    }
    Ok(())
}

fn label_key(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => n.as_i64().map(|i| i.to_string()),
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The key of a true label cell for `labels` ("1.0" is class 1 of an integer classifier).
fn truth_key(labels: &Labels, cell: &str) -> Option<String> {
    let c = cell.trim();
    match labels {
        Labels::Int(_) => c
            .parse::<i64>()
            .ok()
            .or_else(|| {
                c.parse::<f64>()
                    .ok()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                    .map(|f| f as i64)
            })
            .map(|i| i.to_string()),
        Labels::Str(_) => Some(c.to_string()),
    }
}

struct Signed {
    signoff: Signoff,
    outcomes: Vec<metrics::Outcome>,
}

/// A data table and how its columns feed the model.
struct Data<'a> {
    t: &'a Table,
    layout: &'a Layout,
    cols: &'a [usize],
}

fn classify(
    args: &BuildArgs,
    model: &Model,
    d: &Data,
    label_col: usize,
    group_col: Option<usize>,
    requirements: &[Requirement],
) -> Result<Signed, CtlError> {
    let (t, layout, cols) = (d.t, d.layout, d.cols);
    let labels = model.class_labels().ok_or_else(|| {
        CtlError::Data(
            "--task classification: the model has no classifier node with class labels".into(),
        )
    })?;
    let classes: Vec<String> = (0..labels.len()).map(|i| labels.key(i)).collect();
    let index: HashMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let outputs = model.outputs();
    let label_out = outputs
        .iter()
        .position(|o| o.zipmap.is_none() && matches!(o.elem, ElemType::I64 | ElemType::String))
        .ok_or_else(|| {
            CtlError::Data("the classifier has no label output (int64 or string)".into())
        })?;
    let proba_out = outputs.iter().enumerate().position(|(i, o)| {
        i != label_out && (o.zipmap.is_some() || matches!(o.elem, ElemType::F32 | ElemType::F64))
    });
    let label_name = args.label_column.as_deref().unwrap_or_default();
    let mut truth = Vec::with_capacity(t.records.len());
    for (r, rec) in t.records.iter().enumerate() {
        let cell = rec.get(label_col).unwrap_or("");
        let key = truth_key(labels, cell);
        match key.as_deref().and_then(|k| index.get(k)) {
            Some(&i) => truth.push(i),
            None => {
                return Err(CtlError::Data(format!(
                    "{}: line {}, column {label_name:?}: {cell:?} is not one of the model's classes ({})",
                    t.path.display(),
                    t.line(r),
                    classes.join(", ")
                )))
            }
        }
    }
    let mut predicted = Vec::with_capacity(t.records.len());
    let mut proba: Vec<f64> = Vec::new();
    score(model, t, layout, cols, |r, out, i| {
        let v = model.render(out, label_out, i);
        let ix = label_key(&v).and_then(|k| index.get(k.as_str()).copied());
        predicted.push(ix.ok_or_else(|| {
            CtlError::Data(format!(
                "{}: line {}: the model predicted {v}, which is not among its classes",
                t.path.display(),
                t.line(r)
            ))
        })?);
        if let Some(p) = proba_out {
            let v = model.render(out, p, i);
            let row: Vec<f64> = match &v {
                Value::Array(a) => a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect(),
                Value::Object(o) => classes
                    .iter()
                    .map(|c| o.get(c).and_then(Value::as_f64).unwrap_or(f64::NAN))
                    .collect(),
                other => vec![other.as_f64().unwrap_or(f64::NAN)],
            };
            if row.len() != classes.len() {
                return Err(CtlError::Data(format!(
                    "output {:?} has {} values per row for {} classes",
                    outputs[p].name,
                    row.len(),
                    classes.len()
                )));
            }
            proba.extend(row);
        }
        Ok(())
    })?;
    let positive = match &args.positive_label {
        Some(p) => {
            let key = truth_key(labels, p).unwrap_or_default();
            *index.get(key.as_str()).ok_or_else(|| {
                usage(format!(
                    "--positive-label {p:?} is not one of the model's classes ({})",
                    classes.join(", ")
                ))
            })?
        }
        None if classes.len() == 2 => 1,
        None if group_col.is_some() => {
            return Err(usage(format!(
                "fairness metrics of a {}-class model need --positive-label",
                classes.len()
            )))
        }
        None => 0,
    };
    let groups: Option<Vec<String>> = group_col.map(|g| {
        t.records
            .iter()
            .map(|r| r.get(g).unwrap_or("").trim().to_string())
            .collect()
    });
    let report = metrics::classification(&Classification {
        classes: &classes,
        truth: &truth,
        predicted: &predicted,
        proba: proba_out.map(|_| proba.as_slice()),
        groups: groups.as_deref(),
        privileged: args.reference_group.as_deref(),
        positive,
    })
    .map_err(|e| CtlError::Data(format!("{}: {e}", t.path.display())))?;
    let reference_group = groups.as_ref().map(|_| {
        args.reference_group.clone().unwrap_or_else(|| {
            report
                .groups
                .iter()
                .max_by(|a, b| a.rows.cmp(&b.rows).then(b.group.cmp(&a.group)))
                .map(|g| g.group.clone())
                .unwrap_or_default()
        })
    });
    Ok(finish_signoff(
        "classification",
        args,
        t,
        report,
        requirements,
        (classes.len() == 2 || args.positive_label.is_some()).then(|| classes[positive].clone()),
        reference_group,
    ))
}

fn regress(
    args: &BuildArgs,
    model: &Model,
    d: &Data,
    label_col: usize,
    requirements: &[Requirement],
) -> Result<Signed, CtlError> {
    let (t, layout, cols) = (d.t, d.layout, d.cols);
    let out_ix = model
        .outputs()
        .iter()
        .position(|o| matches!(o.elem, ElemType::F32 | ElemType::F64))
        .ok_or_else(|| CtlError::Data("--task regression: the model has no float output".into()))?;
    let label_name = args.label_column.as_deref().unwrap_or_default();
    let mut truth = Vec::with_capacity(t.records.len());
    for (r, rec) in t.records.iter().enumerate() {
        let v = number(t, r, label_name, rec.get(label_col).unwrap_or(""))?;
        if !v.is_finite() {
            return Err(CtlError::Data(format!(
                "{}: line {}, column {label_name:?}: the target value is missing",
                t.path.display(),
                t.line(r)
            )));
        }
        truth.push(v);
    }
    let mut predicted = Vec::with_capacity(t.records.len());
    score(model, t, layout, cols, |r, out, i| {
        let v = model.render(out, out_ix, i);
        let x = match &v {
            Value::Array(a) if a.len() == 1 => a[0].as_f64(),
            other => other.as_f64(),
        };
        predicted.push(x.ok_or_else(|| {
            CtlError::Data(format!(
                "{}: line {}: the model's output {v} is not one number",
                t.path.display(),
                t.line(r)
            ))
        })?);
        Ok(())
    })?;
    let report = metrics::regression(&truth, &predicted)
        .map_err(|e| CtlError::Data(format!("{}: {e}", t.path.display())))?;
    Ok(finish_signoff(
        "regression",
        args,
        t,
        report,
        requirements,
        None,
        None,
    ))
}

/// The profile of the model's prediction score over `d`'s rows: a regressor's value; a
/// classifier's probability of the positive class (`--positive-label`, or the second class
/// of a binary classifier), else its top probability. `None` for a classifier without a
/// probability output.
fn prediction_profile(
    args: &BuildArgs,
    model: &Model,
    task: Task,
    d: &Data,
) -> Result<Option<PredictionProfile>, String> {
    let outputs = model.outputs();
    let mut values = Vec::with_capacity(d.t.records.len());
    let (out_ix, kind, class) = match task {
        Task::Regression => {
            let ix = outputs
                .iter()
                .position(|o| matches!(o.elem, ElemType::F32 | ElemType::F64))
                .ok_or("the model has no float output")?;
            (ix, PredictionScore::Value, None)
        }
        Task::Classification => {
            let Some(labels) = model.class_labels() else {
                return Err("the model has no classifier node with class labels".into());
            };
            let classes: Vec<String> = (0..labels.len()).map(|i| labels.key(i)).collect();
            let Some(ix) = outputs.iter().position(|o| {
                o.zipmap.is_some() || matches!(o.elem, ElemType::F32 | ElemType::F64)
            }) else {
                return Ok(None);
            };
            let positive = match &args.positive_label {
                Some(p) => {
                    let key = truth_key(labels, p).unwrap_or_default();
                    Some(
                        classes
                            .iter()
                            .position(|c| *c == key)
                            .ok_or_else(|| format!("--positive-label {p:?} is not a class"))?,
                    )
                }
                None if classes.len() == 2 => Some(1),
                None => None,
            };
            match positive {
                Some(p) => (
                    ix,
                    PredictionScore::ClassProbability,
                    Some((p, classes[p].clone())),
                ),
                None => (ix, PredictionScore::TopProbability, None),
            }
        }
    };
    let name = &outputs[out_ix].name;
    score(model, d.t, d.layout, d.cols, |_, out, i| {
        let v = model.render(out, out_ix, i);
        let x = match (&v, kind, &class) {
            (Value::Object(o), PredictionScore::ClassProbability, Some((_, c))) => {
                o.get(c).and_then(Value::as_f64)
            }
            (Value::Object(o), _, _) => o.values().filter_map(Value::as_f64).reduce(f64::max),
            (Value::Array(a), PredictionScore::ClassProbability, Some((k, _))) => {
                a.get(*k).and_then(Value::as_f64)
            }
            (Value::Array(a), PredictionScore::TopProbability, _) => {
                a.iter().filter_map(Value::as_f64).reduce(f64::max)
            }
            (Value::Array(a), _, _) if a.len() == 1 => a[0].as_f64(),
            (other, _, _) => other.as_f64(),
        };
        values.push(x.unwrap_or(f64::NAN));
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok(Some(PredictionProfile {
        output: name.clone(),
        score: kind,
        class: class.map(|(_, c)| c),
        profile: shared::drift::profile("prediction", &values, args.bins as usize),
    }))
}

fn finish_signoff(
    task: &str,
    args: &BuildArgs,
    t: &Table,
    report: metrics::Report,
    requirements: &[Requirement],
    positive_label: Option<String>,
    reference_group: Option<String>,
) -> Signed {
    let outcomes: Vec<metrics::Outcome> = requirements
        .iter()
        .map(|r| r.check(&report.metrics))
        .collect();
    let signoff = Signoff {
        task: task.into(),
        rows: t.records.len() as u64,
        label_column: args.label_column.clone().unwrap_or_default(),
        group_column: args.group_column.clone(),
        positive_label,
        reference_group,
        metrics: report.metrics,
        groups: report
            .groups
            .into_iter()
            .map(|g| GroupMetrics {
                group: g.group,
                rows: g.rows,
                selection_rate: g.selection_rate,
                true_positive_rate: g.true_positive_rate,
                false_positive_rate: g.false_positive_rate,
            })
            .collect(),
        requirements: outcomes
            .iter()
            .map(|o| RequirementResult {
                requirement: o.requirement.clone(),
                measured: o.measured,
                met: o.met,
            })
            .collect(),
        notes: report.notes,
    };
    Signed { signoff, outcomes }
}

fn elem_name(e: ElemType) -> String {
    e.name().to_string()
}

fn env_first(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
}

/// The git commit of the repository holding `dir`, if `git` is available and it is one.
fn git_head(dir: &Path) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && s.len() == 40).then_some(s)
}

/// Checks before any heavy work that `key` may sign `name` under `keyring`.
fn check_key_in_keyring(key: &SecretKey, path: &Path, name: &str) -> Result<(), CtlError> {
    let file = KeyringFile::load(path).map_err(trust_file_error)?;
    let body = file
        .body()
        .map_err(|e| CtlError::Data(format!("{}: {e}", path.display())))?;
    if file.signatures.is_empty() {
        return Err(CtlError::Data(format!(
            "{}: keyring version {} is not signed (run `fleetctl keyring sign`)",
            path.display(),
            body.version
        )));
    }
    let Some(entry) = body.keys.iter().find(|k| k.key_id == key.id.as_str()) else {
        return Err(CtlError::Usage(format!(
            "key {} is not in keyring {} version {}: devices would refuse the bundle",
            key.id,
            path.display(),
            body.version
        )));
    };
    if entry.revoked {
        return Err(CtlError::Usage(format!(
            "key {} is revoked in the keyring",
            key.id
        )));
    }
    if let Some(t) = &entry.not_after {
        let limit = shared::trust::parse_time(t).map_err(CtlError::Data)?;
        if OffsetDateTime::now_utc() > limit {
            return Err(CtlError::Usage(format!("key {} expired at {t}", key.id)));
        }
    }
    if !entry
        .models
        .iter()
        .any(|p| shared::trust::model_allowed(p, name))
    {
        return Err(CtlError::Usage(format!(
            "key {} may not sign model {name:?} (allowed: {})",
            key.id,
            entry.models.join(", ")
        )));
    }
    Ok(())
}

/// `fleetctl bundle build`.
pub fn build(args: &BuildArgs) -> Result<Output, CtlError> {
    // Cheap checks first: arguments, requirements, key, keyring.
    check_model_name(&args.name).map_err(|e| usage(format!("--name: {e}")))?;
    if args.version.is_empty()
        || args.version.len() > 64
        || args.version.chars().any(char::is_control)
    {
        return Err(usage("--version must be 1 to 64 printable characters"));
    }
    if args.holdout.is_some() != args.label_column.is_some() {
        return Err(usage("--holdout and --label-column go together"));
    }
    if args.holdout.is_none() && (args.group_column.is_some() || !args.require.is_empty()) {
        return Err(usage("--group-column and --require need --holdout"));
    }
    if args.reference_group.is_some() && args.group_column.is_none() {
        return Err(usage("--reference-group needs --group-column"));
    }
    if !(args.golden_rtol.is_finite()
        && args.golden_rtol >= 0.0
        && args.golden_atol.is_finite()
        && args.golden_atol >= 0.0)
    {
        return Err(usage("golden tolerances must be finite and non-negative"));
    }
    let requirements: Vec<Requirement> = args
        .require
        .iter()
        .map(|r| Requirement::parse(r).map_err(|e| usage(format!("--require {r:?}: {e}"))))
        .collect::<Result<_, _>>()?;
    let key = SecretKey::load(&args.key).map_err(trust_file_error)?;
    if let Some(k) = &args.keyring {
        check_key_in_keyring(&key, k, &args.name)?;
    }
    let (model_path, ml) = match (&args.model, &args.mlflow_model) {
        (Some(m), _) => (m.clone(), None),
        (None, Some(dir)) => {
            let ml = mlflow::read(dir)?;
            (ml.model_path.clone(), Some(ml))
        }
        (None, None) => return Err(usage("give --model or --mlflow-model")),
    };
    let model = Model::load(&model_path).map_err(|e| engine_error(&model_path, e))?;

    // Data.
    let reference = args.reference.as_deref().map(Table::read).transpose()?;
    let holdout = args.holdout.as_deref().map(Table::read).transpose()?;
    let mut exclude: Vec<&str> = Vec::new();
    if let Some(l) = &args.label_column {
        exclude.push(l);
    }
    if let Some(g) = &args.group_column {
        exclude.push(g);
    }
    let layout = layout(&model, reference.as_ref().or(holdout.as_ref()), &exclude)?;

    // Reference profile and feature ranges.
    let mut features: Vec<FeatureSchema> = layout
        .names()
        .iter()
        .map(|n| FeatureSchema {
            name: n.clone(),
            min: None,
            max: None,
        })
        .collect();
    let mut profile = None;
    let mut notes = Vec::new();
    if let Some(t) = reference.as_ref().or(holdout.as_ref()) {
        let cols = feature_columns(t, &layout)?;
        let values = feature_values(t, &layout, &model, &cols)?;
        let mut profiles = Vec::new();
        for (fi, v) in values.iter().enumerate() {
            let Some(v) = v else {
                notes.push(format!(
                    "feature {:?} is not numeric: no range or drift profile",
                    layout.names()[fi]
                ));
                continue;
            };
            let finite = v.iter().copied().filter(|x| x.is_finite());
            features[fi].min = finite.clone().reduce(f64::min);
            features[fi].max = finite.reduce(f64::max);
            if reference.is_some() {
                profiles.push(shared::drift::profile(
                    &layout.names()[fi],
                    v,
                    args.bins as usize,
                ));
            }
        }
        if reference.is_some() {
            profile = Some(ReferenceProfile {
                rows: t.records.len() as u64,
                features: profiles,
                predictions: None,
            });
        }
    }

    // Signoff on the holdout.
    let task = args.task.unwrap_or(if model.class_labels().is_some() {
        Task::Classification
    } else {
        Task::Regression
    });
    // Prediction drift reference: the model's score on the reference rows.
    if let (Some(t), Some(p)) = (reference.as_ref(), profile.as_mut()) {
        let cols = feature_columns(t, &layout)?;
        let d = Data {
            t,
            layout: &layout,
            cols: &cols,
        };
        match prediction_profile(args, &model, task, &d) {
            Ok(pp) => p.predictions = pp,
            Err(e) => notes.push(format!("no prediction drift profile: {e}")),
        }
    }

    let mut signed = None;
    if let (Some(t), Some(label)) = (&holdout, &args.label_column) {
        let cols = feature_columns(t, &layout)?;
        let label_col = t.column(label, "--label-column")?;
        let group_col = args
            .group_column
            .as_deref()
            .map(|g| t.column(g, "--group-column"))
            .transpose()?;
        let d = Data {
            t,
            layout: &layout,
            cols: &cols,
        };
        signed = Some(match task {
            Task::Classification => {
                classify(args, &model, &d, label_col, group_col, &requirements)?
            }
            Task::Regression => regress(args, &model, &d, label_col, &requirements)?,
        });
    }
    if let Some(s) = &signed {
        let unmet: Vec<metrics::Outcome> = s.outcomes.iter().filter(|o| !o.met).cloned().collect();
        if !unmet.is_empty() {
            return Err(CtlError::Signoff {
                unmet,
                total: s.outcomes.len(),
            });
        }
    }

    // Golden samples: evenly spaced complete rows of the holdout (else the reference).
    let mut samples = Vec::new();
    if args.golden > 0 {
        let Some(t) = holdout.as_ref().or(reference.as_ref()) else {
            return Err(usage(
                "golden samples need rows: give --holdout or --reference (or --golden 0)",
            ));
        };
        let cols = feature_columns(t, &layout)?;
        let want = (args.golden as usize).min(t.records.len());
        let step = (t.records.len() / want.max(1)).max(1);
        let mut r = 0;
        while samples.len() < want && r < t.records.len() {
            if let Some(input) = json_row(t, r, &layout, &model, &cols)? {
                let mut b = model.batch_builder();
                b.push_json(&input, t.line(r)).map_err(|e| {
                    CtlError::Data(format!("{}: golden row: {e}", t.path.display()))
                })?;
                let out = model.run(&b.take()).map_err(|e| {
                    CtlError::Data(format!("{}: golden row: {e}", t.path.display()))
                })?;
                samples.push(GoldenSample {
                    input,
                    output: model.render_row(&out, 0),
                });
                r += step;
            } else {
                r += 1;
            }
        }
    }

    // Schema.
    let inputs = model
        .inputs()
        .iter()
        .map(|i| TensorSchema {
            name: i.name.clone(),
            elem_type: match i.map_value {
                Some(v) => format!("map(int64,{})", v.name()),
                None => elem_name(i.elem),
            },
            shape: i.shape.iter().map(|d| d.map(|x| x as u64)).collect(),
        })
        .collect();
    let outputs = model
        .outputs()
        .iter()
        .map(|o| TensorSchema {
            name: o.name.clone(),
            elem_type: if o.zipmap.is_some() {
                format!(
                    "map({},{})",
                    if matches!(o.zipmap, Some(Labels::Str(_))) {
                        "string"
                    } else {
                        "int64"
                    },
                    o.elem.name()
                )
            } else {
                elem_name(o.elem)
            },
            shape: Vec::new(),
        })
        .collect();

    // Provenance.
    let mut data = Vec::new();
    for (role, t) in [("reference", &reference), ("holdout", &holdout)] {
        if let Some(t) = t {
            data.push(DataFile {
                role: role.into(),
                path: t.path.file_name().map_or_else(
                    || t.path.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                ),
                sha256: t.sha256.clone(),
                rows: t.records.len() as u64,
            });
        }
    }
    let model_dir = model_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let git_commit = args
        .git_commit
        .clone()
        .or_else(|| env_first(&["GITHUB_SHA", "CI_COMMIT_SHA", "GIT_COMMIT"]))
        .or_else(|| git_head(model_dir));
    let run_id = args
        .run_id
        .clone()
        .or_else(|| ml.as_ref().and_then(|m| m.run_id.clone()))
        .or_else(|| env_first(&["MLFLOW_RUN_ID"]));
    let source = match (&args.mlflow_model, &ml) {
        (Some(dir), Some(m)) => format!(
            "mlflow:{}{}",
            dir.display(),
            m.model_uuid
                .as_ref()
                .map_or(String::new(), |u| format!(" (model_uuid {u})"))
        ),
        _ => model_path.file_name().map_or_else(
            || model_path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
    };

    let mut signoff = signed.map(|s| s.signoff);
    if let Some(s) = signoff.as_mut() {
        s.notes.extend(notes.iter().cloned());
    }
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: args.name.clone(),
        version: args.version.clone(),
        release: args.release,
        created: format_time(OffsetDateTime::now_utc()),
        allow_downgrade: args.allow_downgrade,
        model: "model.onnx".into(),
        files: Vec::new(),
        payload: Payload {
            size: 0,
            sha256: String::new(),
        },
        schema: Schema {
            inputs,
            outputs,
            features,
        },
        reference: profile,
        golden: Golden {
            rtol: args.golden_rtol,
            atol: args.golden_atol,
            samples,
        },
        signoff,
        provenance: Provenance {
            git_commit,
            run_id,
            source,
            data,
            builder: format!("fleetctl {}", env!("CARGO_PKG_VERSION")),
        },
        compatibility: Compatibility {
            operators: model.operators().to_vec(),
            min_agent_version: env!("CARGO_PKG_VERSION").into(),
        },
    };
    let files = [bundle::BundleFile {
        path: "model.onnx".into(),
        source: model_path.clone(),
    }];
    let size =
        bundle::write_bundle(&mut manifest, &files, &key, &args.out).map_err(|e| match e {
            bundle::BundleError::Read { path, source } => CtlError::NoInput {
                path,
                message: source.to_string(),
            },
            bundle::BundleError::Write { path, source } => CtlError::CantCreate {
                path,
                message: source.to_string(),
            },
            other => CtlError::Data(other.to_string()),
        })?;

    // Read it back as a device would: signature, hashes, model load, golden samples.
    self_check(&args.out, &key).inspect_err(|_| {
        let _ = std::fs::remove_file(&args.out);
    })?;

    let mut human = format!(
        "wrote {} ({size} bytes): {} {} release {}, signed by key {}",
        args.out.display(),
        manifest.name,
        manifest.version,
        manifest.release,
        key.id
    );
    if let Some(s) = &manifest.signoff {
        human.push_str(&format!("\nsignoff ({}, {} rows):", s.task, s.rows));
        for (k, v) in &s.metrics {
            human.push_str(&format!("\n  {k:<32} {}", fmt_metric(*v)));
        }
        for r in &s.requirements {
            human.push_str(&format!(
                "\n  require {:<26} met ({})",
                r.requirement,
                r.measured.map_or("-".into(), fmt_metric)
            ));
        }
        for n in &s.notes {
            human.push_str(&format!("\n  note: {n}"));
        }
    }
    human.push_str(&format!(
        "\ngolden samples: {}; reference profile: {}",
        manifest.golden.samples.len(),
        manifest
            .reference
            .as_ref()
            .map_or("none".to_string(), |r| format!(
                "{} features over {} rows",
                r.features.len(),
                r.rows
            ))
    ));
    Ok(Output {
        human,
        json: json!({
            "bundle": args.out,
            "bytes": size,
            "name": manifest.name,
            "version": manifest.version,
            "release": manifest.release,
            "signer": key.id.to_string(),
            "signoff": manifest.signoff,
            "golden_samples": manifest.golden.samples.len(),
        }),
    })
}

fn self_check(out: &Path, key: &SecretKey) -> Result<(), CtlError> {
    let scratch =
        tempfile::tempdir().map_err(|e| cant_create(Path::new("temporary directory"), e))?;
    let trust = Trust::root_only(key.public());
    let v = bundle::verify(
        out,
        &trust,
        &Limits::default(),
        Some(scratch.path()),
        OffsetDateTime::now_utc(),
    )
    .map_err(|e| CtlError::Data(format!("the written bundle does not verify: {e}")))?;
    let st = v
        .staging
        .as_ref()
        .ok_or_else(|| CtlError::Data("verification kept no files".into()))?;
    let model = Model::load(&st.file(&v.manifest.model))
        .map_err(|e| CtlError::Data(format!("the bundled model does not load: {e}")))?;
    shared::bundle::golden::check(&model, &v.manifest.golden)
        .map_err(|e| CtlError::Data(format!("the bundled model fails its golden samples: {e}")))?;
    Ok(())
}
