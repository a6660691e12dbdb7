//! SVMClassifier and SVMRegressor (libsvm / liblinear models), as onnxruntime's CPU kernels
//! compute them: kernels, one-vs-one votes, pairwise-coupled probabilities, score layouts.

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::linear::{
    argmax, fact_rows_features, gemm_dot, mlas_stride_k, out_len, post_transform, row,
    rows_features, ClassLabels,
};
use super::transform::{
    binary_scores, multiclass_probability, probit, sigmoid_probability, PostTransform,
};
use crate::engine::op::{as_f32, expansion, tensor, Fact, Kernel};

pub(crate) fn register(reg: &mut OnnxOpRegister) {
    reg.insert("SVMClassifier", svm_classifier);
    reg.insert("SVMRegressor", svm_regressor);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelType {
    Linear,
    Poly,
    Rbf,
    Sigmoid,
}

/// The kernel function `k(x, sv)` with its `kernel_params` `[gamma, coef0, degree]`.
#[derive(Debug, Clone, Copy)]
struct SvmKernel {
    kind: KernelType,
    gamma: f32,
    coef0: f32,
    degree: f32,
}

impl SvmKernel {
    fn from_node(node: &NodeProto) -> TractResult<SvmKernel> {
        let kind = match node
            .get_attr_opt::<&str>("kernel_type")?
            .unwrap_or("LINEAR")
        {
            "LINEAR" => KernelType::Linear,
            "POLY" => KernelType::Poly,
            "RBF" => KernelType::Rbf,
            "SIGMOID" => KernelType::Sigmoid,
            other => {
                return node.bail_attr(
                    "kernel_type",
                    &format!("{other:?} is not one of LINEAR, POLY, RBF, SIGMOID"),
                )
            }
        };
        let params: Vec<f32> = node.get_attr_opt_vec("kernel_params")?.unwrap_or_default();
        let (gamma, coef0, degree) = match params[..] {
            [] => (0.0, 0.0, 0.0),
            [g, c, d, ..] => (g, c, d),
            _ => {
                return node.bail_attr(
                    "kernel_params",
                    &format!(
                        "expected [gamma, coef0, degree], got {} values",
                        params.len()
                    ),
                )
            }
        };
        Ok(SvmKernel {
            kind,
            gamma,
            coef0,
            degree,
        })
    }

    /// The kernel as onnxruntime's `batched_kernel_dot` computes it: RBF by a plain loop,
    /// the others through a GEMM (`stride_k` as [`mlas_stride_k`] for that GEMM) with alpha
    /// `gamma` and bias `coef0` (LINEAR: alpha 1 and bias `c`, `None` for no bias).
    #[inline]
    fn eval(&self, x: &[f32], sv: &[f32], stride_k: usize, c: Option<f32>) -> f32 {
        match self.kind {
            KernelType::Rbf => {
                let mut sum = 0.0f32;
                for (a, b) in x.iter().zip(sv) {
                    let d = a - b;
                    sum += d * d;
                }
                (-self.gamma * sum).exp()
            }
            KernelType::Linear => gemm_dot(x, sv, stride_k, 1.0, c),
            KernelType::Poly => {
                let bias = (self.coef0 != 0.0).then_some(self.coef0);
                let v = gemm_dot(x, sv, stride_k, self.gamma, bias);
                if self.degree == 2.0 {
                    v * v
                } else if self.degree == 3.0 {
                    v * v * v
                } else {
                    v.powf(self.degree)
                }
            }
            KernelType::Sigmoid => {
                let bias = (self.coef0 != 0.0).then_some(self.coef0);
                gemm_dot(x, sv, stride_k, self.gamma, bias).tanh()
            }
        }
    }
}

/// `Some(n / d)` when `d` divides `n` exactly.
fn exact_div(n: usize, d: usize) -> Option<usize> {
    (d > 0 && n.is_multiple_of(d)).then(|| n / d)
}

// ---------------------------------------------------------------------------------------
// SVMClassifier
// ---------------------------------------------------------------------------------------

/// How the classifier scores: libsvm support vectors (one-vs-one) or liblinear weights.
#[derive(Debug)]
enum Mode {
    /// `coefficients` is `[classes - 1, vectors]`, `support_vectors` `[vectors, features]`.
    Svc {
        vectors_per_class: Vec<usize>,
        starts: Vec<usize>,
        vectors: usize,
        support_vectors: Vec<f32>,
    },
    /// `coefficients` is `[classes, features]`; every score adds `rho[0]`.
    Linear,
}

#[derive(Debug)]
struct SvmClassifier {
    kernel: SvmKernel,
    mode: Mode,
    features: usize,
    labels: ClassLabels,
    coefficients: Vec<f32>,
    rho: Vec<f32>,
    prob_a: Vec<f32>,
    prob_b: Vec<f32>,
    post: PostTransform,
    weights_all_positive: bool,
}

fn svm_classifier(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expansion(SvmClassifier::from_node(node)?), vec![]))
}

