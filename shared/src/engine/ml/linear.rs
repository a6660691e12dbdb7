//! LinearClassifier and LinearRegressor, as onnxruntime's CPU kernels compute them; also the
//! attribute helpers (class labels, post transform, input geometry) the SVM operators share.

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::transform::{binary_scores, probit, PostTransform};
use crate::engine::op::{as_f32, expansion, tensor, Fact, Kernel};

pub(crate) fn register(reg: &mut OnnxOpRegister) {
    reg.insert("LinearClassifier", linear_classifier);
    reg.insert("LinearRegressor", linear_regressor);
}

// ---------------------------------------------------------------------------------------
// Helpers shared with svm.rs
// ---------------------------------------------------------------------------------------

/// The class labels of a classifier: `classlabels_strings` or the int64 list.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ClassLabels {
    Int(Vec<i64>),
    Str(Vec<String>),
}

impl ClassLabels {
    /// Reads `classlabels_strings` / `ints_attr`; `None` when neither is given (or both are
    /// empty); giving both non-empty is an error.
    pub fn parse(node: &NodeProto, ints_attr: &str) -> TractResult<Option<ClassLabels>> {
        let strings: Vec<String> = node
            .get_attr_opt_vec("classlabels_strings")?
            .unwrap_or_default();
        let ints: Vec<i64> = node.get_attr_opt_vec(ints_attr)?.unwrap_or_default();
        match (strings.is_empty(), ints.is_empty()) {
            (true, true) => Ok(None),
            (false, true) => Ok(Some(ClassLabels::Str(strings))),
            (true, false) => Ok(Some(ClassLabels::Int(ints))),
            (false, false) => node.bail_attr(
                "classlabels_strings",
                &format!("only one of classlabels_strings and {ints_attr} may be given"),
            ),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            ClassLabels::Int(v) => v.len(),
            ClassLabels::Str(v) => v.len(),
        }
    }

    pub fn datum_type(&self) -> DatumType {
        match self {
            ClassLabels::Int(_) => i64::datum_type(),
            ClassLabels::Str(_) => String::datum_type(),
        }
    }

    /// The two labels `[negative, positive]` of a one-score binary classifier: the given
    /// labels when there are exactly two, else 0/1 (or "0"/"1" for string labels).
    pub fn binary(labels: Option<&ClassLabels>) -> ClassLabels {
        match labels {
            Some(ClassLabels::Str(s)) if s.len() == 2 => ClassLabels::Str(s.clone()),
            Some(ClassLabels::Str(_)) => ClassLabels::Str(vec!["0".into(), "1".into()]),
            Some(ClassLabels::Int(v)) if v.len() == 2 => ClassLabels::Int(v.clone()),
            _ => ClassLabels::Int(vec![0, 1]),
        }
    }

    /// A `[n]` tensor holding label `ix[i]` for each row.
    pub fn gather(&self, ix: &[usize]) -> TractResult<Tensor> {
        let missing = || format_err!("class index out of range of {} labels", self.len());
        match self {
            ClassLabels::Int(v) => {
                let out = ix
                    .iter()
                    .map(|&i| v.get(i).copied().ok_or_else(missing))
                    .collect::<TractResult<Vec<_>>>()?;
                tensor(&[ix.len()], out)
            }
            ClassLabels::Str(v) => {
                let out = ix
                    .iter()
                    .map(|&i| v.get(i).cloned().ok_or_else(missing))
                    .collect::<TractResult<Vec<_>>>()?;
                tensor(&[ix.len()], out)
            }
        }
    }
}

/// The `post_transform` attribute, with an error naming the node on an unknown value.
pub(crate) fn post_transform(node: &NodeProto) -> TractResult<PostTransform> {
    let value: Option<&str> = node.get_attr_opt("post_transform")?;
    match PostTransform::parse(value) {
        Ok(p) => Ok(p),
        Err(e) => node.bail_attr("post_transform", &e.to_string()),
    }
}

/// Rows and features of a classifier/regressor input as onnxruntime reads it: `[F]` is one
/// row, `[N, F]` is N rows; other ranks are refused.
pub(crate) fn rows_features(op: &str, shape: &[usize]) -> TractResult<(usize, usize)> {
    match shape {
        [f] => Ok((1, *f)),
        [n, f] => Ok((*n, *f)),
        _ => bail!("{op} input must have shape [N, F] or [F], got {shape:?}"),
    }
}

