//! ZipMap: in the tract graph an identity on the probability tensor; the engine renders the
//! output as a `{label: probability}` map per row using the labels kept in the model info.

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::engine::op::{expansion, Fact, Kernel};

pub(crate) fn register(reg: &mut OnnxOpRegister) {
    reg.insert("ZipMap", zipmap);
}

#[derive(Debug)]
struct ZipMap {
    labels: usize,
}

fn zipmap(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let ints = node
        .get_attr_opt_slice::<i64>("classlabels_int64s")?
        .map(|s| s.len());
    let strs = node
        .get_attr_opt_tvec::<String>("classlabels_strings")?
        .map(|s| s.len());
    let labels = match (ints, strs) {
        (Some(n), None) | (None, Some(n)) => n,
        _ => bail!("ZipMap needs exactly one of classlabels_int64s and classlabels_strings"),
    };
    Ok((expansion(ZipMap { labels }), vec![]))
}

impl Kernel for ZipMap {
    fn op_type(&self) -> &'static str {
        "ZipMap"
    }

    fn output_count(&self) -> usize {
        1
    }

    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>> {
        ensure!(
            inputs.len() == 1,
            "ZipMap takes one input, got {}",
            inputs.len()
        );
        let f = &inputs[0];
        ensure!(
            f.dt == f32::datum_type(),
            "ZipMap input must be float, got {:?}",
            f.dt
        );
        ensure!(
            f.shape.len() == 2 && f.last_dim().is_none_or(|c| c == self.labels),
            "ZipMap input must be [N, {}] (one column per label), got {:?}",
            self.labels,
            f.shape
        );
        Ok(vec![f.clone()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>> {
        Ok(vec![inputs[0].clone()])
    }
}
