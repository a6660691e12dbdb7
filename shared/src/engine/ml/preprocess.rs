//! Element-wise preprocessing operators: Scaler, Imputer, Normalizer, Binarizer.

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::engine::op::{as_f32, expansion, matrix_dims, tensor, Fact, Kernel};

pub(crate) fn register(reg: &mut OnnxOpRegister) {
    reg.insert("Scaler", scaler);
    reg.insert("Binarizer", binarizer);
}

/// `Y = (X - offset) * scale`, per column or with one value for all columns. Output f32.
#[derive(Debug)]
struct Scaler {
    offset: Vec<f32>,
    scale: Vec<f32>,
}

fn scaler(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let offset: Vec<f32> = node.get_attr_opt_vec("offset")?.unwrap_or_default();
    let scale: Vec<f32> = node.get_attr_opt_vec("scale")?.unwrap_or_default();
    node.expect_attr("offset", !offset.is_empty() || !scale.is_empty(), "offset or scale")?;
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
        ensure!(inputs.len() == 1, "Scaler takes one input, got {}", inputs.len());
        Ok(vec![Fact::new(f32::datum_type(), inputs[0].shape.iter().cloned())])
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

fn binarizer(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
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
        ensure!(inputs.len() == 1, "Binarizer takes one input, got {}", inputs.len());
        Ok(vec![inputs[0].clone()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        let x = inputs[0];
        let out = match x.datum_type() {
            DatumType::F64 => {
                let t = self.threshold as f64;
                let v = crate::engine::op::slice::<f64>(x)?;
                tensor(x.shape(), v.iter().map(|v| if *v > t { 1.0 } else { 0.0 }).collect())?
            }
            _ => {
                let v = as_f32(x)?;
                let v: Vec<f32> = v.iter().map(|v| if *v > self.threshold { 1.0 } else { 0.0 }).collect();
                tensor(x.shape(), v)?.cast_to_dt(x.datum_type())?.into_owned()
            }
        };
        Ok(vec![out])
    }
}
