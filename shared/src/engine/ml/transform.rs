//! Score post-transforms shared by the tree, linear and SVM operators (`post_transform`
//! attribute), bit-for-bit the formulas onnxruntime uses, in f32.

use tract_onnx::tract_hir::internal::*;

/// The `post_transform` attribute of the `ai.onnx.ml` classifiers and regressors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PostTransform {
    None,
    Logistic,
    Softmax,
    SoftmaxZero,
    Probit,
}

impl PostTransform {
    /// Parses the attribute value; an absent attribute means `NONE`.
    pub fn parse(s: Option<&str>) -> TractResult<PostTransform> {
        Ok(match s.unwrap_or("NONE") {
            "NONE" => PostTransform::None,
            "LOGISTIC" => PostTransform::Logistic,
            "SOFTMAX" => PostTransform::Softmax,
            "SOFTMAX_ZERO" => PostTransform::SoftmaxZero,
            "PROBIT" => PostTransform::Probit,
            other => bail!(
                "post_transform {other:?} is not one of NONE, LOGISTIC, SOFTMAX, SOFTMAX_ZERO, PROBIT"
            ),
        })
    }

    /// Applies the transform to a score vector of two or more entries, in place.
    pub fn apply(self, scores: &mut [f32]) {
        match self {
            PostTransform::None => {}
            PostTransform::Logistic => scores.iter_mut().for_each(|s| *s = logistic(*s)),
            PostTransform::Probit => scores.iter_mut().for_each(|s| *s = probit(*s)),
            PostTransform::Softmax => softmax(scores),
            PostTransform::SoftmaxZero => softmax_zero(scores),
        }
    }
}

/// Numerically stable logistic function, as onnxruntime's `ComputeLogistic`.
#[inline]
pub(crate) fn logistic(val: f32) -> f32 {
    let v = 1.0 / (1.0 + (-val.abs()).exp());
    if val < 0.0 {
        1.0 - v
    } else {
        v
    }
}

/// Approximate inverse error function (Winitzki), as onnxruntime's `ErfInv` (which uses
/// `M_PI` since onnxruntime 1.17; earlier releases used the literal `3.14159f`).
#[inline]
pub(crate) fn erf_inv(x: f32) -> f32 {
    let sgn = if x < 0.0 { -1.0f32 } else { 1.0 };
    let x = (1.0 - x) * (1.0 + x);
    let log = x.ln();
    let v = 2.0 / (std::f32::consts::PI * 0.147) + 0.5 * log;
    let v2 = 1.0 / 0.147f32 * log;
    let v3 = -v + (v * v - v2).sqrt();
    sgn * v3.sqrt()
}

/// Probit, as onnxruntime's `ComputeProbit`.
#[inline]
pub(crate) fn probit(val: f32) -> f32 {
    std::f32::consts::SQRT_2 * erf_inv(2.0 * val - 1.0)
}

/// Softmax with max subtraction.
pub(crate) fn softmax(values: &mut [f32]) {
    let v_max = values
        .iter()
        .copied()
        .fold(-f32::MAX, |m, v| if v > m { v } else { m });
    let mut sum = 0.0f32;
    for v in values.iter_mut() {
        *v = (*v - v_max).exp();
        sum += *v;
    }
    for v in values.iter_mut() {
        *v /= sum;
    }
}

/// Softmax that leaves (near-)zero scores at zero, as onnxruntime's `ComputeSoftmaxZero`.
pub(crate) fn softmax_zero(values: &mut [f32]) {
    let v_max = values
        .iter()
        .copied()
        .fold(-f32::MAX, |m, v| if v > m { v } else { m });
    let exp_neg_v_max = (-v_max).exp();
    let mut sum = 0.0f32;
    for v in values.iter_mut() {
        if *v > 0.0000001 || *v < -0.0000001 {
            *v = (*v - v_max).exp();
            sum += *v;
        } else {
            *v *= exp_neg_v_max;
        }
    }
    for v in values.iter_mut() {
        *v /= sum;
    }
}

/// libsvm's pairwise-coupling probability estimate, as onnxruntime's
/// `multiclass_probability`. `r` is `k*k` row-major, `p` has `k` entries; `q` and `qp` are
/// scratch of `k*k` and `k` entries.
pub(crate) fn multiclass_probability(
    k: usize,
    r: &[f32],
    p: &mut [f32],
    q: &mut [f32],
    qp: &mut [f32],
) {
    q.iter_mut().for_each(|v| *v = 0.0);
    qp.iter_mut().for_each(|v| *v = 0.0);
    let eps = 0.005f32 / k as f32;
    for i in 0..k {
        p[i] = 1.0 / k as f32;
        for j in 0..i {
            q[i * k + i] += r[j * k + i] * r[j * k + i];
            q[i * k + j] = q[j * k + i];
        }
        for j in i + 1..k {
            q[i * k + i] += r[j * k + i] * r[j * k + i];
            q[i * k + j] = -r[j * k + i] * r[i * k + j];
        }
    }
    for _ in 0..100 {
        let mut pqp = 0.0f32;
        for i in 0..k {
            qp[i] = 0.0;
            for j in 0..k {
                qp[i] += q[i * k + j] * p[j];
            }
            pqp += p[i] * qp[i];
        }
        let mut max_error = 0.0f32;
        for &qpi in qp.iter().take(k) {
            let error = (qpi - pqp).abs();
            if error > max_error {
                max_error = error;
            }
        }
        if max_error < eps {
            break;
        }
        for i in 0..k {
            let diff = (-qp[i] + pqp) / q[i * k + i];
            p[i] += diff;
            pqp = (pqp + diff * (diff * q[i * k + i] + 2.0 * qp[i])) / (1.0 + diff) / (1.0 + diff);
            for j in 0..k {
                qp[j] = (qp[j] + diff * q[i * k + j]) / (1.0 + diff);
                p[j] /= 1.0 + diff;
            }
        }
    }
}

/// libsvm's sigmoid probability, as onnxruntime's `sigmoid_probability`.
#[inline]
pub(crate) fn sigmoid_probability(score: f32, proba: f32, probb: f32) -> f32 {
    1.0 - logistic(score * proba + probb)
}

/// onnxruntime's `write_scores` for a one-score (binary) result: how the second class is
/// added. `add_second_class`: 0/1 all weights positive, 2/3 mixed weights (winning class
/// positive / negative); `None` leaves the single score as it is (after PROBIT if asked).
/// Cases 2 and 3 both give `[-score, score]`, cases 0 and 1 `[1 - score, score]`; under
/// LOGISTIC all four give `[logistic(-score), logistic(score)]`, as onnxruntime's current
/// `write_scores` and its 1.32 output do (checked with TreeEnsembleClassifier).
/// `batched_update_scores_inplace` pairs one score per row the same way (LinearClassifier,
/// SVMClassifier; checked against onnxruntime 1.32), except that it applies PROBIT to the
/// packed scores in place, which those callers reproduce themselves.
pub(crate) fn binary_scores(
    score: f32,
    post_transform: PostTransform,
    add_second_class: Option<u8>,
) -> ([f32; 2], usize) {
    if post_transform == PostTransform::Probit {
        return ([probit(score), 0.0], 1);
    }
    match add_second_class {
        Some(0..=3) if post_transform == PostTransform::Logistic => {
            ([logistic(-score), logistic(score)], 2)
        }
        Some(0) | Some(1) => ([1.0 - score, score], 2),
        Some(2) | Some(3) => ([-score, score], 2),
        _ => ([score, 0.0], 1),
    }
}
