//! Tree ensembles: TreeEnsembleClassifier and TreeEnsembleRegressor (ai.onnx.ml 1 and 3) and
//! TreeEnsemble (ai.onnx.ml 5), with onnxruntime's CPU semantics (label choice, the binary
//! special cases, base values, aggregation, post transforms, comparison and accumulation
//! precision).
//!
//! [`attrs`] parses and checks the attributes into one specification, [`forest`] flattens it
//! into the arrays the evaluation loops run on; this module holds the operator kernels and
//! the per-row finalisation (base values, label, post transform, output layout).

mod attrs;
mod forest;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::sync::OnceLock;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use self::attrs::{Labels, Parsed};
use self::forest::{Agg, Forest, Num, Sv};
use super::transform::{binary_scores, logistic, probit, softmax, softmax_zero, PostTransform};
use crate::engine::op::{as_f32, expansion, slice, tensor, Fact, Kernel};

pub(crate) fn register(reg: &mut OnnxOpRegister) {
    reg.insert("TreeEnsembleClassifier", tree_classifier);
    reg.insert("TreeEnsembleRegressor", tree_regressor);
    reg.insert("TreeEnsemble", tree_ensemble);
}

fn tree_classifier(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let parsed = attrs::parse_v3(node, true)?;
    Ok((
        expansion(Trees::new(Kind::Classifier, parsed, &node.name)?),
        vec![],
    ))
}

fn tree_regressor(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let parsed = attrs::parse_v3(node, false)?;
    Ok((
        expansion(Trees::new(Kind::Regressor, parsed, &node.name)?),
        vec![],
    ))
}

fn tree_ensemble(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let parsed = attrs::parse_v5(node)?;
    Ok((
        expansion(Trees::new(Kind::Ensemble, parsed, &node.name)?),
        vec![],
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Classifier,
    Regressor,
    /// TreeEnsemble v5: a regressor whose output type follows its input.
    Ensemble,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Classifier => "TreeEnsembleClassifier",
            Kind::Regressor => "TreeEnsembleRegressor",
            Kind::Ensemble => "TreeEnsemble",
        }
    }
}

/// The label a classifier picks for a row: a class index, or onnxruntime's literal 1/0 of
/// the one-score path when the ensemble is not a proper binary case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lab {
    Class(usize),
    Raw(i64),
}

/// All three operators: the flattened ensemble plus the finalisation parameters.
#[derive(Debug)]
struct Trees {
    kind: Kind,
    /// Targets or classes.
    n: usize,
    agg: Agg,
    post: PostTransform,
    base: Vec<f64>,
    labels: Option<Labels>,
    binary_case: bool,
    all_positive: bool,
    /// The ensemble in `f32` (float attributes); `None` when attributes are double.
    single: Option<Forest<f32>>,
    /// The ensemble in `f64`: built at load for double attributes, else on the first double
    /// input.
    double: OnceLock<Forest<f64>>,
    max_feature: Option<usize>,
    trees: usize,
}

impl Trees {
    /// Builds the kernel; `node` names the graph node in errors.
    fn new(kind: Kind, parsed: Parsed, node: &str) -> TractResult<Trees> {
        let name = format!("{} node {node:?}", kind.name());
        let name = name.as_str();
        let double = OnceLock::new();
        let (single, max_feature, trees) = if parsed.double {
            let f = Forest::<f64>::build(&parsed.spec, name)?;
            let info = (f.max_feature(), f.trees());
            let _ = double.set(f);
            (None, info.0, info.1)
        } else {
            let f = Forest::<f32>::build(&parsed.spec, name)?;
            let info = (f.max_feature(), f.trees());
            (Some(f), info.0, info.1)
        };
        Ok(Trees {
            kind,
            n: parsed.spec.n,
            agg: parsed.spec.agg,
            post: parsed.post,
            base: parsed.base,
            labels: parsed.labels,
            binary_case: parsed.binary_case,
            all_positive: parsed.all_positive,
            single,
            double,
            max_feature,
            trees,
        })
    }

    fn forest64(&self) -> TractResult<&Forest<f64>> {
        if let Some(f) = self.double.get() {
            return Ok(f);
        }
        let single = self
            .single
            .as_ref()
            .ok_or_else(|| format_err!("{}: no ensemble", self.kind.name()))?;
        Ok(self.double.get_or_init(|| single.widen()))
    }

    fn check_input(&self, dt: DatumType) -> TractResult<()> {
        let ok = match self.kind {
            Kind::Ensemble => matches!(dt, DatumType::F32 | DatumType::F64),
            _ => matches!(
                dt,
                DatumType::F32 | DatumType::F64 | DatumType::I64 | DatumType::I32
            ),
        };
        ensure!(ok, "{} does not take {dt:?} input", self.kind.name());
        Ok(())
    }