impl SvmClassifier {
    fn from_node(node: &NodeProto) -> TractResult<SvmClassifier> {
        let mut kernel = SvmKernel::from_node(node)?;
        let coefficients: Vec<f32> = node.get_attr_vec("coefficients")?;
        node.expect_attr("coefficients", !coefficients.is_empty(), "a non-empty list")?;
        let rho: Vec<f32> = node.get_attr_vec("rho")?;
        let prob_a: Vec<f32> = node.get_attr_opt_vec("prob_a")?.unwrap_or_default();
        let prob_b: Vec<f32> = node.get_attr_opt_vec("prob_b")?.unwrap_or_default();
        node.expect_attr("prob_b", prob_a.len() == prob_b.len(), || {
            format!(
                "as many values as prob_a ({}), got {}",
                prob_a.len(),
                prob_b.len()
            )
        })?;
        let Some(labels) = ClassLabels::parse(node, "classlabels_ints")? else {
            return node.bail_attr(
                "classlabels_ints",
                "classlabels_ints or classlabels_strings is required",
            );
        };
        let classes = labels.len();
        let vpc: Vec<i64> = node
            .get_attr_opt_vec("vectors_per_class")?
            .unwrap_or_default();
        let support_vectors: Vec<f32> = node
            .get_attr_opt_vec("support_vectors")?
            .unwrap_or_default();
        node.expect_attr(
            "vectors_per_class",
            vpc.iter().all(|v| *v >= 0),
            "non-negative counts",
        )?;
        let vectors = vpc
            .iter()
            .try_fold(0usize, |acc, v| acc.checked_add(*v as usize));
        let Some(vectors) = vectors else {
            return node.bail_attr("vectors_per_class", "the counts overflow");
        };
        let post = post_transform(node)?;
        let weights_all_positive = coefficients.iter().all(|c| *c >= 0.0);
        let pairs = classes * (classes - 1) / 2;
        let (mode, features) = if vectors > 0 {
            node.expect_attr("vectors_per_class", vpc.len() == classes, || {
                format!("one count per class ({classes}), got {}", vpc.len())
            })?;
            node.expect_attr("classlabels_ints", classes >= 2, "at least two classes")?;
            let features = exact_div(support_vectors.len(), vectors).filter(|f| *f > 0);
            let Some(features) = features else {
                return node.bail_attr(
                    "support_vectors",
                    &format!(
                        "{} values are not {vectors} vectors of equal length",
                        support_vectors.len()
                    ),
                );
            };
            node.expect_attr(
                "coefficients",
                Some(coefficients.len()) == (classes - 1).checked_mul(vectors),
                || {
                    format!(
                        "(classes - 1) x vectors = {} values, got {}",
                        (classes - 1).saturating_mul(vectors),
                        coefficients.len()
                    )
                },
            )?;
            node.expect_attr("rho", rho.len() == pairs, || {
                format!("one value per class pair ({pairs}), got {}", rho.len())
            })?;
            if !prob_a.is_empty() {
                node.expect_attr("prob_a", prob_a.len() == pairs, || {
                    format!("one value per class pair ({pairs}), got {}", prob_a.len())
                })?;
            }
            let vectors_per_class: Vec<usize> = vpc.iter().map(|v| *v as usize).collect();
            let starts = vectors_per_class
                .iter()
                .scan(0, |acc, v| {
                    let s = *acc;
                    *acc += v;
                    Some(s)
                })
                .collect();
            (
                Mode::Svc {
                    vectors_per_class,
                    starts,
                    vectors,
                    support_vectors,
                },
                features,
            )
        } else {
            let Some(features) = exact_div(coefficients.len(), classes) else {
                return node.bail_attr(
                    "coefficients",
                    &format!(
                        "{} values are not {classes} rows (one per class) of weights",
                        coefficients.len()
                    ),
                );
            };
            node.expect_attr("rho", !rho.is_empty(), "at least one value")?;
            kernel.kind = KernelType::Linear;
            (Mode::Linear, features)
        };
        Ok(SvmClassifier {
            kernel,
            mode,
            features,
            labels,
            coefficients,
            rho,
            prob_a,
            prob_b,
            post,
            weights_all_positive,
        })
    }