/// [`rows_features`] for a fact: the row count and, when known, the feature count. Also
/// checks the input is numeric.
pub(crate) fn fact_rows_features(op: &str, f: &Fact) -> TractResult<(TDim, Option<usize>)> {
    ensure!(
        matches!(
            f.dt,
            DatumType::F32 | DatumType::F64 | DatumType::I64 | DatumType::I32
        ),
        "{op} input must be float, double, int64 or int32, got {:?}",
        f.dt
    );
    match &*f.shape {
        [c] => Ok((1.into(), c.to_usize().ok())),
        [n, c] => Ok((n.clone(), c.to_usize().ok())),
        s => bail!(
            "{op} input must have shape [N, F] or [F], got rank {}",
            s.len()
        ),
    }
}

/// `n * cols`, or an error when that overflows.
pub(crate) fn out_len(n: usize, cols: usize) -> TractResult<usize> {
    n.checked_mul(cols)
        .ok_or_else(|| format_err!("an output of {n} x {cols} values is too large"))
}

/// Row `r` of a row-major matrix with `f` columns (empty if out of range).
#[inline]
pub(crate) fn row(x: &[f32], r: usize, f: usize) -> &[f32] {
    r.checked_mul(f)
        .and_then(|a| Some(a..a.checked_add(f)?))
        .and_then(|range| x.get(range))
        .unwrap_or(&[])
}

/// The K stride of MLAS's SGEMM (`MlasSgemmOperation`) for an `[M, K] x [K, N]` product:
/// 128, doubled for every halving of the N stride (128 down to at least 16) a small N
/// allows. Products over more than this many terms are accumulated block by block.
pub(crate) fn mlas_stride_k(n: usize, k: usize) -> usize {
    if n >= k {
        // the K stride only shrinks towards K: one block
        return k.max(1);
    }
    let (mut stride_n, mut stride_k) = (128usize, 128usize);
    while stride_n > 16 && stride_n / 2 >= n {
        stride_k *= 2;
        stride_n /= 2;
    }
    stride_k
}

/// One element of a GEMM as onnxruntime's MLAS kernels compute it on FMA hardware:
/// `alpha * Σ a[k]·b[k] + c`, each block of `stride_k` terms accumulated in order with
/// fused multiply-adds, then folded into the output (`c`, or nothing for `None`). Matching
/// this order keeps results bit-identical to onnxruntime's in the cases that amplify
/// rounding (PROBIT near 0.5, labels of near-ties).
#[inline]
pub(crate) fn gemm_dot(a: &[f32], b: &[f32], stride_k: usize, alpha: f32, c: Option<f32>) -> f32 {
    let mut out = c;
    for (ca, cb) in a.chunks(stride_k.max(1)).zip(b.chunks(stride_k.max(1))) {
        let mut acc = 0.0f32;
        for (x, y) in ca.iter().zip(cb) {
            acc = x.mul_add(*y, acc);
        }
        out = Some(match out {
            Some(c) => acc.mul_add(alpha, c),
            None => acc * alpha,
        });
    }
    out.unwrap_or(0.0)
}

/// Index of the first maximum (`std::max_element`), 0 for an empty slice.
#[inline]
pub(crate) fn argmax<T: PartialOrd + Copy>(v: &[T]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate().skip(1) {
        if v.get(best).is_some_and(|b| *x > *b) {
            best = i;
        }
    }
    best
}

// ---------------------------------------------------------------------------------------
// LinearClassifier
// ---------------------------------------------------------------------------------------

/// `scores = X · coefficientsᵀ + intercepts`, one row of coefficients per class (the class
/// count is the number of intercepts). With one row the label is `score > 0 ? labels[1] :
/// labels[0]` and, given two labels, the scores get a second column.
#[derive(Debug)]
struct LinearClassifier {
    coefficients: Vec<f32>,
    intercepts: Vec<f32>,
    /// Label table indexed by the winning class (for one row: `[negative, positive]`).
    labels: ClassLabels,
    /// One coefficient row and two labels: two score columns.
    second_class: bool,
    post: PostTransform,
}

fn linear_classifier(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expansion(LinearClassifier::from_node(node)?), vec![]))
}

