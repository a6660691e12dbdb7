//! Element-wise preprocessing operators: Scaler, Imputer, Normalizer, Binarizer.

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::engine::op::{as_f32, expansion, matrix_dims, slice, tensor, Fact, Kernel};

pub(crate) fn register(reg: &mut OnnxOpRegister) {
    reg.insert("Scaler", scaler);
    reg.insert("Binarizer", binarizer);
    reg.insert("Imputer", imputer);
    reg.insert("Normalizer", normalizer);
}

/// `Y = (X - offset) * scale`, per column or with one value for all columns. Output f32.
#[derive(Debug)]
struct Scaler {
    offset: Vec<f32>,
    scale: Vec<f32>,
}

fn scaler(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let offset: Vec<f32> = node.get_attr_opt_vec("offset")?.unwrap_or_default();
    let scale: Vec<f32> = node.get_attr_opt_vec("scale")?.unwrap_or_default();
    node.expect_attr(
        "offset",
        !offset.is_empty() || !scale.is_empty(),
        "offset or scale",
    )?;
    Ok((expansion(Scaler { offset, scale }), vec![]))
}

impl Kernel for Scaler {
    fn op_type(&self) -> &'static str {
        "Scaler"
    }

    fn output_count(&self) -> usize {
        1
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == 1,
            "Scaler takes one input, got {}",
            inputs.len()
        );
        Ok(vec![Fact::new(
            f32::datum_type(),
            inputs[0].shape.iter().cloned(),
        )])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        let x = as_f32(inputs[0])?;
        let (_, cols) = matrix_dims(inputs[0].shape());
        let per = |v: &[f32], default: f32| -> TractResult<Vec<f32>> {
            Ok(match v.len() {
                0 => vec![default; cols],
                1 => vec![v[0]; cols],
                n if n == cols => v.to_vec(),
                n => bail!("Scaler has {n} offset/scale values for {cols} columns"),
            })
        };
        let offset = per(&self.offset, 0.0)?;
        let scale = per(&self.scale, 1.0)?;
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(cols.max(1)) {
            for ((v, o), s) in row.iter().zip(&offset).zip(&scale) {
                out.push((v - o) * s);
            }
        }
        Ok(vec![tensor(inputs[0].shape(), out)?])
    }
}

/// `Y = X > threshold ? 1 : 0`, keeping the input's element type (float or double).
#[derive(Debug)]
struct Binarizer {
    threshold: f32,
}

fn binarizer(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let threshold: f32 = node.get_attr_opt("threshold")?.unwrap_or(0.0);
    Ok((expansion(Binarizer { threshold }), vec![]))
}

impl Kernel for Binarizer {
    fn op_type(&self) -> &'static str {
        "Binarizer"
    }

    fn output_count(&self) -> usize {
        1
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == 1,
            "Binarizer takes one input, got {}",
            inputs.len()
        );
        Ok(vec![inputs[0].clone()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        let x = inputs[0];
        let out = match x.datum_type() {
            DatumType::F64 => {
                let t = self.threshold as f64;
                let v = crate::engine::op::slice::<f64>(x)?;
                tensor(
                    x.shape(),
                    v.iter().map(|v| if *v > t { 1.0 } else { 0.0 }).collect(),
                )?
            }
            _ => {
                let v = as_f32(x)?;
                let v: Vec<f32> = v
                    .iter()
                    .map(|v| if *v > self.threshold { 1.0 } else { 0.0 })
                    .collect();
                tensor(x.shape(), v)?
                    .cast_to_dt(x.datum_type())?
                    .into_owned()
            }
        };
        Ok(vec![out])
    }
}

/// Replaces values equal to `replaced_value_*` (NaN matches NaN) with `imputed_value_*`: one
/// value per column when there are exactly as many as columns (dimension 1), else the first
/// for every element, as onnxruntime does. Keeps the input's type: float inputs (float,
/// double) use the float attributes, integer inputs (int64, int32) the int64 ones.
#[derive(Debug)]
struct Imputer {
    floats: Vec<f32>,
    replaced_float: f32,
    ints: Vec<i64>,
    replaced_int: i64,
}

fn imputer(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expansion(Imputer::from_node(node)?), vec![]))
}