    fn classes(&self) -> usize {
        self.labels.len()
    }

    fn have_proba(&self) -> bool {
        !self.prob_a.is_empty()
    }

    /// Score columns: one per class, except one per class pair for libsvm without
    /// probabilities (two when there is a single pair).
    fn score_columns(&self) -> usize {
        let c = self.classes();
        match self.mode {
            Mode::Svc { .. } if !self.have_proba() => {
                if c > 2 {
                    c * (c - 1) / 2
                } else {
                    2
                }
            }
            _ => c,
        }
    }

    fn check_features(&self, f: usize) -> TractResult<()> {
        ensure!(
            f == self.features,
            "SVMClassifier expects {} features per row, got {f}",
            self.features
        );
        Ok(())
    }

    /// Liblinear mode: scores, then the label index.
    fn eval_linear(&self, x: &[f32], n: usize, scores: &mut [f32], label_ix: &mut Vec<usize>) {
        let c = self.classes();
        let f = self.features;
        let rho0 = self.rho.first().copied().filter(|r| *r != 0.0);
        let stride_k = mlas_stride_k(c, f);
        for r in 0..n {
            let xr = row(x, r, f);
            let out = &mut scores[r * c..(r + 1) * c];
            for (k, s) in out.iter_mut().enumerate() {
                *s = gemm_dot(xr, row(&self.coefficients, k, f), stride_k, 1.0, rho0);
            }
            let maxclass = argmax(out);
            let max_weight = out.get(maxclass).copied().unwrap_or(0.0);
            let ix = if c == 2 && !self.have_proba() {
                if (self.weights_all_positive && max_weight >= 0.5)
                    || (max_weight > 0.0 && !self.weights_all_positive)
                {
                    1
                } else {
                    maxclass
                }
            } else {
                maxclass
            };
            label_ix.push(ix);
            if c > 1 {
                self.post.apply(out);
            } else if self.post == PostTransform::Probit {
                out.iter_mut().for_each(|s| *s = probit(*s));
            }
        }
    }

    /// Libsvm mode: kernels, one-vs-one decision values and votes, then probabilities or
    /// decision values as scores.
    #[allow(clippy::too_many_arguments)]
    fn eval_svc(
        &self,
        x: &[f32],
        n: usize,
        vectors_per_class: &[usize],
        starts: &[usize],
        vectors: usize,
        support_vectors: &[f32],
        scores: &mut [f32],
        label_ix: &mut Vec<usize>,
    ) {
        let c = self.classes();
        let f = self.features;
        let pairs = c * (c - 1) / 2;
        let cols = self.score_columns();
        let have_proba = self.have_proba();
        // scratch, once per call
        let mut kernels = vec![0.0f32; vectors];
        let mut votes = vec![0i64; c];
        let mut decisions = vec![0.0f32; pairs];
        let (mut probsp2, mut q, mut qp) = if have_proba {
            (vec![0.0f32; c * c], vec![0.0f32; c * c], vec![0.0f32; c])
        } else {
            (Vec::new(), Vec::new(), Vec::new())
        };
        let coefs =
            |start: usize, len: usize| self.coefficients.get(start..start + len).unwrap_or(&[]);
        let stride_k = mlas_stride_k(vectors, f);
        for r in 0..n {
            let xr = row(x, r, f);
            for (v, k) in kernels.iter_mut().enumerate() {
                *k = self
                    .kernel
                    .eval(xr, row(support_vectors, v, f), stride_k, None);
            }
            votes.iter_mut().for_each(|v| *v = 0);
            let mut idx = 0;
            for i in 0..c.saturating_sub(1) {
                let (si, ci) = (starts[i], vectors_per_class[i]);
                for j in i + 1..c {
                    let (sj, cj) = (starts[j], vectors_per_class[j]);
                    // float products summed in double, as onnxruntime does
                    let mut sum = 0.0f64;
                    for (c, k) in coefs((j - 1) * vectors + si, ci)
                        .iter()
                        .zip(kernels.get(si..si + ci).unwrap_or(&[]))
                    {
                        sum += (c * k) as f64;
                    }
                    for (c, k) in coefs(i * vectors + sj, cj)
                        .iter()
                        .zip(kernels.get(sj..sj + cj).unwrap_or(&[]))
                    {
                        sum += (c * k) as f64;
                    }
                    sum += self.rho.get(idx).copied().unwrap_or(0.0) as f64;
                    decisions[idx] = sum as f32;
                    votes[if sum > 0.0 { i } else { j }] += 1;
                    idx += 1;
                }
            }
            label_ix.push(argmax(&votes));
            let out = &mut scores[r * cols..(r + 1) * cols];
            if have_proba {
                probsp2.iter_mut().for_each(|v| *v = 0.0);
                let mut index = 0;
                for i in 0..c {
                    for j in i + 1..c {
                        let (a, b) = (self.prob_a[index], self.prob_b[index]);
                        let val =
                            sigmoid_probability(decisions[index], a, b).clamp(1.0e-7, 1.0 - 1.0e-7);
                        probsp2[i * c + j] = val;
                        probsp2[j * c + i] = 1.0 - val;
                        index += 1;
                    }
                }
                multiclass_probability(c, &probsp2, out, &mut q, &mut qp);
                self.post.apply(out);
            } else if c > 2 {
                out.copy_from_slice(&decisions);
                self.post.apply(out);
            } else {
                let s = decisions.first().copied().unwrap_or(0.0);
                if self.post == PostTransform::Probit {
                    out.copy_from_slice(&[probit(s), 0.0]);
                } else {
                    let add = if self.post == PostTransform::None {
                        2
                    } else {
                        0
                    };
                    out.copy_from_slice(&binary_scores(s, self.post, Some(add)).0);
                }
            }
        }
    }
}