    /// Scores every row with `forest` in precision `T`, finalising into the outputs.
    fn run<T: Num>(
        &self,
        forest: &Forest<T>,
        x: &[T],
        rows: usize,
        width: usize,
        out_dt: DatumType,
    ) -> TractResult<Vec<Tensor>> {
        let base: Vec<T> = self.base.iter().map(|v| T::from_f64(*v)).collect();
        let mut scratch = Vec::with_capacity(self.n);
        match self.kind {
            Kind::Classifier => {
                let size = rows
                    .checked_mul(self.n)
                    .ok_or_else(|| format_err!("output too large"))?;
                let mut scores = vec![0f32; size];
                let mut labels = Vec::with_capacity(rows);
                forest.score(x, width, rows, |r, sv| {
                    let out = &mut scores[r * self.n..(r + 1) * self.n];
                    labels.push(self.classify(sv, &base, out, &mut scratch)?);
                    Ok(())
                })?;
                Ok(vec![
                    self.label_tensor(&labels)?,
                    tensor(&[rows, self.n], scores)?,
                ])
            }
            _ if out_dt == DatumType::F64 => Ok(vec![
                self.regress_all::<T, f64>(forest, x, rows, width, &base)?
            ]),
            _ => Ok(vec![
                self.regress_all::<T, f32>(forest, x, rows, width, &base)?
            ]),
        }
    }

    fn regress_all<T: Num, O: Out>(
        &self,
        forest: &Forest<T>,
        x: &[T],
        rows: usize,
        width: usize,
        base: &[T],
    ) -> TractResult<Tensor> {
        let size = rows
            .checked_mul(self.n)
            .ok_or_else(|| format_err!("output too large"))?;
        let mut values = vec![O::default(); size];
        let mut scratch = Vec::with_capacity(self.n);
        let n_trees = T::from_usize(self.trees);
        forest.score(x, width, rows, |r, sv| {
            let out = &mut values[r * self.n..(r + 1) * self.n];
            self.regress(sv, base, n_trees, out, &mut scratch);
            Ok(())
        })?;
        tensor(&[rows, self.n], values)
    }

    /// onnxruntime's `TreeAggregator*::FinalizeScores{,1}` for regressors.
    fn regress<T: Num, O: Out>(
        &self,
        sv: &mut [Sv<T>],
        base: &[T],
        n_trees: T,
        out: &mut [O],
        scratch: &mut Vec<f32>,
    ) {
        if self.n == 1 {
            let Some(s) = sv.first().copied() else { return };
            let origin = if base.len() == 1 { base[0] } else { T::ZERO };
            let v = match self.agg {
                Agg::Sum => s.score + origin,
                Agg::Average => s.score / n_trees + origin,
                Agg::Min | Agg::Max => {
                    if s.has {
                        s.score + origin
                    } else {
                        origin
                    }
                }
            };
            if let Some(o) = out.first_mut() {
                *o = if self.post == PostTransform::Probit {
                    O::from_f32(probit(v.to_f32()))
                } else {
                    O::from_f64(v.to_f64())
                };
            }
            return;
        }
        let use_base = base.len() == sv.len();
        match self.agg {
            Agg::Sum => {
                if use_base {
                    sv.iter_mut().zip(base).for_each(|(s, b)| s.score += *b);
                }
            }
            Agg::Average => {
                if use_base {
                    sv.iter_mut()
                        .zip(base)
                        .for_each(|(s, b)| s.score = s.score / n_trees + *b);
                } else {
                    sv.iter_mut().for_each(|s| s.score = s.score / n_trees);
                }
            }
            Agg::Min | Agg::Max => {
                for (k, s) in sv.iter_mut().enumerate() {
                    let b = if use_base { base[k] } else { T::ZERO };
                    s.score = b + s.value();
                }
            }
        }
        write_scores(sv, self.post, -1, out, scratch);
    }

