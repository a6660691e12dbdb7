//! What the engine learns from the raw ONNX protobuf before tract sees it: input kinds
//! (tensor or map), ZipMap labels of outputs, the operators used, feature names, and the
//! rewrite that turns a `map(int64, T)` graph input into two tensors for CastMap.

use prost::Message;
use tract_onnx::pb;

use super::EngineError;

/// Element type of an input or output as the engine exposes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    F32,
    F64,
    I64,
    I32,
    Bool,
    String,
}

impl ElemType {
    pub(crate) fn from_onnx(code: i32) -> Option<ElemType> {
        use pb::tensor_proto::DataType as D;
        Some(match D::try_from(code).ok()? {
            D::Float => ElemType::F32,
            D::Double => ElemType::F64,
            D::Int64 => ElemType::I64,
            D::Int32 => ElemType::I32,
            D::Bool => ElemType::Bool,
            D::String => ElemType::String,
            _ => return None,
        })
    }

    /// ONNX-style name, e.g. `float`, `int64`, `string`.
    pub fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "float",
            ElemType::F64 => "double",
            ElemType::I64 => "int64",
            ElemType::I32 => "int32",
            ElemType::Bool => "bool",
            ElemType::String => "string",
        }
    }

    /// Whether values are numbers (float, double, ints).
    pub fn is_numeric(self) -> bool {
        !matches!(self, ElemType::String | ElemType::Bool)
    }
}

/// Class labels of a classifier output.
#[derive(Debug, Clone, PartialEq)]
pub enum Labels {
    Int(Vec<i64>),
    Str(Vec<String>),
}