impl Kernel for SvmClassifier {
    fn op_type(&self) -> &'static str {
        "SVMClassifier"
    }

    fn output_count(&self) -> usize {
        2
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == 1,
            "SVMClassifier takes one input, got {}",
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
        let input = inputs.first().context("SVMClassifier needs an input")?;
        let (n, f) = rows_features(self.op_type(), input.shape())?;
        self.check_features(f)?;
        let x = as_f32(input)?;
        let cols = self.score_columns();
        let mut scores = vec![0.0f32; out_len(n, cols)?];
        let mut label_ix = Vec::with_capacity(n);
        match &self.mode {
            Mode::Linear => self.eval_linear(&x, n, &mut scores, &mut label_ix),
            Mode::Svc {
                vectors_per_class,
                starts,
                vectors,
                support_vectors,
            } => self.eval_svc(
                &x,
                n,
                vectors_per_class,
                starts,
                *vectors,
                support_vectors,
                &mut scores,
                &mut label_ix,
            ),
        }
        Ok(vec![
            self.labels.gather(&label_ix)?,
            tensor(&[n, cols], scores)?,
        ])
    }
}

// ---------------------------------------------------------------------------------------
// SVMRegressor
// ---------------------------------------------------------------------------------------

/// `y = Σ coefficients[v] · k(x, sv[v]) + rho[0]` (or `x · coefficients + rho[0]` without
/// support vectors); `one_class` maps to ±1. onnxruntime ignores `post_transform` here, and
/// so do we (after validating it).
#[derive(Debug)]
struct SvmRegressor {
    kernel: SvmKernel,
    /// `[vectors, features]`; empty in linear mode.
    support_vectors: Vec<f32>,
    vectors: usize,
    features: usize,
    coefficients: Vec<f32>,
    rho0: f32,
    one_class: bool,
}

fn svm_regressor(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expansion(SvmRegressor::from_node(node)?), vec![]))
}