    /// onnxruntime's `TreeAggregatorClassifier::FinalizeScores{,1}`: base values, label and
    /// scores of one row.
    fn classify<T: Num>(
        &self,
        sv: &mut [Sv<T>],
        base: &[T],
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) -> TractResult<Lab> {
        let mut was = -1;
        if self.n == 1 {
            // One class: the one-output path.
            let s = sv.first().map_or(T::ZERO, |s| s.score);
            let lab = if base.len() == 2 {
                let s = s + base[1];
                let pair = [
                    Sv {
                        score: -s,
                        has: true,
                    },
                    Sv {
                        score: s,
                        has: true,
                    },
                ];
                let lab = self.set_binary(&mut was, -s, true, s, true);
                write_scores(&pair, self.post, was, out, scratch);
                lab
            } else {
                let s = if base.len() == 1 { s + base[0] } else { s };
                let lab = self.set_binary(&mut was, s, true, T::ZERO, false);
                write_scores(
                    &[Sv {
                        score: s,
                        has: true,
                    }],
                    self.post,
                    was,
                    out,
                    scratch,
                );
                lab
            };
            return Ok(lab);
        }
        if self.n > 2 {
            for (s, b) in sv.iter_mut().zip(base) {
                if s.has {
                    s.score += *b;
                } else {
                    *s = Sv {
                        score: *b,
                        has: true,
                    };
                }
            }
            let mut best: Option<(usize, T)> = None;
            for (k, s) in sv.iter().enumerate() {
                if s.has && best.is_none_or(|(_, w)| s.score > w) {
                    best = Some((k, s.score));
                }
            }
            let (class, _) = best.ok_or_else(|| {
                format_err!("TreeEnsembleClassifier: no class received a score for this row (no weights on its leaves, no base_values)")
            })?;
            write_scores(sv, self.post, -1, out, scratch);
            return Ok(Lab::Class(class));
        }
        // Two classes.
        let (mut p0, mut p1) = match sv {
            [a, b, ..] => (*a, *b),
            _ => bail!("TreeEnsembleClassifier: expected two class scores"),
        };
        let mut len = 2;
        match base.len() {
            2 => {
                if p1.has {
                    // onnxruntime ignores base_values[0] here and mirrors class 0's sum.
                    p1.score = base[1] + p0.score;
                    p0.score = -p1.score;
                } else {
                    p1.score += base[1];
                    p0.score += base[0];
                }
            }
            1 => {
                p0.score += base[0];
                if !p1.has {
                    len = 1;
                }
            }
            _ => {
                was = 3;
                if !p1.has {
                    len = 1;
                }
            }
        }
        let lab = if len == 2 && p1.has {
            self.set_binary(&mut was, p0.score, p0.has, p1.score, p1.has)
        } else {
            self.set_binary(&mut was, p0.score, p0.has, T::ZERO, false)
        };
        write_scores(&[p0, p1][..len], self.post, was, out, scratch);
        Ok(lab)
    }

    /// onnxruntime's `_set_score_binary`.
    fn set_binary<T: Num>(&self, was: &mut i32, s0: T, h0: bool, s1: T, h1: bool) -> Lab {
        let pos = if h1 {
            s1
        } else if h0 {
            s0
        } else {
            T::ZERO
        };
        if self.binary_case {
            let (positive, code) = if self.all_positive {
                (pos > T::from_f64(0.5), 0)
            } else {
                (pos > T::ZERO, 2)
            };
            if positive {
                *was = code;
                Lab::Class(1)
            } else {
                *was = code + 1;
                Lab::Class(0)
            }
        } else if pos > T::ZERO {
            Lab::Raw(1)
        } else {
            Lab::Raw(0)
        }
    }

    fn label_tensor(&self, labels: &[Lab]) -> TractResult<Tensor> {
        let rows = labels.len();
        match &self.labels {
            Some(Labels::Int(ints)) => {
                let v = labels
                    .iter()
                    .map(|l| match *l {
                        Lab::Class(i) => ints
                            .get(i)
                            .copied()
                            .ok_or_else(|| format_err!("class {i} has no label")),
                        Lab::Raw(v) => Ok(v),
                    })
                    .collect::<TractResult<Vec<i64>>>()?;
                tensor(&[rows], v)
            }
            Some(Labels::Str(strings)) => {
                let v = labels
                    .iter()
                    .map(|l| {
                        let i = match *l {
                            Lab::Class(i) => i,
                            Lab::Raw(v) => usize::try_from(v).unwrap_or(usize::MAX),
                        };
                        strings.get(i).cloned().ok_or_else(|| {
                            format_err!("TreeEnsembleClassifier: label index {i} is out of range of {} string labels", strings.len())
                        })
                    })
                    .collect::<TractResult<Vec<String>>>()?;
                tensor(&[rows], v)
            }
            None => bail!("TreeEnsembleClassifier without labels"),
        }
    }
}

/// Output element types of the regressors: `f32`, or `f64` for TreeEnsemble on doubles.
trait Out: Datum + Copy + Default {
    fn from_f64(v: f64) -> Self;
    fn from_f32(v: f32) -> Self;
}

