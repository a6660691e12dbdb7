//! Small ONNX models built in code, for tests in this and the other crates (no Python, no
//! fixture files): a one-node graph of any op type, and a runnable Scaler model.

use prost::Message;
use tract_onnx::pb;

fn tensor_input(
    name: &str,
    elem: pb::tensor_proto::DataType,
    dims: &[Option<i64>],
) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value as D, Dimension};
    pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            denotation: String::new(),
                            value: Some(match d {
                                Some(v) => D::DimValue(*v),
                                None => D::DimParam("N".into()),
                            }),
                        })
                        .collect(),
                }),
            })),
        }),
        doc_string: String::new(),
    }
}

fn model(
    node: pb::NodeProto,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    meta: &[(&str, &str)],
) -> Vec<u8> {
    graph_model(vec![node], Vec::new(), inputs, outputs, meta)
}

fn graph_model(
    nodes: Vec<pb::NodeProto>,
    initializer: Vec<pb::TensorProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    meta: &[(&str, &str)],
) -> Vec<u8> {
    let graph = pb::GraphProto {
        name: "test".into(),
        node: nodes,
        initializer,
        input: inputs,
        output: outputs,
        ..Default::default()
    };
    let proto = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![
            pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            },
            pb::OperatorSetIdProto {
                domain: "ai.onnx.ml".into(),
                version: 3,
            },
        ],
        graph: Some(graph),
        metadata_props: meta
            .iter()
            .map(|(k, v)| pb::StringStringEntryProto {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        ..Default::default()
    };
    proto.encode_to_vec()
}

/// `feature_names` as the metadata value (a JSON list).
fn names_json(feature_names: Option<&[&str]>) -> Option<String> {
    feature_names.map(|n| serde_json::to_string(n).unwrap_or_default())
}

fn names_meta(names: Option<&str>) -> Vec<(&str, &str)> {
    names
        .map(|n| vec![("feature_names", n)])
        .unwrap_or_default()
}

/// A model with one node of `op_type` in `domain`, named `node_name`, reading float `x`.
pub fn single_node_model(op_type: &str, domain: &str, node_name: &str) -> Vec<u8> {
    let node = pb::NodeProto {
        name: node_name.into(),
        op_type: op_type.into(),
        domain: domain.into(),
        input: vec!["x".into()],
        output: vec!["y".into()],
        ..Default::default()
    };
    let f = pb::tensor_proto::DataType::Float;
    model(
        node,
        vec![tensor_input("x", f, &[None, Some(1)])],
        vec![tensor_input("y", f, &[None, Some(1)])],
        &[],
    )
}

/// A runnable model: `Scaler(offset = 0, scale = 2)` on float input `X` of `[N, features]`,
/// output `Y`; with `feature_names` in the metadata when given.
pub fn scaler_model(features: usize, feature_names: Option<&[&str]>) -> Vec<u8> {
    let float_attr = |name: &str, v: f32| pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Floats as i32,
        floats: vec![v],
        ..Default::default()
    };
    let node = pb::NodeProto {
        name: "scale".into(),
        op_type: "Scaler".into(),
        domain: "ai.onnx.ml".into(),
        input: vec!["X".into()],
        output: vec!["Y".into()],
        attribute: vec![float_attr("offset", 0.0), float_attr("scale", 2.0)],
        ..Default::default()
    };
    let f = pb::tensor_proto::DataType::Float;
    let w = Some(features as i64);
    let names = names_json(feature_names);
    let meta = names_meta(names.as_deref());
    model(
        node,
        vec![tensor_input("X", f, &[None, w])],
        vec![tensor_input("Y", f, &[None, w])],
        &meta,
    )
}

/// A model applying the standard unary operator `op_type` (e.g. `Log`, `Sqrt`) to float
/// input `X` of `[N, features]`, output `Y`; with `feature_names` in the metadata when given.
pub fn unary_model(op_type: &str, features: usize, feature_names: Option<&[&str]>) -> Vec<u8> {
    let node = pb::NodeProto {
        name: op_type.to_lowercase(),
        op_type: op_type.into(),
        input: vec!["X".into()],
        output: vec!["Y".into()],
        ..Default::default()
    };
    let f = pb::tensor_proto::DataType::Float;
    let w = Some(features as i64);
    let names = names_json(feature_names);
    let meta = names_meta(names.as_deref());
    model(
        node,
        vec![tensor_input("X", f, &[None, w])],
        vec![tensor_input("Y", f, &[None, w])],
        &meta,
    )
}

/// A deliberately slow model with the same interface as [`unary_model`] (`X` [N, features]
/// -> `Y`): it broadcasts every row `repeat` times and sums the copies back (`Y = repeat * X`),
/// so each row costs `repeat * features` additions. For latency tests.
pub fn slow_model(features: usize, feature_names: Option<&[&str]>, repeat: i64) -> Vec<u8> {
    let int_tensor = |name: &str, v: Vec<i64>| pb::TensorProto {
        name: name.into(),
        dims: vec![v.len() as i64],
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        int64_data: v,
        ..Default::default()
    };
    let nodes = vec![
        pb::NodeProto {
            name: "expand".into(),
            op_type: "Expand".into(),
            input: vec!["X".into(), "shape".into()],
            output: vec!["big".into()],
            ..Default::default()
        },
        pb::NodeProto {
            name: "sum".into(),
            op_type: "ReduceSum".into(),
            input: vec!["big".into(), "axes".into()],
            output: vec!["Y".into()],
            attribute: vec![pb::AttributeProto {
                name: "keepdims".into(),
                r#type: pb::attribute_proto::AttributeType::Int as i32,
                i: 0,
                ..Default::default()
            }],
            ..Default::default()
        },
    ];
    let f = pb::tensor_proto::DataType::Float;
    let w = Some(features as i64);
    let names = names_json(feature_names);
    let meta = names_meta(names.as_deref());
    graph_model(
        nodes,
        vec![
            int_tensor("shape", vec![repeat, 1, 1]),
            int_tensor("axes", vec![0]),
        ],
        vec![tensor_input("X", f, &[None, w])],
        vec![tensor_input("Y", f, &[None, w])],
        &meta,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_model_sums_the_copies() {
        let m = crate::engine::Model::from_bytes(&slow_model(2, Some(&["a", "b"]), 1000)).unwrap();
        let mut b = m.batch_builder();
        let row: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"a": 1.5, "b": -2.0}"#).unwrap();
        b.push_json(&row, 1).unwrap();
        let out = m.run(&b.take()).unwrap();
        assert_eq!(m.render(&out, 0, 0), serde_json::json!([1500.0, -2000.0]));
    }
}