impl SvmRegressor {
    fn from_node(node: &NodeProto) -> TractResult<SvmRegressor> {
        let mut kernel = SvmKernel::from_node(node)?;
        let n_supports: i64 = node.get_attr_opt("n_supports")?.unwrap_or(0);
        node.expect_attr("n_supports", n_supports >= 0, "a non-negative count")?;
        let vectors = n_supports as usize;
        let coefficients: Vec<f32> = node.get_attr_vec("coefficients")?;
        node.expect_attr("coefficients", !coefficients.is_empty(), "a non-empty list")?;
        let rho: Vec<f32> = node.get_attr_vec("rho")?;
        node.expect_attr("rho", !rho.is_empty(), "at least one value")?;
        let one_class: i64 = node.get_attr_opt("one_class")?.unwrap_or(0);
        let _ = post_transform(node)?; // validated; onnxruntime does not apply it
        let support_vectors: Vec<f32> = node
            .get_attr_opt_vec("support_vectors")?
            .unwrap_or_default();
        let features = if vectors > 0 {
            let Some(f) = exact_div(support_vectors.len(), vectors).filter(|f| *f > 0) else {
                return node.bail_attr(
                    "support_vectors",
                    &format!(
                        "{} values are not {vectors} vectors (n_supports) of equal length",
                        support_vectors.len()
                    ),
                );
            };
            node.expect_attr("coefficients", coefficients.len() == vectors, || {
                format!(
                    "one value per support vector ({vectors}), got {}",
                    coefficients.len()
                )
            })?;
            f
        } else {
            kernel.kind = KernelType::Linear;
            coefficients.len()
        };
        Ok(SvmRegressor {
            kernel,
            support_vectors: if vectors > 0 {
                support_vectors
            } else {
                Vec::new()
            },
            vectors,
            features,
            coefficients,
            rho0: rho[0],
            one_class: one_class != 0,
        })
    }

    fn check_features(&self, f: usize) -> TractResult<()> {
        ensure!(
            f == self.features,
            "SVMRegressor expects {} features per row, got {f}",
            self.features
        );
        Ok(())
    }
}

impl Kernel for SvmRegressor {
    fn op_type(&self) -> &'static str {
        "SVMRegressor"
    }

    fn output_count(&self) -> usize {
        1
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == 1,
            "SVMRegressor takes one input, got {}",
            inputs.len()
        );
        let (n, f) = fact_rows_features(self.op_type(), &inputs[0])?;
        if let Some(f) = f {
            self.check_features(f)?;
        }
        Ok(vec![Fact::new(f32::datum_type(), [n, 1.into()])])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        let input = inputs.first().context("SVMRegressor needs an input")?;
        let (n, f) = rows_features(self.op_type(), input.shape())?;
        self.check_features(f)?;
        let x = as_f32(input)?;
        let mut out = vec![0.0f32; n];
        // scratch, once per call
        let mut kernels = vec![0.0f32; self.vectors];
        let kernel_stride = mlas_stride_k(self.vectors, f);
        let sum_stride = mlas_stride_k(1, self.vectors);
        let linear_stride = mlas_stride_k(1, f);
        let rho0 = (self.rho0 != 0.0).then_some(self.rho0);
        for (r, y) in out.iter_mut().enumerate() {
            let xr = row(&x, r, f);
            *y = if self.vectors > 0 {
                for (v, k) in kernels.iter_mut().enumerate() {
                    *k =
                        self.kernel
                            .eval(xr, row(&self.support_vectors, v, f), kernel_stride, None);
                }
                gemm_dot(
                    &kernels,
                    &self.coefficients,
                    sum_stride,
                    1.0,
                    Some(self.rho0),
                )
            } else {
                self.kernel
                    .eval(xr, &self.coefficients, linear_stride, rho0)
            };
            if self.one_class {
                *y = if *y > 0.0 { 1.0 } else { -1.0 };
            }
        }
        Ok(vec![tensor(&[n, 1], out)?])
    }
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // reference values as onnxruntime printed them
mod tests {
    use super::super::linear::test_util::*;
    use super::*;

    const X4: [f32; 8] = [1., 0., 0., 1., 2., 2., -1., 0.5];

    fn binary(extra: Vec<tract_onnx::pb::AttributeProto>) -> TractResult<SvmClassifier> {
        let mut attrs = vec![
            string("kernel_type", "RBF"),
            floats("kernel_params", &[0.5, 0.0, 3.0]),
            ints("vectors_per_class", &[1, 1]),
            floats("support_vectors", &[0., 0., 1., 2.]),
            floats("coefficients", &[0.7, -0.4]),
            floats("rho", &[0.1]),
            ints("classlabels_ints", &[5, 9]),
        ];
        attrs.extend(extra);
        SvmClassifier::from_node(&node("SVMClassifier", attrs))
    }

