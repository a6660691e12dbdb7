//! The inference engine: tract-onnx plus the project's own `ai.onnx.ml` operators.
//!
//! [`Model::load`] checks the file is ONNX, names any operator nobody implements, rewrites
//! map inputs for CastMap, and builds an optimized tract plan. [`Model::run`] scores a
//! [`Batch`] and returns [`Outputs`], whose rows render to JSON (ZipMap outputs as
//! `{label: probability}` maps). Inference is pure computation: no I/O, no locks held
//! across calls, so one `Model` serves any number of threads.

pub mod batch;
pub(crate) mod ml;
pub(crate) mod op;
pub mod schema;
#[doc(hidden)]
pub mod testing;

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{DimLike, SimplePlan};

pub use batch::{json_kind, Batch, BatchBuilder, Column, InputError};
pub use ml::OPERATORS as ML_OPERATORS;
pub use schema::{ElemType, Labels};

/// Largest model file the engine accepts (bytes).
pub const MAX_MODEL_BYTES: u64 = 512 * 1024 * 1024;

/// Errors from loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("model file is too large: {size} bytes (limit {limit})")]
    TooLarge { size: u64, limit: u64 },
    #[error("not an ONNX model: {0}")]
    NotOnnx(String),
    #[error("unsupported operator {domain}:{op_type} (node {node:?})")]
    UnsupportedOperator {
        op_type: String,
        domain: String,
        node: String,
    },
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),
    #[error("cannot load model: {0}")]
    Load(String),
    #[error("input {input:?}: {message}")]
    Input { input: String, message: String },
    #[error("inference failed: {0}")]
    Run(String),
}

fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// One model input as callers feed it.
#[derive(Debug, Clone)]
pub struct InputInfo {
    pub name: String,
    pub elem: ElemType,
    /// Dimensions; `None` for a symbolic one (the batch dimension).
    pub shape: Vec<Option<usize>>,
    /// `Some(value type)` for a `map(int64, T)` input (one map per row).
    pub map_value: Option<ElemType>,
}

impl InputInfo {
    /// Values per row: the product of the dimensions after the first (1 for rank <= 1).
    pub fn width(&self) -> usize {
        if self.map_value.is_some() {
            return 1;
        }
        self.shape.iter().skip(1).map(|d| d.unwrap_or(1)).product()
    }
}

/// One model output.
#[derive(Debug, Clone)]
pub struct OutputInfo {
    pub name: String,
    pub elem: ElemType,
    /// Labels when the output comes from a ZipMap node.
    pub zipmap: Option<Labels>,
}

/// A loaded, optimized model, ready to run from any thread.
#[derive(Debug, Clone)]
pub struct Model {
    plan: Arc<TypedSimplePlan>,
    inputs: Vec<InputInfo>,
    outputs: Vec<OutputInfo>,
    ops: Vec<String>,
    feature_names: Option<Vec<String>>,
    class_labels: Option<Labels>,
    /// Whether rows can be stacked into one run (no fixed batch dimension, no map input).
    batchable: bool,
}