impl Labels {
    pub fn len(&self) -> usize {
        match self {
            Labels::Int(v) => v.len(),
            Labels::Str(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The label at `ix` as a map key.
    pub fn key(&self, ix: usize) -> String {
        match self {
            Labels::Int(v) => v.get(ix).map(|l| l.to_string()).unwrap_or_default(),
            Labels::Str(v) => v.get(ix).cloned().unwrap_or_default(),
        }
    }
}

/// Minimal mirror of the ONNX `TypeProto` that keeps the map and sequence types tract's
/// protobuf bindings drop.
mod raw {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<ValueInfoProto>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueInfoProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub r#type: Option<TypeProto>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypeProto {
        #[prost(message, optional, tag = "1")]
        pub tensor_type: Option<TensorType>,
        #[prost(message, optional, boxed, tag = "4")]
        pub sequence_type: Option<Box<SequenceType>>,
        #[prost(message, optional, boxed, tag = "5")]
        pub map_type: Option<Box<MapType>>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorType {
        #[prost(int32, tag = "1")]
        pub elem_type: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SequenceType {
        #[prost(message, optional, boxed, tag = "1")]
        pub elem_type: Option<Box<TypeProto>>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MapType {
        #[prost(int32, tag = "1")]
        pub key_type: i32,
        #[prost(message, optional, boxed, tag = "2")]
        pub value_type: Option<Box<TypeProto>>,
    }
}

/// A `map(int64, T)` graph input, fed to CastMap as two tensors.
#[derive(Debug, Clone)]
pub(crate) struct MapInput {
    pub name: String,
    pub value: ElemType,
}

/// The parts of the protobuf the engine needs besides tract's model.
#[derive(Debug, Clone)]
pub(crate) struct ProtoInfo {
    pub proto: pb::ModelProto,
    pub map_inputs: Vec<MapInput>,
    /// Output name -> labels, for outputs produced by a ZipMap node.
    pub zipmaps: Vec<(String, Labels)>,
    /// `domain:op_type` of every node.
    pub ops: Vec<String>,
    pub feature_names: Option<Vec<String>>,
    /// Class labels of the model's classifier node (probability-column order), if any.
    pub class_labels: Option<Labels>,
}

/// Decodes the protobuf, refusing anything that is not an ONNX model with a graph.
pub(crate) fn inspect(
    bytes: &[u8],
    known_op: impl Fn(&str) -> bool,
) -> Result<ProtoInfo, EngineError> {
    let proto = pb::ModelProto::decode(bytes)
        .map_err(|e| EngineError::NotOnnx(format!("protobuf decoding failed: {e}")))?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| EngineError::NotOnnx("the file has no graph".into()))?;
    if graph.node.is_empty() || graph.output.is_empty() {
        return Err(EngineError::NotOnnx(
            "the graph has no nodes or no outputs".into(),
        ));
    }
    let raw = raw::ModelProto::decode(bytes)
        .map_err(|e| EngineError::NotOnnx(format!("protobuf decoding failed: {e}")))?;

    let mut ops = Vec::new();
    for node in &graph.node {
        let domain = if node.domain.is_empty() {
            "ai.onnx"
        } else {
            node.domain.as_str()
        };
        if !known_op(&node.op_type) {
            return Err(EngineError::UnsupportedOperator {
                op_type: node.op_type.clone(),
                domain: domain.to_string(),
                node: node_name(node),
            });
        }
        let op = format!("{domain}:{}", node.op_type);
        if !ops.contains(&op) {
            ops.push(op);
        }
    }
    ops.sort();

    let mut map_inputs = Vec::new();
    for input in raw.graph.iter().flat_map(|g| g.input.iter()) {
        let Some(ty) = &input.r#type else { continue };
        if let Some(map) = &ty.map_type {
            let value = map
                .value_type
                .as_ref()
                .and_then(|v| v.tensor_type.as_ref())
                .and_then(|t| ElemType::from_onnx(t.elem_type));
            let key_is_int = ElemType::from_onnx(map.key_type) == Some(ElemType::I64);
            match value {
                Some(
                    value @ (ElemType::F32 | ElemType::F64 | ElemType::String | ElemType::I64),
                ) if key_is_int => map_inputs.push(MapInput {
                    name: input.name.clone(),
                    value,
                }),
                _ => {
                    return Err(EngineError::UnsupportedModel(format!(
                        "input {:?} is a map type other than map(int64, float|double|int64|string)",
                        input.name
                    )))
                }
            }
        } else if ty.sequence_type.is_some() {
            return Err(EngineError::UnsupportedModel(format!(
                "input {:?} is a sequence; only tensor and map inputs are supported",
                input.name
            )));
        }
    }

    let mut zipmaps = Vec::new();
    for node in graph.node.iter().filter(|n| n.op_type == "ZipMap") {
        let labels = zipmap_labels(node)?;
        if let Some(out) = node.output.first() {
            let consumed = graph.node.iter().any(|n| n.input.iter().any(|i| i == out));
            if consumed {
                return Err(EngineError::UnsupportedModel(format!(
                    "ZipMap node {} feeds another node; a ZipMap output can only be a graph output",
                    node_name(node)
                )));
            }
            zipmaps.push((out.clone(), labels));
        }
    }

    let feature_names = proto
        .metadata_props
        .iter()
        .find(|p| p.key == "feature_names")
        .and_then(|p| serde_json::from_str::<Vec<String>>(&p.value).ok());

    let class_labels = graph
        .node
        .iter()
        .filter(|n| {
            matches!(
                n.op_type.as_str(),
                "TreeEnsembleClassifier" | "LinearClassifier" | "SVMClassifier"
            )
        })
        .find_map(|n| zipmap_labels(n).ok())
        .or_else(|| zipmaps.first().map(|(_, l)| l.clone()));

    Ok(ProtoInfo {
        proto,
        map_inputs,
        zipmaps,
        ops,
        feature_names,
        class_labels,
    })
}

fn zipmap_labels(node: &pb::NodeProto) -> Result<Labels, EngineError> {
    for attr in &node.attribute {
        if attr.name == "classlabels_int64s" {
            return Ok(Labels::Int(attr.ints.clone()));
        }
        if attr.name == "classlabels_strings" {
            return Ok(Labels::Str(
                attr.strings
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect(),
            ));
        }
    }
    Err(EngineError::UnsupportedModel(format!(
        "ZipMap node {} has neither classlabels_int64s nor classlabels_strings",
        node_name(node)
    )))
}

pub(crate) fn node_name(node: &pb::NodeProto) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else {
        node.output.first().cloned().unwrap_or_default()
    }
}

/// Gives every graph-input dimension that has neither a value nor a name (exporters write
/// `None` batch dimensions that way) a symbol, so tract can type the model: the first
/// dimension becomes the shared batch symbol `N`, others a symbol of their own.
pub(crate) fn name_unknown_dims(info: &mut ProtoInfo) {
    use pb::tensor_shape_proto::dimension::Value as D;
    let Some(graph) = info.proto.graph.as_mut() else {
        return;
    };
    for input in graph.input.iter_mut() {
        let Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(t)),
            ..
        }) = input.r#type.as_mut()
        else {
            continue;
        };
        let Some(shape) = t.shape.as_mut() else {
            continue;
        };
        for (ix, dim) in shape.dim.iter_mut().enumerate() {
            let unnamed = match &dim.value {
                None => true,
                Some(D::DimParam(p)) => p.is_empty(),
                Some(D::DimValue(v)) => *v < 0,
            };
            if unnamed {
                let sym = if ix == 0 {
                    "N".to_string()
                } else {
                    format!(
                        "{}_dim{ix}",
                        input
                            .name
                            .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
                    )
                };
                dim.value = Some(D::DimParam(sym));
            }
        }
    }
}