    #[test]
    fn binary_without_probabilities_scores_one_pair() {
        let out = run(&binary(vec![]).unwrap(), &[mat(4, 2, &X4)]).unwrap();
        assert_eq!(i64s(&out[0]), [5, 5, 9, 5]);
        assert_eq!(out[1].shape(), [4, 2]);
        close(
            &f32s(&out[1]),
            &[
                -0.47043735,
                0.47043735,
                -0.37741968,
                0.37741968,
                0.12979132,
                -0.12979132,
                -0.45710826,
                0.45710826,
            ],
        );
        let k = binary(vec![string("post_transform", "LOGISTIC")]).unwrap();
        let out = run(&k, &[mat(4, 2, &X4)]).unwrap();
        close(
            &f32s(&out[1]),
            &[
                0.38451272, 0.61548728, 0.40674943, 0.59325057, 0.53240234, 0.46759766, 0.387672,
                0.612328,
            ],
        );
        let k = binary(vec![string("post_transform", "PROBIT")]).unwrap();
        let s = f32s(&run(&k, &[mat(4, 2, &X4)]).unwrap()[1]);
        close(&[s[0], s[2], s[6]], &[-0.07417376, -0.31227562, -0.1077233]);
    }

    #[test]
    fn binary_probabilities() {
        let k = binary(vec![floats("prob_a", &[-1.5]), floats("prob_b", &[0.2])]).unwrap();
        let out = run(&k, &[mat(4, 2, &X4)]).unwrap();
        assert_eq!(i64s(&out[0]), [5, 5, 9, 5]);
        close(
            &f32s(&out[1]),
            &[
                0.6225586, 0.37744144, 0.59011406, 0.40988591, 0.40178749, 0.59821248, 0.61800653,
                0.3819935,
            ],
        );
    }

    fn three(extra: Vec<tract_onnx::pb::AttributeProto>) -> SvmClassifier {
        let mut attrs = vec![
            string("kernel_type", "POLY"),
            floats("kernel_params", &[0.5, 0.3, 2.0]),
            ints("vectors_per_class", &[1, 2, 1]),
            floats("support_vectors", &[0., 0., 1., 2., -1., 1., 0.5, -0.5]),
            floats("coefficients", &[0.7, -0.4, 0.3, -0.6, 0.2, 0.5, -0.1, 0.9]),
            floats("rho", &[0.1, -0.2, 0.3]),
            ints("classlabels_ints", &[1, 2, 3]),
        ];
        attrs.extend(extra);
        SvmClassifier::from_node(&node("SVMClassifier", attrs)).unwrap()
    }

    #[test]
    fn multiclass_votes_and_pair_scores() {
        let out = run(&three(vec![]), &[mat(4, 2, &X4)]).unwrap();
        assert_eq!(i64s(&out[0]), [2, 2, 2, 1]);
        assert_eq!(out[1].shape(), [4, 3]);
        close(
            &f32s(&out[1]),
            &[
                -0.081, -0.3635, 0.88825, -0.321, -0.1835, 1.08325, -4.166, -0.236, 5.817, 0.45775,
                -0.185375, 0.2398125,
            ],
        );
        let out = run(
            &three(vec![string("post_transform", "SOFTMAX")]),
            &[mat(4, 2, &X4)],
        )
        .unwrap();
        close(&f32s(&out[1])[..3], &[0.22779751, 0.17173578, 0.60046673]);
    }

    #[test]
    fn multiclass_probabilities_by_pairwise_coupling() {
        let k = three(vec![
            floats("prob_a", &[-1.5, -2.0, -0.7]),
            floats("prob_b", &[0.2, -0.1, 0.05]),
        ]);
        let out = run(&k, &[mat(4, 2, &X4)]).unwrap();
        assert_eq!(i64s(&out[0]), [2, 2, 2, 1]);
        close(
            &f32s(&out[1]),
            &[
                0.24499099, 0.44487187, 0.31013721, 0.23276806, 0.50218987, 0.26504219, 0.00404648,
                0.98008901, 0.01586437, 0.34954453, 0.29499382, 0.35546169,
            ],
        );
    }

    #[test]
    fn linear_mode_binary_label_rules() {
        let linear = |coef: &[f32]| {
            let attrs = vec![
                floats("coefficients", coef),
                floats("rho", &[0.1, 0.5]),
                ints("classlabels_ints", &[5, 9]),
                floats("kernel_params", &[1., 0., 1.]),
            ];
            SvmClassifier::from_node(&node("SVMClassifier", attrs)).unwrap()
        };
        let out = run(&linear(&[0.7, -0.7, 0.2, 0.3]), &[mat(4, 2, &X4)]).unwrap();
        assert_eq!(i64s(&out[0]), [9, 9, 9, 9]);
        close(
            &f32s(&out[1]),
            &[0.8, 0.3, -0.6, 0.4, 0.1, 1.1, -0.95, 0.05],
        );
        let out = run(&linear(&[0.1, 0.2, 0.2, 0.05]), &[mat(4, 2, &X4)]).unwrap();
        assert_eq!(i64s(&out[0]), [9, 5, 9, 5]);
    }