impl Imputer {
    fn from_node(node: &NodeProto) -> TractResult<Imputer> {
        let floats: Vec<f32> = node
            .get_attr_opt_vec("imputed_value_floats")?
            .unwrap_or_default();
        let ints: Vec<i64> = node
            .get_attr_opt_vec("imputed_value_int64s")?
            .unwrap_or_default();
        node.expect_attr(
            "imputed_value_floats",
            floats.is_empty() != ints.is_empty(),
            "exactly one of imputed_value_floats and imputed_value_int64s",
        )?;
        // the ONNX defaults (0), which onnxruntime applies when the attribute is absent
        let replaced_float: f32 = node.get_attr_opt("replaced_value_float")?.unwrap_or(0.0);
        let replaced_int: i64 = node.get_attr_opt("replaced_value_int64")?.unwrap_or(0);
        Ok(Imputer {
            floats,
            replaced_float,
            ints,
            replaced_int,
        })
    }
}

/// The per-column stride onnxruntime uses: dimension 0 of a vector, else dimension 1.
fn dim1(shape: &[usize]) -> usize {
    match shape {
        [] => 1,
        [d] => *d,
        [_, d, ..] => *d,
    }
}

fn impute<T: Copy>(x: &[T], stride: usize, values: &[T], hit: impl Fn(T) -> bool) -> Vec<T> {
    let per_column = values.len() == stride && stride > 0;
    let first = values.first().copied();
    x.iter()
        .enumerate()
        .map(|(i, v)| match (hit(*v), first) {
            (true, Some(f)) => {
                if per_column {
                    values.get(i % stride).copied().unwrap_or(f)
                } else {
                    f
                }
            }
            _ => *v,
        })
        .collect()
}

impl Kernel for Imputer {
    fn op_type(&self) -> &'static str {
        "Imputer"
    }

    fn output_count(&self) -> usize {
        1
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == 1,
            "Imputer takes one input, got {}",
            inputs.len()
        );
        let f = &inputs[0];
        ensure!(
            !f.shape.is_empty(),
            "Imputer input must have at least one dimension"
        );
        match f.dt {
            DatumType::F32 | DatumType::F64 => ensure!(
                !self.floats.is_empty(),
                "Imputer has imputed_value_int64s but a {:?} input (needs imputed_value_floats)",
                f.dt
            ),
            DatumType::I64 | DatumType::I32 => ensure!(
                !self.ints.is_empty(),
                "Imputer has imputed_value_floats but a {:?} input (needs imputed_value_int64s)",
                f.dt
            ),
            dt => bail!("Imputer input must be float, double, int64 or int32, got {dt:?}"),
        }
        Ok(vec![f.clone()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        let x = inputs.first().context("Imputer needs an input")?;
        ensure!(
            x.rank() > 0,
            "Imputer input must have at least one dimension"
        );
        let stride = dim1(x.shape());
        let shape = x.shape();
        let out = match x.datum_type() {
            DatumType::F32 => {
                ensure!(
                    !self.floats.is_empty(),
                    "Imputer needs imputed_value_floats for a float input"
                );
                let r = self.replaced_float;
                tensor(
                    shape,
                    impute(slice::<f32>(x)?, stride, &self.floats, |v| {
                        (v.is_nan() && r.is_nan()) || v == r
                    }),
                )?
            }
            DatumType::F64 => {
                ensure!(
                    !self.floats.is_empty(),
                    "Imputer needs imputed_value_floats for a double input"
                );
                let r = self.replaced_float as f64;
                let values: Vec<f64> = self.floats.iter().map(|v| *v as f64).collect();
                tensor(
                    shape,
                    impute(slice::<f64>(x)?, stride, &values, |v| {
                        (v.is_nan() && r.is_nan()) || v == r
                    }),
                )?
            }
            DatumType::I64 => {
                ensure!(
                    !self.ints.is_empty(),
                    "Imputer needs imputed_value_int64s for an int64 input"
                );
                let r = self.replaced_int;
                tensor(
                    shape,
                    impute(slice::<i64>(x)?, stride, &self.ints, |v| v == r),
                )?
            }
            DatumType::I32 => {
                ensure!(
                    !self.ints.is_empty(),
                    "Imputer needs imputed_value_int64s for an int32 input"
                );
                let r = self.replaced_int;
                let values: Vec<i32> = self.ints.iter().map(|v| *v as i32).collect();
                tensor(
                    shape,
                    impute(slice::<i32>(x)?, stride, &values, |v| v as i64 == r),
                )?
            }
            dt => bail!("Imputer input must be float, double, int64 or int32, got {dt:?}"),
        };
        Ok(vec![out])
    }
}

/// Normalizes each row of a matrix (a vector as one row): MAX divides by the maximum, L1 by
/// the sum of absolute values, L2 by the Euclidean norm; all-zero norms leave the values as
/// they are. Output f32. Ranks above 2 are refused, as onnxruntime 1.32 does.
#[derive(Debug)]
struct Normalizer {
    norm: Norm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Norm {
    Max,
    L1,
    L2,
}

fn normalizer(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expansion(Normalizer::from_node(node)?), vec![]))
}