impl Out for f32 {
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl Out for f64 {
    fn from_f64(v: f64) -> f64 {
        v
    }
    fn from_f32(v: f32) -> f64 {
        v as f64
    }
}

/// onnxruntime's `write_scores` on `ScoreValue`s: scores without contribution read as 0;
/// transforms run in `f32`; one score becomes two per `was` (`add_second_class`).
fn write_scores<T: Num, O: Out>(
    sv: &[Sv<T>],
    post: PostTransform,
    was: i32,
    out: &mut [O],
    scratch: &mut Vec<f32>,
) {
    if sv.len() >= 2 {
        let pairs = out.iter_mut().zip(sv);
        match post {
            PostTransform::None => pairs.for_each(|(o, s)| *o = O::from_f64(s.value().to_f64())),
            PostTransform::Logistic => {
                pairs.for_each(|(o, s)| *o = O::from_f32(logistic(s.value().to_f32())))
            }
            PostTransform::Probit => {
                pairs.for_each(|(o, s)| *o = O::from_f32(probit(s.value().to_f32())))
            }
            PostTransform::Softmax | PostTransform::SoftmaxZero => {
                scratch.clear();
                scratch.extend(sv.iter().map(|s| s.value().to_f32()));
                if post == PostTransform::Softmax {
                    softmax(scratch);
                } else {
                    softmax_zero(scratch);
                }
                out.iter_mut()
                    .zip(scratch.iter())
                    .for_each(|(o, v)| *o = O::from_f32(*v));
            }
        }
    } else if let Some(s) = sv.first() {
        let v = s.value();
        let (pair, k) = binary_scores(v.to_f32(), post, u8::try_from(was).ok());
        if k == 1 && post != PostTransform::Probit {
            if let Some(o) = out.first_mut() {
                *o = O::from_f64(v.to_f64());
            }
        } else {
            out.iter_mut()
                .zip(&pair[..k])
                .for_each(|(o, p)| *o = O::from_f32(*p));
        }
    }
}

/// `[N, F]` (or `[F]`, one row) as (rows, features).
fn dims(op: &str, shape: &[usize]) -> TractResult<(usize, usize)> {
    match shape {
        [f] => Ok((1, *f)),
        [n, f] => Ok((*n, *f)),
        _ => bail!("{op} takes a [N, F] or [F] input, got shape {shape:?}"),
    }
}

impl Kernel for Trees {
    fn op_type(&self) -> &'static str {
        self.kind.name()
    }

    fn output_count(&self) -> usize {
        if self.kind == Kind::Classifier {
            2
        } else {
            1
        }
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        let name = self.kind.name();
        ensure!(
            inputs.len() == 1,
            "{name} takes one input, got {}",
            inputs.len()
        );
        let x = &inputs[0];
        self.check_input(x.dt)?;
        let rows: TDim = match x.shape.len() {
            1 => 1.into(),
            2 => x.shape[0].clone(),
            r => bail!("{name} takes a [N, F] or [F] input, got rank {r}"),
        };
        if let (Some(width), Some(m)) = (x.last_dim(), self.max_feature) {
            ensure!(
                m < width,
                "{name} reads feature {m} but its input has {width} features"
            );
        }
        let n: TDim = self.n.into();
        Ok(match self.kind {
            Kind::Classifier => {
                let label_dt = match self.labels {
                    Some(Labels::Str(_)) => String::datum_type(),
                    _ => i64::datum_type(),
                };
                vec![
                    Fact::new(label_dt, [rows.clone()]),
                    Fact::new(f32::datum_type(), [rows, n]),
                ]
            }
            Kind::Regressor => vec![Fact::new(f32::datum_type(), [rows, n])],
            Kind::Ensemble => vec![Fact::new(x.dt, [rows, n])],
        })
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        let name = self.kind.name();
        let x = *inputs
            .first()
            .ok_or_else(|| format_err!("{name} takes one input"))?;
        let dt = x.datum_type();
        self.check_input(dt)?;
        let (rows, width) = dims(name, x.shape())?;
        if let Some(m) = self.max_feature {
            ensure!(
                m < width,
                "{name} reads feature {m} but the input has {width} features"
            );
        }
        let out_dt = if self.kind == Kind::Ensemble {
            dt
        } else {
            DatumType::F32
        };
        match (&self.single, dt) {
            (Some(forest), DatumType::F32 | DatumType::I64 | DatumType::I32) => {
                let xs = as_f32(x)?;
                self.run(forest, &xs, rows, width, out_dt)
            }
            _ => {
                let xs: Cow<[f64]> = match dt {
                    DatumType::F64 => Cow::Borrowed(slice::<f64>(x)?),
                    DatumType::F32 => {
                        Cow::Owned(slice::<f32>(x)?.iter().map(|v| *v as f64).collect())
                    }
                    DatumType::I64 => {
                        Cow::Owned(slice::<i64>(x)?.iter().map(|v| *v as f64).collect())
                    }
                    DatumType::I32 => {
                        Cow::Owned(slice::<i32>(x)?.iter().map(|v| *v as f64).collect())
                    }
                    other => bail!("{name} does not take {other:?} input"),
                };
                self.run(self.forest64()?, &xs, rows, width, out_dt)
            }
        }
    }
}