impl LinearClassifier {
    fn from_node(node: &NodeProto) -> TractResult<LinearClassifier> {
        let coefficients: Vec<f32> = node.get_attr_vec("coefficients")?;
        let intercepts: Vec<f32> = node.get_attr_opt_vec("intercepts")?.unwrap_or_default();
        node.expect_attr(
            "intercepts",
            !intercepts.is_empty(),
            "a non-empty list (one intercept per class)",
        )?;
        let classes = intercepts.len();
        node.expect_attr(
            "coefficients",
            !coefficients.is_empty() && coefficients.len().is_multiple_of(classes),
            || {
                format!(
                    "a multiple of the {classes} classes set by intercepts, got {} values",
                    coefficients.len()
                )
            },
        )?;
        let given = ClassLabels::parse(node, "classlabels_ints")?;
        let label_attr = match &given {
            Some(ClassLabels::Str(_)) => "classlabels_strings",
            _ => "classlabels_ints",
        };
        let (labels, second_class) = if classes == 1 {
            if let Some(l) = &given {
                node.expect_attr(label_attr, l.len() == 2, || {
                    format!(
                        "exactly 2 labels for a binary classifier (one coefficient row), got {}",
                        l.len()
                    )
                })?;
            }
            (ClassLabels::binary(given.as_ref()), given.is_some())
        } else {
            let Some(l) = given else {
                return node.bail_attr(
                    "classlabels_ints",
                    &format!(
                        "classlabels_ints or classlabels_strings is required for {classes} classes"
                    ),
                );
            };
            node.expect_attr(label_attr, l.len() >= classes, || {
                format!(
                    "at least {classes} labels (one per intercept), got {}",
                    l.len()
                )
            })?;
            (l, false)
        };
        let _multi_class: i64 = node.get_attr_opt("multi_class")?.unwrap_or(0); // unused, as in onnxruntime
        let post = post_transform(node)?;
        Ok(LinearClassifier {
            coefficients,
            intercepts,
            labels,
            second_class,
            post,
        })
    }

    fn check_features(&self, f: usize) -> TractResult<()> {
        let classes = self.intercepts.len();
        ensure!(
            self.coefficients.len() >= classes.saturating_mul(f),
            "LinearClassifier has {} coefficients, fewer than {classes} classes x {f} input features",
            self.coefficients.len()
        );
        Ok(())
    }

    fn score_columns(&self) -> usize {
        if self.second_class {
            2
        } else {
            self.intercepts.len()
        }
    }
}

impl Kernel for LinearClassifier {
    fn op_type(&self) -> &'static str {
        "LinearClassifier"
    }

    fn output_count(&self) -> usize {
        2
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == 1,
            "LinearClassifier takes one input, got {}",
            inputs.len()
        );
        let (n, f) = fact_rows_features(self.op_type(), &inputs[0])?;
        if let Some(f) = f {
            self.check_features(f)?;
        }
        Ok(vec![
            Fact::new(self.labels.datum_type(), [n.clone()]),
            Fact::new(f32::datum_type(), [n, self.score_columns().into()]),
        ])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        let input = inputs.first().context("LinearClassifier needs an input")?;
        let (n, f) = rows_features(self.op_type(), input.shape())?;
        self.check_features(f)?;
        let x = as_f32(input)?;
        let classes = self.intercepts.len();
        let cols = self.score_columns();
        // raw scores, packed [n, classes], at the start of the output buffer
        let mut scores = vec![0.0f32; out_len(n, cols)?];
        let stride_k = mlas_stride_k(classes, f);
        for r in 0..n {
            let xr = row(&x, r, f);
            for (c, b) in self.intercepts.iter().enumerate() {
                scores[r * classes + c] =
                    gemm_dot(xr, row(&self.coefficients, c, f), stride_k, 1.0, Some(*b));
            }
        }
        let mut label_ix = Vec::with_capacity(n);
        if classes == 1 {
            label_ix.extend(scores[..n].iter().map(|s| usize::from(*s > 0.0)));
        } else {
            label_ix.extend((0..n).map(|r| argmax(&scores[r * classes..(r + 1) * classes])));
        }
        if classes > 1 {
            for r in 0..n {
                self.post.apply(&mut scores[r * classes..(r + 1) * classes]);
            }
        } else if self.post == PostTransform::Probit {
            // onnxruntime transforms the packed scores in place, leaving the second half of a
            // two-column output untouched (zero)
            scores[..n].iter_mut().for_each(|s| *s = probit(*s));
        } else if self.second_class {
            for r in (0..n).rev() {
                let (pair, _) = binary_scores(scores[r], self.post, Some(1));
                scores[2 * r..2 * r + 2].copy_from_slice(&pair);
            }
        }
        Ok(vec![
            self.labels.gather(&label_ix)?,
            tensor(&[n, cols], scores)?,
        ])
    }
}