impl Normalizer {
    fn from_node(node: &NodeProto) -> TractResult<Normalizer> {
        let norm = match node.get_attr_opt::<&str>("norm")?.unwrap_or("MAX") {
            "MAX" => Norm::Max,
            "L1" => Norm::L1,
            "L2" => Norm::L2,
            other => {
                return node.bail_attr("norm", &format!("{other:?} is not one of MAX, L1, L2"))
            }
        };
        Ok(Normalizer { norm })
    }
}

/// What the normalizations need from an element, computed in the element's own type first
/// as onnxruntime's templates do.
trait NormElem: Datum + Copy {
    fn f(self) -> f32;
    fn abs_f(self) -> f32;
    fn sq_f(self) -> f32;
    fn negative(self) -> bool;
}

impl NormElem for f32 {
    fn f(self) -> f32 {
        self
    }
    fn abs_f(self) -> f32 {
        self.abs()
    }
    fn sq_f(self) -> f32 {
        self * self
    }
    fn negative(self) -> bool {
        self < 0.0
    }
}

impl NormElem for f64 {
    fn f(self) -> f32 {
        self as f32
    }
    fn abs_f(self) -> f32 {
        self.abs() as f32
    }
    fn sq_f(self) -> f32 {
        (self * self) as f32
    }
    fn negative(self) -> bool {
        self < 0.0
    }
}

impl NormElem for i64 {
    fn f(self) -> f32 {
        self as f32
    }
    fn abs_f(self) -> f32 {
        self.wrapping_abs() as f32
    }
    fn sq_f(self) -> f32 {
        self.wrapping_mul(self) as f32
    }
    fn negative(self) -> bool {
        self < 0
    }
}

impl NormElem for i32 {
    fn f(self) -> f32 {
        self as f32
    }
    fn abs_f(self) -> f32 {
        self.wrapping_abs() as f32
    }
    fn sq_f(self) -> f32 {
        self.wrapping_mul(self) as f32
    }
    fn negative(self) -> bool {
        self < 0
    }
}

fn normalize<T: NormElem>(norm: Norm, x: &[T], shape: &[usize]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let stride = dim1(shape);
    if stride == 0 || x.is_empty() {
        return out;
    }
    let inc: usize = if shape.len() > 1 {
        shape[2..].iter().product()
    } else {
        1
    };
    let loops = x.len() / stride;
    for n in 0..loops {
        let offset = (n % inc) + (n / inc) * (stride * inc);
        let ix = (0..stride)
            .map(|s| offset + s * inc)
            .filter(|i| *i < x.len());
        match norm {
            Norm::Max => {
                let max = ix.clone().fold(f32::MIN, |m, i| m.max(x[i].f()));
                for i in ix {
                    out[i] = if max != 0.0 { x[i].f() / max } else { x[i].f() };
                }
            }
            Norm::L1 => {
                let sum: f32 = ix.clone().fold(0.0, |s, i| s + x[i].abs_f());
                for i in ix {
                    out[i] = if sum != 0.0 { x[i].f() / sum } else { x[i].f() };
                }
            }
            Norm::L2 => {
                let sum: f32 = ix.clone().fold(0.0, |s, i| s + x[i].sq_f());
                for i in ix {
                    out[i] = if sum != 0.0 {
                        let v = (x[i].sq_f() / sum).sqrt();
                        if x[i].negative() {
                            -v
                        } else {
                            v
                        }
                    } else {
                        x[i].f()
                    };
                }
            }
        }
    }
    out
}