/// Name of the keys tensor that replaces map input `name`.
pub(crate) fn map_keys_name(name: &str) -> String {
    format!("{name}.keys")
}

/// Name of the values tensor that replaces map input `name`.
pub(crate) fn map_values_name(name: &str) -> String {
    format!("{name}.values")
}

/// Replaces each map graph input with a keys tensor (int64 [K]) and a values tensor
/// (T [K]); the CastMap nodes that read it get both. Any other consumer is refused.
pub(crate) fn rewrite_map_inputs(info: &mut ProtoInfo) -> Result<(), EngineError> {
    use pb::tensor_proto::DataType as D;
    let Some(graph) = info.proto.graph.as_mut() else {
        return Ok(());
    };
    for map in &info.map_inputs {
        for node in graph.node.iter_mut() {
            if !node.input.contains(&map.name) {
                continue;
            }
            if node.op_type != "CastMap" {
                return Err(EngineError::UnsupportedModel(format!(
                    "map input {:?} is read by {} node {}; only CastMap can read a map",
                    map.name,
                    node.op_type,
                    node_name(node)
                )));
            }
            node.input = vec![map_keys_name(&map.name), map_values_name(&map.name)];
        }
        let value_code = match map.value {
            ElemType::F32 => D::Float,
            ElemType::F64 => D::Double,
            ElemType::I64 => D::Int64,
            _ => D::String,
        };
        let tensor_input = |name: String, code: D| pb::ValueInfoProto {
            name,
            r#type: Some(pb::TypeProto {
                denotation: String::new(),
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: code as i32,
                    shape: Some(pb::TensorShapeProto {
                        dim: vec![pb::tensor_shape_proto::Dimension {
                            denotation: String::new(),
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimParam(
                                format!("{}_len", map.name),
                            )),
                        }],
                    }),
                })),
            }),
            doc_string: String::new(),
        };
        let pos = graph.input.iter().position(|i| i.name == map.name);
        let new = [
            tensor_input(map_keys_name(&map.name), D::Int64),
            tensor_input(map_values_name(&map.name), value_code),
        ];
        match pos {
            Some(p) => {
                graph.input.splice(p..=p, new);
            }
            None => graph.input.extend(new),
        }
    }
    Ok(())
}