// ---------------------------------------------------------------------------------------
// LinearRegressor
// ---------------------------------------------------------------------------------------

/// `Y = X · coefficientsᵀ + intercepts`, `[N, targets]`. Intercepts are used only when there
/// is one per target, and a post transform only with more than one target (PROBIT always),
/// as onnxruntime does.
#[derive(Debug)]
struct LinearRegressor {
    coefficients: Vec<f32>,
    intercepts: Option<Vec<f32>>,
    targets: usize,
    post: PostTransform,
}

fn linear_regressor(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expansion(LinearRegressor::from_node(node)?), vec![]))
}

impl LinearRegressor {
    fn from_node(node: &NodeProto) -> TractResult<LinearRegressor> {
        let coefficients: Vec<f32> = node.get_attr_vec("coefficients")?;
        node.expect_attr("coefficients", !coefficients.is_empty(), "a non-empty list")?;
        let targets: i64 = node.get_attr_opt("targets")?.unwrap_or(1);
        node.expect_attr("targets", targets >= 1, || {
            format!("a positive count, got {targets}")
        })?;
        let targets = targets as usize;
        let intercepts: Vec<f32> = node.get_attr_opt_vec("intercepts")?.unwrap_or_default();
        let intercepts = (intercepts.len() == targets).then_some(intercepts);
        let post = post_transform(node)?;
        Ok(LinearRegressor {
            coefficients,
            intercepts,
            targets,
            post,
        })
    }

    fn check_features(&self, f: usize) -> TractResult<()> {
        ensure!(
            self.coefficients.len() >= self.targets.saturating_mul(f),
            "LinearRegressor has {} coefficients, fewer than {} targets x {f} input features",
            self.coefficients.len(),
            self.targets
        );
        Ok(())
    }
}

impl Kernel for LinearRegressor {
    fn op_type(&self) -> &'static str {
        "LinearRegressor"
    }

    fn output_count(&self) -> usize {
        1
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == 1,
            "LinearRegressor takes one input, got {}",
            inputs.len()
        );
        let (n, f) = fact_rows_features(self.op_type(), &inputs[0])?;
        if let Some(f) = f {
            self.check_features(f)?;
        }
        Ok(vec![Fact::new(f32::datum_type(), [n, self.targets.into()])])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        let input = inputs.first().context("LinearRegressor needs an input")?;
        let (n, f) = rows_features(self.op_type(), input.shape())?;
        self.check_features(f)?;
        let x = as_f32(input)?;
        let t = self.targets;
        let mut out = vec![0.0f32; out_len(n, t)?];
        let stride_k = mlas_stride_k(t, f);
        for r in 0..n {
            let xr = row(&x, r, f);
            let yr = &mut out[r * t..(r + 1) * t];
            for (c, y) in yr.iter_mut().enumerate() {
                let b = self.intercepts.as_ref().and_then(|i| i.get(c)).copied();
                *y = gemm_dot(xr, row(&self.coefficients, c, f), stride_k, 1.0, b);
            }
            if t > 1 {
                self.post.apply(yr);
            } else if self.post == PostTransform::Probit {
                yr.iter_mut().for_each(|v| *v = probit(*v));
            }
        }
        Ok(vec![tensor(&[n, t], out)?])
    }
}

/// Builders of nodes and tensors for the unit tests of the `ai.onnx.ml` kernels.
#[cfg(test)]
pub(crate) mod test_util {
    use tract_onnx::pb::attribute_proto::AttributeType;
    use tract_onnx::pb::tensor_proto::DataType;
    use tract_onnx::pb::{AttributeProto, NodeProto};
    use tract_onnx::tract_hir::internal::*;

    use crate::engine::op::{Fact, Kernel};