    #[test]
    fn regressor_kernels_and_one_class() {
        for (kind, params, want) in [
            (
                "RBF",
                [0.5, 0., 3.],
                [0.27043736, 0.17741969, -0.32979134, 0.25710824],
            ),
            (
                "SIGMOID",
                [0.5, 0.2, 3.],
                [-0.20358442, -0.29529914, -0.36051029, -0.04078741],
            ),
            (
                "POLY",
                [0.5, 0.2, 3.],
                [-0.23159999, -0.78560013, -13.201601, -0.0976],
            ),
        ] {
            for one_class in [0, 1] {
                let attrs = vec![
                    string("kernel_type", kind),
                    floats("kernel_params", &params),
                    int("n_supports", 2),
                    floats("support_vectors", &[0., 0., 1., 2.]),
                    floats("coefficients", &[0.7, -0.4]),
                    floats("rho", &[-0.1]),
                    int("one_class", one_class),
                    string("post_transform", "LOGISTIC"),
                ];
                let k = SvmRegressor::from_node(&node("SVMRegressor", attrs)).unwrap();
                let out = run(&k, &[mat(4, 2, &X4)]).unwrap();
                assert_eq!(out[0].shape(), [4, 1]);
                let want: Vec<f32> = if one_class == 1 {
                    want.iter()
                        .map(|v| if *v > 0.0 { 1.0 } else { -1.0 })
                        .collect()
                } else {
                    want.to_vec()
                };
                close(&f32s(&out[0]), &want);
            }
        }
    }

    #[test]
    fn malformed_attributes_are_refused() {
        let bad: Vec<Vec<tract_onnx::pb::AttributeProto>> = vec![
            vec![string("kernel_type", "CUBIC")],
            vec![floats("kernel_params", &[0.5])],
            vec![floats("prob_a", &[-1.0])],
            vec![
                floats("prob_a", &[-1.0, -1.0]),
                floats("prob_b", &[0.0, 0.0]),
            ],
            vec![ints("vectors_per_class", &[1, 2])],
            vec![ints("vectors_per_class", &[1, -1])],
            vec![floats("rho", &[0.1, 0.2])],
            vec![string("post_transform", "TANH")],
        ];
        for extra in bad {
            let names: Vec<String> = extra.iter().map(|a| a.name.clone()).collect();
            let mut attrs = vec![
                string("kernel_type", "RBF"),
                floats("kernel_params", &[0.5, 0.0, 3.0]),
                ints("vectors_per_class", &[1, 1]),
                floats("support_vectors", &[0., 0., 1., 2.]),
                floats("coefficients", &[0.7, -0.4]),
                floats("rho", &[0.1]),
                ints("classlabels_ints", &[5, 9]),
            ];
            attrs.retain(|a| !names.contains(&a.name));
            attrs.extend(extra);
            let err = SvmClassifier::from_node(&node("SVMClassifier", attrs)).unwrap_err();
            assert!(
                format!("{err:?}").contains("attribute"),
                "{names:?}: {err:?}"
            );
        }
        let attrs = vec![floats("coefficients", &[0.7]), floats("rho", &[0.1])];
        assert!(
            SvmClassifier::from_node(&node("SVMClassifier", attrs)).is_err(),
            "labels are required"
        );
        let attrs = vec![
            int("n_supports", 3),
            floats("support_vectors", &[0., 0., 1., 2.]),
            floats("coefficients", &[0.7, -0.4, 0.1]),
            floats("rho", &[0.1]),
        ];
        assert!(SvmRegressor::from_node(&node("SVMRegressor", attrs)).is_err());
    }

    #[test]
    fn wrong_feature_count_is_an_error() {
        let k = binary(vec![]).unwrap();
        assert!(run(&k, &[mat(1, 3, &[1., 2., 3.])]).is_err());
        let s = tensor(&[1, 2], vec!["a".to_string(), "b".to_string()]).unwrap();
        assert!(k.eval(&[&s]).is_err());
    }
}
