//! The bridge between the project's own operator kernels and tract: one generic tract op
//! (`KernelOp`) and one generic inference-time expansion (`KernelExpansion`) wrap any
//! [`Kernel`], so each `ai.onnx.ml` operator is a plain struct with `output_facts` and `eval`
//! and touches no other tract internals.

use std::fmt;
use std::sync::Arc;

use tract_onnx::prelude::tract_ndarray;
use tract_onnx::tract_hir::internal::*;

/// Datum type and shape of one tensor, as a kernel sees it while the model is typed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fact {
    pub dt: DatumType,
    pub shape: TVec<TDim>,
}

impl Fact {
    pub fn new(dt: DatumType, shape: impl IntoIterator<Item = TDim>) -> Fact {
        // tract types int64 values computed from shapes as TDim; kernels see int64
        let dt = if dt == DatumType::TDim {
            DatumType::I64
        } else {
            dt
        };
        Fact {
            dt,
            shape: shape.into_iter().collect(),
        }
    }

    /// The last dimension as a known number, if it is one.
    pub fn last_dim(&self) -> Option<usize> {
        self.shape.last().and_then(|d| d.to_usize().ok())
    }
}

/// One operator implementation. Kernels are immutable after construction (all attribute
/// parsing and validation happens in the builder), must not panic on any input tensor, and
/// allocate only their output tensors (plus bounded scratch) per call.
pub(crate) trait Kernel: fmt::Debug + Send + Sync + 'static {
    /// The ONNX op type, e.g. `"TreeEnsembleClassifier"`.
    fn op_type(&self) -> &'static str;
    /// How many outputs the node produces.
    fn output_count(&self) -> usize;
    /// Output facts from input facts; errors name what does not fit.
    fn output_facts(&self, inputs: &[Fact]) -> TractResult<Vec<Fact>>;
    /// Computes the outputs.
    fn eval(&self, inputs: &[&Tensor]) -> TractResult<Vec<Tensor>>;
}

/// Wraps a kernel so tract's ONNX loader can hold it in an inference model.
pub(crate) fn expansion(kernel: impl Kernel) -> Box<dyn InferenceOp> {
    expand(KernelExpansion(Arc::new(kernel)))
}

#[derive(Debug, Clone)]
struct KernelExpansion(Arc<dyn Kernel>);

impl Expansion for KernelExpansion {
    fn name(&self) -> StaticName {
        self.0.op_type().into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.0.output_count())
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        if outputs.len() > self.0.output_count() {
            bail!(
                "{} produces {} outputs, the node declares {}",
                self.0.op_type(),
                self.0.output_count(),
                outputs.len()
            );
        }
        let kernel = self.0.clone();
        s.given_all(inputs.iter().map(|i| &i.datum_type), move |s, dts| {
            let kernel = kernel.clone();
            s.given_all(inputs.iter().map(|i| &i.shape), move |s, shapes| {
                let facts: Vec<Fact> = dts
                    .iter()
                    .zip(shapes)
                    .map(|(dt, shape)| Fact::new(*dt, shape))
                    .collect();
                let out = kernel.output_facts(&facts)?;
                for (proxy, fact) in outputs.iter().zip(out) {
                    s.equals(&proxy.datum_type, fact.dt)?;
                    s.equals(
                        &proxy.shape,
                        fact.shape.into_iter().collect::<ShapeFactoid>(),
                    )?;
                }
                Ok(())
            })
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, KernelOp(self.0.clone()), inputs)
    }
}

/// The typed tract op around a kernel.
#[derive(Debug, Clone)]
pub(crate) struct KernelOp(Arc<dyn Kernel>);

impl PartialEq for KernelOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for KernelOp {}

impl Op for KernelOp {
    fn name(&self) -> StaticName {
        self.0.op_type().into()
    }

    op_as_typed_op!();
}

impl EvalOp for KernelOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let cast: Vec<std::borrow::Cow<Tensor>> = inputs
            .iter()
            .map(|v| {
                if v.datum_type() == DatumType::TDim {
                    v.cast_to::<i64>()
                } else {
                    Ok(std::borrow::Cow::Borrowed(&**v))
                }
            })
            .collect::<TractResult<_>>()?;
        let refs: Vec<&Tensor> = cast.iter().map(|v| &**v).collect();
        let out = self.0.eval(&refs)?;
        Ok(out.into_iter().map(|t| t.into_tvalue()).collect())
    }
}

impl TypedOp for KernelOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let facts: Vec<Fact> = inputs
            .iter()
            .map(|f| Fact::new(f.datum_type, f.shape.iter().cloned()))
            .collect();
        Ok(self
            .0
            .output_facts(&facts)?
            .into_iter()
            .map(|f| f.dt.fact(f.shape.iter().cloned().collect::<TVec<_>>()))
            .collect())
    }

    as_op!();
}

/// The elements of a tensor as a slice of `T`, with a clear error on a type mismatch.
pub(crate) fn slice<T: Datum>(t: &Tensor) -> TractResult<&[T]> {
    t.try_as_plain_ram()?.as_slice::<T>()
}

/// Builds a tensor from a shape and row-major data.
pub(crate) fn tensor<T: Datum>(shape: &[usize], data: Vec<T>) -> TractResult<Tensor> {
    Ok(tract_ndarray::ArrayD::from_shape_vec(shape, data)?.into_tensor())
}

/// Rows and columns of an input seen as a matrix: `[N, C]` as is, `[C]` as one row, a scalar
/// as 1x1, higher ranks as `[d0, d1*...*dk]`.
pub(crate) fn matrix_dims(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [c] => (1, *c),
        [n, rest @ ..] => (*n, rest.iter().product()),
    }
}

/// The input as f32 values, converting f64/i64/i32 the way onnxruntime's ml operators do.
pub(crate) fn as_f32(t: &Tensor) -> TractResult<std::borrow::Cow<'_, [f32]>> {
    use std::borrow::Cow;
    match t.datum_type() {
        DatumType::F32 => Ok(Cow::Borrowed(slice::<f32>(t)?)),
        DatumType::F64 => Ok(Cow::Owned(
            slice::<f64>(t)?.iter().map(|v| *v as f32).collect(),
        )),
        DatumType::I64 => Ok(Cow::Owned(
            slice::<i64>(t)?.iter().map(|v| *v as f32).collect(),
        )),
        DatumType::I32 => Ok(Cow::Owned(
            slice::<i32>(t)?.iter().map(|v| *v as f32).collect(),
        )),
        dt => bail!("expected a numeric input tensor (float, double, int64, int32), got {dt:?}"),
    }
}