impl Kernel for Normalizer {
    fn op_type(&self) -> &'static str {
        "Normalizer"
    }

    fn output_count(&self) -> usize {
        1
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == 1,
            "Normalizer takes one input, got {}",
            inputs.len()
        );
        let f = &inputs[0];
        ensure!(
            (1..=2).contains(&f.shape.len()),
            "Normalizer input must have rank 1 or 2, got {}",
            f.shape.len()
        );
        ensure!(
            matches!(
                f.dt,
                DatumType::F32 | DatumType::F64 | DatumType::I64 | DatumType::I32
            ),
            "Normalizer input must be float, double, int64 or int32, got {:?}",
            f.dt
        );
        Ok(vec![Fact::new(f32::datum_type(), f.shape.iter().cloned())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        let x = inputs.first().context("Normalizer needs an input")?;
        ensure!(
            (1..=2).contains(&x.rank()),
            "Normalizer input must have rank 1 or 2, got {}",
            x.rank()
        );
        let shape = x.shape();
        let out = match x.datum_type() {
            DatumType::F32 => normalize(self.norm, slice::<f32>(x)?, shape),
            DatumType::F64 => normalize(self.norm, slice::<f64>(x)?, shape),
            DatumType::I64 => normalize(self.norm, slice::<i64>(x)?, shape),
            DatumType::I32 => normalize(self.norm, slice::<i32>(x)?, shape),
            dt => bail!("Normalizer input must be float, double, int64 or int32, got {dt:?}"),
        };
        Ok(vec![tensor(shape, out)?])
    }
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // reference values as onnxruntime printed them
mod tests {
    use super::super::linear::test_util::*;
    use super::*;

    #[test]
    fn imputer_replaces_nan_per_column_or_with_the_first_value() {
        let x = mat(2, 3, &[1., f32::NAN, 0., f32::NAN, 5., 2.5]);
        let attrs = vec![
            floats("imputed_value_floats", &[7., 8., 9.]),
            float("replaced_value_float", f32::NAN),
        ];
        let k = Imputer::from_node(&node("Imputer", attrs)).unwrap();
        assert_eq!(
            f32s(&run(&k, std::slice::from_ref(&x)).unwrap()[0]),
            [1., 8., 0., 7., 5., 2.5]
        );
        // two values for three columns: the first one everywhere
        let attrs = vec![
            floats("imputed_value_floats", &[7., 8.]),
            float("replaced_value_float", 2.5),
        ];
        let k = Imputer::from_node(&node("Imputer", attrs)).unwrap();
        let out = f32s(&run(&k, std::slice::from_ref(&x)).unwrap()[0]);
        assert_eq!(&out[5..], &[7.]);
        assert!(out[1].is_nan());
        // replaced_value_float defaults to 0, as onnxruntime fills in the ONNX default
        let k = Imputer::from_node(&node(
            "Imputer",
            vec![floats("imputed_value_floats", &[7., 8., 9.])],
        ))
        .unwrap();
        let out = f32s(&run(&k, &[x]).unwrap()[0]);
        assert_eq!(out[2], 9.);
        assert!(out[1].is_nan());
    }

    #[test]
    fn imputer_int64_and_type_checks() {
        let attrs = vec![
            ints("imputed_value_int64s", &[10, 20]),
            int("replaced_value_int64", -1),
        ];
        let k = Imputer::from_node(&node("Imputer", attrs)).unwrap();
        let x = tensor(&[2, 2], vec![-1i64, 3, 4, -1]).unwrap();
        assert_eq!(i64s(&run(&k, &[x]).unwrap()[0]), [10, 3, 4, 20]);
        assert!(
            run(&k, &[mat(1, 2, &[1., 2.])]).is_err(),
            "float input, int64 values"
        );
        assert!(Imputer::from_node(&node("Imputer", vec![])).is_err());
        let attrs = vec![
            ints("imputed_value_int64s", &[1]),
            floats("imputed_value_floats", &[1.]),
        ];
        assert!(Imputer::from_node(&node("Imputer", attrs)).is_err());
    }

    #[test]
    fn normalizer_norms() {
        let norm =
            |n: &str| Normalizer::from_node(&node("Normalizer", vec![string("norm", n)])).unwrap();
        let x = mat(3, 3, &[1., -2., 2., 0., 0., 0., -4., -2., 0.]);
        // the last row's maximum is 0: onnxruntime leaves it as it is
        close(
            &f32s(&run(&norm("MAX"), std::slice::from_ref(&x)).unwrap()[0]),
            &[0.5, -1., 1., 0., 0., 0., -4., -2., 0.],
        );
        close(
            &f32s(&run(&norm("L1"), std::slice::from_ref(&x)).unwrap()[0]),
            &[0.2, -0.4, 0.4, 0., 0., 0., -4. / 6., -2. / 6., 0.],
        );
        let l2 = 20f32.sqrt();
        close(
            &f32s(&run(&norm("L2"), &[x]).unwrap()[0]),
            &[
                1. / 3.,
                -2. / 3.,
                2. / 3.,
                0.,
                0.,
                0.,
                -4. / l2,
                -2. / l2,
                0.,
            ],
        );
        let xi = tensor(&[1, 2], vec![3i64, -4]).unwrap();
        let out = run(&norm("L2"), &[xi]).unwrap();
        assert_eq!(out[0].datum_type(), f32::datum_type());
        close(&f32s(&out[0]), &[0.6, -0.8]);
        assert!(Normalizer::from_node(&node("Normalizer", vec![string("norm", "L3")])).is_err());
        let x3 = tensor(&[1, 1, 2], vec![1f32, 2.]).unwrap();
        assert!(run(&norm("MAX"), &[x3]).is_err(), "rank 3, as onnxruntime");
    }
}