impl Model {
    /// Loads an ONNX file.
    pub fn load(path: &Path) -> Result<Model, EngineError> {
        let io = |source| EngineError::Io {
            path: path.display().to_string(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > MAX_MODEL_BYTES {
            return Err(EngineError::TooLarge {
                size,
                limit: MAX_MODEL_BYTES,
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        Model::from_bytes(&bytes)
    }

    /// Loads an ONNX model from memory. External tensor data is refused.
    pub fn from_bytes(bytes: &[u8]) -> Result<Model, EngineError> {
        if bytes.len() as u64 > MAX_MODEL_BYTES {
            return Err(EngineError::TooLarge {
                size: bytes.len() as u64,
                limit: MAX_MODEL_BYTES,
            });
        }
        let mut onnx = tract_onnx::onnx();
        ml::register(&mut onnx.op_register);
        let register = onnx.op_register.0.clone();
        let mut info = schema::inspect(bytes, |op| register.contains_key(op))?;
        schema::rewrite_map_inputs(&mut info)?;
        schema::name_unknown_dims(&mut info);
        let parsed = onnx
            .parse(&info.proto, None)
            .map_err(|e| EngineError::Load(chain(&e)))?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(EngineError::Load(format!(
                "the graph reads values nobody produces: {:?}",
                parsed.unresolved_inputs
            )));
        }
        let typed = parsed
            .model
            .into_optimized()
            .map_err(|e| EngineError::Load(chain(&e)))?;

        let mut inputs = Vec::new();
        let mut graph_inputs = typed
            .input_outlets()
            .map_err(|e| EngineError::Load(chain(&e)))?
            .iter();
        let proto_inputs: Vec<String> = info
            .proto
            .graph
            .iter()
            .flat_map(|g| g.input.iter().map(|i| i.name.clone()))
            .collect();
        let initializers: Vec<&str> = info
            .proto
            .graph
            .iter()
            .flat_map(|g| g.initializer.iter().map(|i| i.name.as_str()))
            .collect();
        let map_values: Vec<String> = info
            .map_inputs
            .iter()
            .map(|m| schema::map_values_name(&m.name))
            .collect();
        for name in proto_inputs
            .iter()
            .filter(|n| !initializers.contains(&n.as_str()) && !map_values.contains(n))
        {
            if let Some(map) = info
                .map_inputs
                .iter()
                .find(|m| schema::map_keys_name(&m.name) == *name)
            {
                graph_inputs.next();
                graph_inputs.next();
                inputs.push(InputInfo {
                    name: map.name.clone(),
                    elem: ElemType::I64,
                    shape: vec![None],
                    map_value: Some(map.value),
                });
                continue;
            }
            let outlet = graph_inputs.next().ok_or_else(|| {
                EngineError::Load(format!("input {name:?} vanished from the graph"))
            })?;
            let fact = typed
                .outlet_fact(*outlet)
                .map_err(|e| EngineError::Load(chain(&e)))?;
            let elem = elem_of(fact.datum_type).ok_or_else(|| {
                EngineError::UnsupportedModel(format!(
                    "input {name:?} has element type {:?}",
                    fact.datum_type
                ))
            })?;
            let shape = fact.shape.iter().map(|d| d.to_usize().ok()).collect();
            inputs.push(InputInfo {
                name: name.clone(),
                elem,
                shape,
                map_value: None,
            });
        }

        let mut outputs = Vec::new();
        let graph = info
            .proto
            .graph
            .as_ref()
            .ok_or_else(|| EngineError::NotOnnx("no graph".into()))?;
        for (ix, out) in graph.output.iter().enumerate() {
            let outlet = typed
                .output_outlets()
                .map_err(|e| EngineError::Load(chain(&e)))?
                .get(ix)
                .copied()
                .ok_or_else(|| EngineError::Load(format!("output {:?} vanished", out.name)))?;
            let fact = typed
                .outlet_fact(outlet)
                .map_err(|e| EngineError::Load(chain(&e)))?;
            let elem = elem_of(fact.datum_type).ok_or_else(|| {
                EngineError::UnsupportedModel(format!(
                    "output {:?} has element type {:?}",
                    out.name, fact.datum_type
                ))
            })?;
            let zipmap = info
                .zipmaps
                .iter()
                .find(|(n, _)| *n == out.name)
                .map(|(_, l)| l.clone());
            outputs.push(OutputInfo {
                name: out.name.clone(),
                elem,
                zipmap,
            });
        }

        let batchable = info.map_inputs.is_empty()
            && inputs
                .iter()
                .all(|i| i.shape.first().is_some_and(|d| d.is_none()));
        let plan = SimplePlan::new(typed).map_err(|e| EngineError::Load(chain(&e)))?;
        Ok(Model {
            plan,
            inputs,
            outputs,
            ops: info.ops,
            feature_names: info.feature_names,
            class_labels: info.class_labels,
            batchable,
        })
    }

    pub fn inputs(&self) -> &[InputInfo] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[OutputInfo] {
        &self.outputs
    }

    /// `domain:op_type` of every operator in the graph, sorted.
    pub fn operators(&self) -> &[String] {
        &self.ops
    }

    /// Feature names for a single 2-D input, from the model's `feature_names` metadata.
    pub fn feature_names(&self) -> Option<&[String]> {
        self.feature_names.as_deref()
    }

    /// Class labels of the model's classifier (in probability-column order), when it has a
    /// TreeEnsembleClassifier, LinearClassifier, SVMClassifier or ZipMap node.
    pub fn class_labels(&self) -> Option<&Labels> {
        self.class_labels.as_ref()
    }

    /// A builder for batches of this model's inputs.
    pub fn batch_builder(&self) -> BatchBuilder<'_> {
        BatchBuilder::new(self)
    }

    /// Scores a batch.
    pub fn run(&self, batch: &Batch) -> Result<Outputs, EngineError> {
        if batch.rows == 0 {
            return Ok(Outputs {
                rows: 0,
                tensors: Vec::new(),
            });
        }
        if self.batchable || batch.rows == 1 {
            let tensors = self.run_tensors(batch.tensors(self)?)?;
            return Ok(Outputs {
                rows: batch.rows,
                tensors,
            });
        }
        let mut per_row: Vec<Vec<Arc<Tensor>>> = Vec::with_capacity(batch.rows);
        for row in 0..batch.rows {
            per_row.push(self.run_tensors(batch.row_tensors(self, row)?)?);
        }
        let mut tensors = Vec::with_capacity(self.outputs.len());
        for ix in 0..self.outputs.len() {
            let parts: Vec<Tensor> = per_row.iter().map(|r| (*r[ix]).clone()).collect();
            let t = Tensor::stack_tensors(0, &parts).map_err(|e| EngineError::Run(chain(&e)))?;
            tensors.push(Arc::new(t));
        }
        Ok(Outputs {
            rows: batch.rows,
            tensors,
        })
    }

    fn run_tensors(&self, inputs: TVec<TValue>) -> Result<Vec<Arc<Tensor>>, EngineError> {
        let out = self
            .plan
            .run(inputs)
            .map_err(|e| EngineError::Run(chain(&e)))?;
        out.into_iter()
            .map(|v| {
                let t = v.into_arc_tensor();
                // tract types ONNX int64 computed from shapes as TDim; callers see int64
                if t.datum_type() == DatumType::TDim {
                    let cast = t
                        .cast_to::<i64>()
                        .map_err(|e| EngineError::Run(chain(&e)))?;
                    Ok(Arc::new(cast.into_owned()))
                } else {
                    Ok(t)
                }
            })
            .collect()
    }

    /// Where row `row` of output `output` lives in its tensor: (first element, element count).
    fn span(t: &Tensor, row: usize) -> (usize, usize) {
        if t.rank() == 0 {
            return (0, t.len());
        }
        let per_row = t.len() / t.shape()[0].max(1);
        (row * per_row, per_row)
    }

    /// The value of output `output` for row `row`, as JSON: a number or string for a per-row
    /// scalar (`[N]` or `[N, 1]`), an array for a per-row vector, a `{label: probability}`
    /// object for a ZipMap output. Non-finite floats render as `null`.
    pub fn render(&self, outputs: &Outputs, output: usize, row: usize) -> serde_json::Value {
        use serde_json::Value;
        let (Some(t), Some(info)) = (outputs.tensors.get(output), self.outputs.get(output)) else {
            return Value::Null;
        };
        let (start, len) = Self::span(t, row);
        if let Some(labels) = &info.zipmap {
            let mut map = serde_json::Map::with_capacity(len);
            for k in 0..len.min(labels.len()) {
                map.insert(labels.key(k), scalar(t, start + k));
            }
            return Value::Object(map);
        }
        if len == 1 {
            scalar(t, start)
        } else {
            Value::Array((start..start + len).map(|i| scalar(t, i)).collect())
        }
    }

    /// One JSON object per row, mapping each output name to [`Model::render`].
    pub fn render_row(
        &self,
        outputs: &Outputs,
        row: usize,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut obj = serde_json::Map::with_capacity(self.outputs.len());
        for (ix, info) in self.outputs.iter().enumerate() {
            obj.insert(info.name.clone(), self.render(outputs, ix, row));
        }
        obj
    }

    /// Appends row `row` as one compact JSON object (same shape as [`Model::render_row`]) to
    /// `buf`, without building intermediate values; floats use the shortest representation
    /// that round-trips their own precision.
    pub fn write_row_json(&self, outputs: &Outputs, row: usize, buf: &mut Vec<u8>) {
        buf.push(b'{');
        for (ix, info) in self.outputs.iter().enumerate() {
            if ix > 0 {
                buf.push(b',');
            }
            write_json_str(buf, &info.name);
            buf.push(b':');
            let Some(t) = outputs.tensors.get(ix) else {
                buf.extend_from_slice(b"null");
                continue;
            };
            let (start, len) = Self::span(t, row);
            if let Some(labels) = &info.zipmap {
                buf.push(b'{');
                for k in 0..len.min(labels.len()) {
                    if k > 0 {
                        buf.push(b',');
                    }
                    match labels {
                        Labels::Int(l) => {
                            buf.push(b'"');
                            buf.extend_from_slice(l[k].to_string().as_bytes());
                            buf.push(b'"');
                        }
                        Labels::Str(l) => write_json_str(buf, &l[k]),
                    }
                    buf.push(b':');
                    write_scalar(buf, t, start + k);
                }
                buf.push(b'}');
            } else if len == 1 {
                write_scalar(buf, t, start);
            } else {
                buf.push(b'[');
                for i in start..start + len {
                    if i > start {
                        buf.push(b',');
                    }
                    write_scalar(buf, t, i);
                }
                buf.push(b']');
            }
        }
        buf.push(b'}');
    }
}

fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    // serde_json's escaping, written straight into the buffer
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// A finite float in its own shortest form (`shown`), or `null`.
fn write_float(
    buf: &mut Vec<u8>,
    value: f64,
    shown: &dyn std::fmt::Display,
) -> std::io::Result<()> {
    use std::io::Write;
    if value.is_finite() {
        write!(buf, "{shown}")
    } else {
        buf.write_all(b"null")
    }
}

fn write_scalar(buf: &mut Vec<u8>, t: &Tensor, ix: usize) {
    use std::io::Write;
    let Ok(view) = t.try_as_plain_ram() else {
        buf.extend_from_slice(b"null");
        return;
    };
    let ok = match t.datum_type() {
        DatumType::F32 => view
            .as_slice::<f32>()
            .ok()
            .and_then(|s| s.get(ix))
            .map(|v| write_float(buf, *v as f64, &v)),
        DatumType::F64 => view
            .as_slice::<f64>()
            .ok()
            .and_then(|s| s.get(ix))
            .map(|v| write_float(buf, *v, v)),
        DatumType::I64 => view
            .as_slice::<i64>()
            .ok()
            .and_then(|s| s.get(ix))
            .map(|v| write!(buf, "{v}")),
        DatumType::I32 => view
            .as_slice::<i32>()
            .ok()
            .and_then(|s| s.get(ix))
            .map(|v| write!(buf, "{v}")),
        DatumType::Bool => view
            .as_slice::<bool>()
            .ok()
            .and_then(|s| s.get(ix))
            .map(|v| write!(buf, "{v}")),
        DatumType::String => view
            .as_slice::<String>()
            .ok()
            .and_then(|s| s.get(ix))
            .map(|v| {
                write_json_str(buf, v);
                Ok(())
            }),
        _ => None,
    };
    if !matches!(ok, Some(Ok(()))) {
        buf.extend_from_slice(b"null");
    }
}

fn elem_of(dt: DatumType) -> Option<ElemType> {
    Some(match dt {
        DatumType::F32 => ElemType::F32,
        DatumType::F64 => ElemType::F64,
        DatumType::I64 | DatumType::TDim => ElemType::I64,
        DatumType::I32 => ElemType::I32,
        DatumType::Bool => ElemType::Bool,
        DatumType::String => ElemType::String,
        _ => return None,
    })
}

fn scalar(t: &Tensor, ix: usize) -> serde_json::Value {
    use serde_json::Value;
    let Ok(view) = t.try_as_plain_ram() else {
        return Value::Null;
    };
    let num = |v: f64| {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    };
    match t.datum_type() {
        DatumType::F32 => view
            .as_slice::<f32>()
            .ok()
            .and_then(|s| s.get(ix))
            .map_or(Value::Null, |v| num(*v as f64)),
        DatumType::F64 => view
            .as_slice::<f64>()
            .ok()
            .and_then(|s| s.get(ix))
            .map_or(Value::Null, |v| num(*v)),
        DatumType::I64 => view
            .as_slice::<i64>()
            .ok()
            .and_then(|s| s.get(ix))
            .map_or(Value::Null, |v| (*v).into()),
        DatumType::I32 => view
            .as_slice::<i32>()
            .ok()
            .and_then(|s| s.get(ix))
            .map_or(Value::Null, |v| (*v).into()),
        DatumType::Bool => view
            .as_slice::<bool>()
            .ok()
            .and_then(|s| s.get(ix))
            .map_or(Value::Null, |v| (*v).into()),
        DatumType::String => view
            .as_slice::<String>()
            .ok()
            .and_then(|s| s.get(ix))
            .map_or(Value::Null, |v| Value::String(v.clone())),
        _ => Value::Null,
    }
}

/// The outputs of one run, in the model's output order.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub rows: usize,
    pub tensors: Vec<Arc<Tensor>>,
}