    pub fn node(op: &str, attrs: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            name: "n".into(),
            op_type: op.into(),
            attribute: attrs,
            ..NodeProto::default()
        }
    }

    fn attr(name: &str, ty: AttributeType) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: ty as i32,
            ..AttributeProto::default()
        }
    }

    pub fn floats(name: &str, v: &[f32]) -> AttributeProto {
        AttributeProto {
            floats: v.to_vec(),
            ..attr(name, AttributeType::Floats)
        }
    }

    pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            ints: v.to_vec(),
            ..attr(name, AttributeType::Ints)
        }
    }

    pub fn strings(name: &str, v: &[&str]) -> AttributeProto {
        AttributeProto {
            strings: v.iter().map(|s| s.as_bytes().to_vec()).collect(),
            ..attr(name, AttributeType::Strings)
        }
    }

    pub fn string(name: &str, v: &str) -> AttributeProto {
        AttributeProto {
            s: v.as_bytes().to_vec(),
            ..attr(name, AttributeType::String)
        }
    }

    pub fn int(name: &str, v: i64) -> AttributeProto {
        AttributeProto {
            i: v,
            ..attr(name, AttributeType::Int)
        }
    }

    pub fn float(name: &str, v: f32) -> AttributeProto {
        AttributeProto {
            f: v,
            ..attr(name, AttributeType::Float)
        }
    }

    pub fn tensor_attr(name: &str, t: tract_onnx::pb::TensorProto) -> AttributeProto {
        AttributeProto {
            t: Some(t),
            ..attr(name, AttributeType::Tensor)
        }
    }

    /// A `[rows, cols]` f32 tensor.
    pub fn mat(rows: usize, cols: usize, v: &[f32]) -> Tensor {
        crate::engine::op::tensor(&[rows, cols], v.to_vec()).expect("test tensor")
    }

    /// Runs a kernel's typing on the inputs' facts, then `eval`, checking the outputs match
    /// the facts.
    pub fn run(k: &dyn Kernel, inputs: &[Tensor]) -> TractResult<Vec<Tensor>> {
        let facts: Vec<Fact> = inputs
            .iter()
            .map(|t| Fact::new(t.datum_type(), t.shape().iter().map(|d| TDim::from(*d))))
            .collect();
        let out_facts = k.output_facts(&facts)?;
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let out = k.eval(&refs)?;
        assert_eq!(out.len(), out_facts.len());
        for (t, f) in out.iter().zip(&out_facts) {
            assert_eq!(t.datum_type(), f.dt, "output type");
            let shape: Vec<TDim> = t.shape().iter().map(|d| TDim::from(*d)).collect();
            assert_eq!(&*shape, &*f.shape, "output shape");
        }
        Ok(out)
    }

    /// An ONNX model of one `ai.onnx.ml` node reading `inputs` and writing `outputs`
    /// (name, element type, dims with `None` for the batch dimension).
    pub fn model_bytes(
        node: NodeProto,
        inputs: &[(&str, DataType, &[Option<i64>])],
        outputs: &[(&str, DataType, &[Option<i64>])],
        ml_opset: i64,
    ) -> Vec<u8> {
        use prost::Message;
        use tract_onnx::pb;
        let info = |(name, elem, dims): &(&str, DataType, &[Option<i64>])| {
            use pb::tensor_shape_proto::{dimension::Value as D, Dimension};
            let dim = dims
                .iter()
                .map(|d| Dimension {
                    denotation: String::new(),
                    value: Some(d.map_or_else(|| D::DimParam("N".into()), D::DimValue)),
                })
                .collect();
            pb::ValueInfoProto {
                name: name.to_string(),
                r#type: Some(pb::TypeProto {
                    denotation: String::new(),
                    value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                        elem_type: *elem as i32,
                        shape: Some(pb::TensorShapeProto { dim }),
                    })),
                }),
                doc_string: String::new(),
            }
        };
        let node = NodeProto {
            domain: "ai.onnx.ml".into(),
            input: inputs.iter().map(|i| i.0.to_string()).collect(),
            output: outputs.iter().map(|o| o.0.to_string()).collect(),
            ..node
        };
        let graph = pb::GraphProto {
            name: "test".into(),
            node: vec![node],
            input: inputs.iter().map(info).collect(),
            output: outputs.iter().map(info).collect(),
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![
                pb::OperatorSetIdProto {
                    domain: String::new(),
                    version: 17,
                },
                pb::OperatorSetIdProto {
                    domain: "ai.onnx.ml".into(),
                    version: ml_opset,
                },
            ],
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// Loads `bytes` with the engine, scores the JSON rows and renders the outputs.
    pub fn score(bytes: &[u8], rows: &[&str]) -> Vec<serde_json::Value> {
        let model = crate::engine::Model::from_bytes(bytes).expect("model loads");
        let mut builder = model.batch_builder();
        for (i, r) in rows.iter().enumerate() {
            let obj: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(r).expect("json row");
            builder.push_json(&obj, i as u64 + 1).expect("row");
        }
        let out = model.run(&builder.take()).expect("run");
        (0..rows.len())
            .map(|r| serde_json::Value::Object(model.render_row(&out, r)))
            .collect()
    }

    pub fn f32s(t: &Tensor) -> Vec<f32> {
        crate::engine::op::slice::<f32>(t)
            .expect("f32 tensor")
            .to_vec()
    }

    pub fn i64s(t: &Tensor) -> Vec<i64> {
        crate::engine::op::slice::<i64>(t)
            .expect("i64 tensor")
            .to_vec()
    }

    pub fn strs(t: &Tensor) -> Vec<String> {
        crate::engine::op::slice::<String>(t)
            .expect("string tensor")
            .to_vec()
    }

    pub fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                "{got:?} vs {want:?}"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // reference values as onnxruntime printed them
mod tests {
    use super::test_util::*;
    use super::*;

    fn binary(post: &str, labels: Option<&[i64]>) -> TractResult<LinearClassifier> {
        let mut attrs = vec![
            floats("coefficients", &[0.1, -0.2, 0.05]),
            floats("intercepts", &[0.3]),
            string("post_transform", post),
        ];
        if let Some(l) = labels {
            attrs.push(ints("classlabels_ints", l));
        }
        LinearClassifier::from_node(&node("LinearClassifier", attrs))
    }

    const X3: [f32; 9] = [1., 2., 3., 0., 5., 6., 4., 0., 0.];

    #[test]
    fn binary_with_two_labels_gets_two_columns() {
        let k = binary("NONE", Some(&[3, 7])).unwrap();
        let out = run(&k, &[mat(3, 3, &X3)]).unwrap();
        assert_eq!(i64s(&out[0]), [7, 3, 7]);
        assert_eq!(out[1].shape(), [3, 2]);
        close(&f32s(&out[1]), &[0.85, 0.15, 1.4, -0.4, 0.3, 0.7]);

        let k = binary("LOGISTIC", Some(&[3, 7])).unwrap();
        let out = run(&k, &[mat(3, 3, &X3)]).unwrap();
        close(
            &f32s(&out[1]),
            &[
                0.4625702, 0.5374298, 0.59868765, 0.40131235, 0.3318122, 0.6681878,
            ],
        );

        let k = binary("SOFTMAX", Some(&[3, 7])).unwrap();
        let out = run(&k, &[mat(3, 3, &X3)]).unwrap();
        close(&f32s(&out[1]), &[0.85, 0.15, 1.4, -0.4, 0.3, 0.7]);
    }

    #[test]
    fn binary_probit_is_packed_like_onnxruntime() {
        let k = binary("PROBIT", Some(&[3, 7])).unwrap();
        let out = run(&k, &[mat(3, 3, &X3)]).unwrap();
        let s = f32s(&out[1]);
        close(
            &[s[0], s[2], s[3], s[4], s[5]],
            &[-1.0366131, 0.5244459, 0.0, 0.0, 0.0],
        );
        assert!(s[1].is_nan());
    }

    #[test]
    fn binary_without_labels_keeps_one_raw_column() {
        for post in ["NONE", "LOGISTIC"] {
            let k = binary(post, None).unwrap();
            let out = run(&k, &[mat(3, 3, &X3)]).unwrap();
            assert_eq!(i64s(&out[0]), [1, 0, 1]);
            assert_eq!(out[1].shape(), [3, 1]);
            close(&f32s(&out[1]), &[0.15, -0.4, 0.7]);
        }
        let k = binary("PROBIT", None).unwrap();
        let out = run(&k, &[mat(3, 3, &X3)]).unwrap();
        close(&f32s(&out[1])[..1], &[-1.0366131]);
    }

    #[test]
    fn binary_string_labels() {
        let attrs = vec![
            floats("coefficients", &[0.00085401, -0.00314063]),
            floats("intercepts", &[0.03930598]),
            strings("classlabels_strings", &["not_so_good", "pretty_good"]),
        ];
        let k = LinearClassifier::from_node(&node("LinearClassifier", attrs)).unwrap();
        let out = run(&k, &[mat(3, 2, &[1., 0., 3., 44., 23., 11.3])]).unwrap();
        assert_eq!(strs(&out[0]), ["pretty_good", "not_so_good", "pretty_good"]);
        close(
            &f32s(&out[1]),
            &[
                0.95984,
                0.0401599929,
                1.09631968,
                -0.0963197052,
                0.976540923,
                0.0234590918,
            ],
        );
    }

    fn multiclass(post: &str) -> LinearClassifier {
        let attrs = vec![
            floats(
                "coefficients",
                &[
                    -0.22562418,
                    0.34188559,
                    0.68346153,
                    -0.68051993,
                    -0.1975279,
                    0.03748541,
                ],
            ),
            floats("intercepts", &[-3.91601811, 0.42575697, 0.13731251]),
            ints("classlabels_ints", &[1, 2, 3]),
            string("post_transform", post),
        ];
        LinearClassifier::from_node(&node("LinearClassifier", attrs)).unwrap()
    }

    #[test]
    fn multiclass_scores_and_logistic() {
        let x = mat(3, 2, &[1., 0., 3., 44., 23., 11.3]);
        let out = run(&multiclass("NONE"), std::slice::from_ref(&x)).unwrap();
        assert_eq!(i64s(&out[0]), [2, 1, 2]);
        close(
            &f32s(&out[1]),
            &[
                -4.14164229,
                1.1092185,
                -0.06021539,
                10.45007543,
                -27.46673545,
                1.19408663,
                -5.24206713,
                8.45549693,
                -3.98224414,
            ],
        );
        let out = run(&multiclass("LOGISTIC"), std::slice::from_ref(&x)).unwrap();
        close(
            &f32s(&out[1]),
            &[
                0.015647972,
                0.751983387,
                0.484950699,
                0.999971055,
                1.17855E-12,
                0.767471158,
                0.005261482,
                0.999787317,
                0.018302525,
            ],
        );
        let x64 = tensor(&[3, 2], vec![1i64, 0, 3, 44, 23, 11]).unwrap();
        let out = run(&multiclass("NONE"), &[x64]).unwrap();
        close(
            &f32s(&out[1])[6..],
            &[-5.3446321487426758, 8.6596536636352539, -3.9934897422790527],
        );
    }

    #[test]
    fn one_dimensional_input_is_one_row() {
        let x = tensor(&[2], vec![1f32, 0.]).unwrap();
        let out = run(&multiclass("NONE"), &[x]).unwrap();
        assert_eq!(out[0].shape(), [1]);
        assert_eq!(out[1].shape(), [1, 3]);
    }

    #[test]
    fn malformed_attributes_are_refused() {
        let bad = [
            vec![
                floats("coefficients", &[1., 2., 3.]),
                floats("intercepts", &[0., 0.]),
                ints("classlabels_ints", &[0, 1]),
            ],
            vec![
                floats("coefficients", &[1., 2.]),
                ints("classlabels_ints", &[0, 1]),
            ],
            vec![
                floats("coefficients", &[1., 2.]),
                floats("intercepts", &[0.]),
                ints("classlabels_ints", &[0, 1, 2]),
            ],
            vec![
                floats("coefficients", &[1., 2., 3., 4.]),
                floats("intercepts", &[0., 0.]),
            ],
            vec![
                floats("coefficients", &[1., 2., 3., 4.]),
                floats("intercepts", &[0., 0.]),
                ints("classlabels_ints", &[4]),
            ],
            vec![
                floats("coefficients", &[1., 2.]),
                floats("intercepts", &[0.]),
                ints("classlabels_ints", &[0, 1]),
                string("post_transform", "SIGMOID"),
            ],
            vec![
                floats("coefficients", &[1., 2., 3., 4.]),
                floats("intercepts", &[0., 0.]),
                ints("classlabels_ints", &[0, 1]),
                strings("classlabels_strings", &["a", "b"]),
            ],
        ];
        for attrs in bad {
            let err = LinearClassifier::from_node(&node("LinearClassifier", attrs)).unwrap_err();
            assert!(format!("{err:?}").contains("attribute"), "{err:?}");
        }
    }

    #[test]
    fn wrong_width_is_an_error() {
        let k = multiclass("NONE");
        assert!(run(&k, &[mat(1, 3, &[1., 2., 3.])]).is_err());
        let s = tensor(&[1, 2], vec!["a".to_string(), "b".to_string()]).unwrap();
        assert!(k.eval(&[&s]).is_err());
        let x3 = tensor(&[1, 1, 2], vec![1f32, 2.]).unwrap();
        assert!(k.eval(&[&x3]).is_err());
    }

    #[test]
    fn regressor_reads_coefficients_with_the_input_width() {
        let attrs = vec![
            floats("coefficients", &[1., 2., 3., 4., 5., 6.]),
            int("targets", 2),
            floats("intercepts", &[1.]),
        ];
        let k = LinearRegressor::from_node(&node("LinearRegressor", attrs)).unwrap();
        let out = run(&k, &[mat(2, 2, &[1., 0., 0., 1.])]).unwrap();
        assert_eq!(out[0].shape(), [2, 2]);
        close(&f32s(&out[0]), &[1., 3., 2., 4.]);
        assert!(run(&k, &[mat(1, 4, &[1., 0., 0., 1.])]).is_err());
    }

    #[test]
    fn regressor_one_target_only_probit_applies() {
        for (post, want) in [
            ("NONE", [0.6, 0.7]),
            ("LOGISTIC", [0.6, 0.7]),
            ("SOFTMAX", [0.6, 0.7]),
            ("PROBIT", [0.2533535, 0.5244459]),
        ] {
            let attrs = vec![
                floats("coefficients", &[0.1, 0.2]),
                floats("intercepts", &[0.5]),
                string("post_transform", post),
            ];
            let k = LinearRegressor::from_node(&node("LinearRegressor", attrs)).unwrap();
            let out = run(&k, &[mat(2, 2, &[1., 0., 0., 1.])]).unwrap();
            close(&f32s(&out[0]), &want);
        }
    }

    #[test]
    fn the_engine_uses_these_kernels_not_tracts() {
        use serde_json::json;
        use tract_onnx::pb::tensor_proto::DataType;
        // tract's LinearClassifier has no second column for a one-row binary model
        let attrs = vec![
            floats("coefficients", &[0.1, -0.2, 0.05]),
            floats("intercepts", &[0.3]),
            ints("classlabels_ints", &[3, 7]),
        ];
        let bytes = model_bytes(
            node("LinearClassifier", attrs),
            &[("X", DataType::Float, &[None, Some(3)])],
            &[
                ("label", DataType::Int64, &[None]),
                ("scores", DataType::Float, &[None, Some(2)]),
            ],
            3,
        );
        let got = score(&bytes, &[r#"{"X": [1, 2, 3]}"#, r#"{"X": [0, 5, 6]}"#]);
        assert_eq!(got[0]["label"], json!(7));
        assert_eq!(got[1]["label"], json!(3));
        let s = got[0]["scores"].as_array().expect("two scores");
        assert_eq!(s.len(), 2);
        assert!((s[1].as_f64().unwrap() - 0.15).abs() < 1e-6);

        let attrs = vec![
            floats("coefficients", &[1., 2., 3., 4.]),
            int("targets", 2),
            string("post_transform", "SOFTMAX"),
        ];
        let bytes = model_bytes(
            node("LinearRegressor", attrs),
            &[("X", DataType::Float, &[None, Some(2)])],
            &[("Y", DataType::Float, &[None, Some(2)])],
            3,
        );
        let got = score(&bytes, &[r#"{"X": [1, 0]}"#]);
        let y = got[0]["Y"].as_array().expect("two targets");
        let want = 1.0 / (1.0 + (2f64).exp());
        assert!((y[0].as_f64().unwrap() - want).abs() < 1e-6, "{y:?}");
    }

    #[test]
    fn regressor_missing_coefficients_is_refused() {
        assert!(
            LinearRegressor::from_node(&node("LinearRegressor", vec![int("targets", 1)])).is_err()
        );
        let attrs = vec![floats("coefficients", &[1.]), int("targets", 0)];
        assert!(LinearRegressor::from_node(&node("LinearRegressor", attrs)).is_err());
    }
}
