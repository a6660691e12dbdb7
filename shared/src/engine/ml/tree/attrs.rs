//! Attribute parsing for the tree ensembles: the `ai.onnx.ml` v1/v3 layout
//! (TreeEnsembleClassifier / TreeEnsembleRegressor: `nodes_*` tuples keyed by tree and node
//! id, `class_*`/`target_*` weight tuples) and the v5 layout (TreeEnsemble: `nodes_*` for
//! interior nodes, `leaf_*` for leaves, tensor attributes), both turned into one [`Spec`].
//! Every inconsistency is an error naming the attribute; nothing here can panic on model
//! bytes.

use std::collections::HashMap;

use tract_onnx::pb::{NodeProto, TensorProto};
use tract_onnx::tract_hir::internal::*;

use super::forest::{Agg, Cond, Spec, SpecNode};
use crate::engine::ml::transform::PostTransform;

/// A numeric list attribute, read as `f64` (exact for float lists), and whether the model
/// gave it in double precision.
#[derive(Debug, Clone, Default)]
pub(crate) struct Values {
    pub values: Vec<f64>,
    pub double: bool,
}

/// Reads a `TENSOR` attribute of float or double elements.
pub(crate) fn tensor_values(node: &NodeProto, name: &str) -> TractResult<Option<Values>> {
    let Some(t) = node.get_attr_opt::<&TensorProto>(name)? else {
        return Ok(None);
    };
    let count = element_count(node, name, t)?;
    let (values, double) = match t.data_type {
        1 => {
            let v: Vec<f64> = if !t.raw_data.is_empty() {
                raw_chunks::<4>(node, name, &t.raw_data, count)?
                    .map(|b| f32::from_le_bytes(b) as f64)
                    .collect()
            } else {
                t.float_data.iter().map(|v| *v as f64).collect()
            };
            (v, false)
        }
        11 => {
            let v: Vec<f64> = if !t.raw_data.is_empty() {
                raw_chunks::<8>(node, name, &t.raw_data, count)?
                    .map(f64::from_le_bytes)
                    .collect()
            } else {
                t.double_data.clone()
            };
            (v, true)
        }
        dt => node.bail_attr(
            name,
            &format!("expected a float or double tensor, got data type {dt}"),
        )?,
    };
    if values.len() != count {
        node.bail_attr(
            name,
            &format!("holds {} values but its dims say {count}", values.len()),
        )?;
    }
    Ok(Some(Values { values, double }))
}

/// Reads a `TENSOR` attribute of small non-negative integers (TreeEnsemble's `nodes_modes`
/// is uint8; int32/int64 tensors are accepted too).
fn tensor_codes(node: &NodeProto, name: &str) -> TractResult<Option<Vec<i64>>> {
    let Some(t) = node.get_attr_opt::<&TensorProto>(name)? else {
        return Ok(None);
    };
    let count = element_count(node, name, t)?;
    let raw = !t.raw_data.is_empty();
    let v: Vec<i64> = match t.data_type {
        // uint8, int8, uint16, int16, int32: raw bytes or int32_data
        2 if raw => raw_chunks::<1>(node, name, &t.raw_data, count)?
            .map(|b| b[0] as i64)
            .collect(),
        3 if raw => raw_chunks::<1>(node, name, &t.raw_data, count)?
            .map(|b| b[0] as i8 as i64)
            .collect(),
        6 if raw => raw_chunks::<4>(node, name, &t.raw_data, count)?
            .map(|b| i32::from_le_bytes(b) as i64)
            .collect(),
        2..=6 => t.int32_data.iter().map(|v| *v as i64).collect(),
        7 if raw => raw_chunks::<8>(node, name, &t.raw_data, count)?
            .map(i64::from_le_bytes)
            .collect(),
        7 => t.int64_data.clone(),
        dt => node.bail_attr(
            name,
            &format!("expected an integer (uint8) tensor, got data type {dt}"),
        )?,
    };
    if v.len() != count {
        node.bail_attr(
            name,
            &format!("holds {} values but its dims say {count}", v.len()),
        )?;
    }
    Ok(Some(v))
}

fn element_count(node: &NodeProto, name: &str, t: &TensorProto) -> TractResult<usize> {
    if t.data_location == Some(1) {
        node.bail_attr(name, "external tensor data is not supported")?;
    }
    let mut count = 1usize;
    for &d in &t.dims {
        if d < 0 {
            node.bail_attr(name, &format!("negative dimension {d}"))?;
        }
        count = count
            .checked_mul(d as usize)
            .ok_or_else(|| format_err!("attribute {name}: dimensions overflow"))?;
    }
    Ok(count)
}

fn raw_chunks<'a, const N: usize>(
    node: &NodeProto,
    name: &str,
    raw: &'a [u8],
    count: usize,
) -> TractResult<impl Iterator<Item = [u8; N]> + 'a> {
    if Some(raw.len()) != count.checked_mul(N) {
        node.bail_attr(
            name,
            &format!("raw data has {} bytes, expected {count} x {N}", raw.len()),
        )?;
    }
    Ok(raw.chunks_exact(N).map(|c| {
        let mut b = [0u8; N];
        b.copy_from_slice(c);
        b
    }))
}

/// A float list given either as `name` (FLOATS) or `name_as_tensor` (TENSOR); both is an
/// error, neither is `None`.
fn floats_or_tensor(node: &NodeProto, name: &str, tensor: &str) -> TractResult<Option<Values>> {
    let floats = node.get_attr_opt_slice::<f32>(name)?;
    let t = tensor_values(node, tensor)?;
    match (floats, t) {
        (Some(f), Some(t)) if !f.is_empty() && !t.values.is_empty() => node.bail_attr(
            tensor,
            &format!("only one of {name} and {tensor} may be given"),
        ),
        (_, Some(t)) if !t.values.is_empty() => Ok(Some(t)),
        (Some(f), _) => Ok(Some(Values {
            values: f.iter().map(|v| *v as f64).collect(),
            double: false,
        })),
        (None, t) => Ok(t),
    }
}

fn ints<'a>(node: &'a NodeProto, name: &str) -> TractResult<&'a [i64]> {
    Ok(node.get_attr_opt_slice::<i64>(name)?.unwrap_or(&[]))
}

fn same_len(
    node: &NodeProto,
    name: &str,
    len: usize,
    reference: &str,
    expected: usize,
) -> TractResult<()> {
    if len != expected {
        node.bail_attr(
            name,
            &format!("has {len} values but {reference} has {expected}"),
        )?;
    }
    Ok(())
}

/// What the operator kernels need besides the [`Spec`].
#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    pub spec: Spec,
    pub post: PostTransform,
    pub base: Vec<f64>,
    /// Some threshold, weight or base value was given in double precision.
    pub double: bool,
    /// Classifiers: labels and onnxruntime's binary-case flags.
    pub labels: Option<Labels>,
    pub binary_case: bool,
    pub all_positive: bool,
}

/// Class labels of a TreeEnsembleClassifier.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Labels {
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
}

fn mode_v3(node: &NodeProto, s: &str) -> TractResult<Option<Cond>> {
    Ok(Some(match s {
        "BRANCH_LEQ" => Cond::Leq,
        "BRANCH_LT" => Cond::Lt,
        "BRANCH_GTE" => Cond::Gte,
        "BRANCH_GT" => Cond::Gt,
        "BRANCH_EQ" => Cond::Eq,
        "BRANCH_NEQ" => Cond::Neq,
        "LEAF" => return Ok(None),
        other => node.bail_attr("nodes_modes", &format!("unknown mode {other:?}"))?,
    }))
}

/// TreeEnsembleClassifier / TreeEnsembleRegressor (ai.onnx.ml 1 and 3).
pub(crate) fn parse_v3(node: &NodeProto, classifier: bool) -> TractResult<Parsed> {
    let treeids = ints(node, "nodes_treeids")?;
    let nodeids = ints(node, "nodes_nodeids")?;
    let featureids = ints(node, "nodes_featureids")?;
    let trueids = ints(node, "nodes_truenodeids")?;
    let falseids = ints(node, "nodes_falsenodeids")?;
    let missing = ints(node, "nodes_missing_value_tracks_true")?;
    let modes: Vec<String> = node.get_attr_opt_vec("nodes_modes")?.unwrap_or_default();
    let values =
        floats_or_tensor(node, "nodes_values", "nodes_values_as_tensor")?.unwrap_or_default();
    let count = treeids.len();
    same_len(node, "nodes_nodeids", nodeids.len(), "nodes_treeids", count)?;
    same_len(
        node,
        "nodes_featureids",
        featureids.len(),
        "nodes_treeids",
        count,
    )?;
    same_len(
        node,
        "nodes_truenodeids",
        trueids.len(),
        "nodes_treeids",
        count,
    )?;
    same_len(
        node,
        "nodes_falsenodeids",
        falseids.len(),
        "nodes_treeids",
        count,
    )?;
    same_len(node, "nodes_modes", modes.len(), "nodes_treeids", count)?;
    let values_name = if values.double {
        "nodes_values_as_tensor"
    } else {
        "nodes_values"
    };
    same_len(
        node,
        values_name,
        values.values.len(),
        "nodes_treeids",
        count,
    )?;

    let (prefix, ids_name) = if classifier {
        ("class", "class_ids")
    } else {
        ("target", "target_ids")
    };
    let t_treeids = ints(node, &format!("{prefix}_treeids"))?;
    let t_nodeids = ints(node, &format!("{prefix}_nodeids"))?;
    let t_ids = ints(node, ids_name)?;
    let weights_name = format!("{prefix}_weights");
    let t_weights = floats_or_tensor(node, &weights_name, &format!("{prefix}_weights_as_tensor"))?
        .unwrap_or_default();
    same_len(
        node,
        &format!("{prefix}_treeids"),
        t_treeids.len(),
        ids_name,
        t_ids.len(),
    )?;
    same_len(
        node,
        &format!("{prefix}_nodeids"),
        t_nodeids.len(),
        ids_name,
        t_ids.len(),
    )?;
    same_len(
        node,
        &weights_name,
        t_weights.values.len(),
        ids_name,
        t_ids.len(),
    )?;

    let base = floats_or_tensor(node, "base_values", "base_values_as_tensor")?.unwrap_or_default();
    let post = PostTransform::parse(node.get_attr_opt::<&str>("post_transform")?)?;

    let (n, labels) = if classifier {
        let strings: Vec<String> = node
            .get_attr_opt_vec("classlabels_strings")?
            .unwrap_or_default();
        let int_labels: Vec<i64> = node
            .get_attr_opt_vec("classlabels_int64s")?
            .unwrap_or_default();
        // onnxruntime: the string labels win when both are given.
        let labels = if !strings.is_empty() {
            Labels::Str(strings)
        } else {
            Labels::Int(int_labels)
        };
        if labels.len() == 0 {
            node.bail_attr(
                "classlabels_int64s",
                "a classifier needs classlabels_int64s or classlabels_strings",
            )?;
        }
        let n = labels.len();
        if n <= 2 && base.values.len() > 2 {
            node.bail_attr(
                "base_values",
                &format!(
                    "has {} values, a binary classifier takes 0, 1 or 2",
                    base.values.len()
                ),
            )?;
        }
        if n > 2 && !base.values.is_empty() && base.values.len() != n {
            node.bail_attr(
                "base_values",
                &format!(
                    "has {} values, expected 0 or one per class ({n})",
                    base.values.len()
                ),
            )?;
        }
        (n, Some(labels))
    } else {
        let n = node.get_attr_opt::<i64>("n_targets")?.unwrap_or(0);
        if n <= 0 || n > (1 << 24) {
            node.bail_attr("n_targets", &format!("must be a positive count, got {n}"))?;
        }
        let n = n as usize;
        if !base.values.is_empty() && base.values.len() != n {
            node.bail_attr(
                "base_values",
                &format!(
                    "has {} values, expected 0 or n_targets ({n})",
                    base.values.len()
                ),
            )?;
        }
        (n, None)
    };
    let agg = if classifier {
        // onnxruntime's classifier always sums.
        Agg::Sum
    } else {
        match node
            .get_attr_opt::<&str>("aggregate_function")?
            .unwrap_or("SUM")
        {
            "SUM" => Agg::Sum,
            "AVERAGE" => Agg::Average,
            "MIN" => Agg::Min,
            "MAX" => Agg::Max,
            other => node.bail_attr(
                "aggregate_function",
                &format!("unknown aggregate function {other:?}"),
            )?,
        }
    };

    // (tree id, node id) -> position
    let mut index: HashMap<(i64, i64), usize> = HashMap::with_capacity(count);
    for i in 0..count {
        if index.insert((treeids[i], nodeids[i]), i).is_some() {
            node.bail_attr(
                "nodes_nodeids",
                &format!(
                    "node {} of tree {} appears more than once",
                    nodeids[i], treeids[i]
                ),
            )?;
        }
    }
    let mut conds = Vec::with_capacity(count);
    for m in &modes {
        conds.push(mode_v3(node, m)?);
    }

    // Leaf weights, grouped per node in attribute order; weights on interior nodes are
    // ignored as onnxruntime does.
    let mut per_node = vec![0usize; count];
    let mut owner = Vec::with_capacity(t_ids.len());
    for i in 0..t_ids.len() {
        let key = (t_treeids[i], t_nodeids[i]);
        let Some(&at) = index.get(&key) else {
            return node.bail_attr(
                &format!("{prefix}_nodeids"),
                &format!(
                    "weight {i} refers to node {} of tree {}, which does not exist",
                    key.1, key.0
                ),
            );
        };
        let id = t_ids[i];
        if id < 0 || id as u64 >= n as u64 {
            node.bail_attr(
                ids_name,
                &format!("id {id} is out of range for {n} targets/classes"),
            )?;
        }
        if conds[at].is_none() {
            per_node[at] += 1;
            owner.push(Some(at));
        } else {
            owner.push(None);
        }
    }
    let mut starts = vec![0usize; count];
    let mut total = 0usize;
    for i in 0..count {
        starts[i] = total;
        total += per_node[i];
    }
    let mut weights = vec![(0u32, 0f64); total];
    let mut fill = starts.clone();
    for (i, o) in owner.iter().enumerate() {
        if let Some(at) = *o {
            weights[fill[at]] = (t_ids[i] as u32, t_weights.values[i]);
            fill[at] += 1;
        }
    }

    let mut nodes = Vec::with_capacity(count);
    for i in 0..count {
        let tree = treeids[i];
        let spec_node = match conds[i] {
            None => SpecNode::Leaf {
                value: values.values[i],
                w_start: starts[i],
                w_len: per_node[i],
            },
            Some(cond) => {
                let feature = featureids[i];
                if !(0..=i32::MAX as i64).contains(&feature) {
                    node.bail_attr(
                        "nodes_featureids",
                        &format!("node {i} reads feature {feature}"),
                    )?;
                }
                let child = |attr: &str, id: i64| -> TractResult<usize> {
                    match index.get(&(tree, id)) {
                        Some(&c) if c == i => node.bail_attr(
                            attr,
                            &format!("node {} of tree {tree} points to itself", nodeids[i]),
                        ),
                        Some(&c) => Ok(c),
                        None => node.bail_attr(
                            attr,
                            &format!("node {} of tree {tree} points to node {id}, which is not in that tree", nodeids[i]),
                        ),
                    }
                };
                SpecNode::Branch {
                    cond,
                    feature: feature as u32,
                    threshold: values.values[i],
                    missing_true: missing.get(i) == Some(&1),
                    t: child("nodes_truenodeids", trueids[i])?,
                    f: child("nodes_falsenodeids", falseids[i])?,
                }
            }
        };
        nodes.push(spec_node);
    }
    // onnxruntime: a tree starts wherever the tree id changes in nodes_treeids.
    let mut roots = Vec::new();
    for i in 0..count {
        if i == 0 || treeids[i] != treeids[i - 1] {
            roots.push(i);
        }
    }

    let mut distinct: Vec<i64> = t_ids.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let binary_case = classifier && n == 2 && distinct.len() == 1;
    let all_positive = t_weights.values.iter().all(|w| w.is_nan() || *w >= 0.0);
    let double = values.double || t_weights.double || base.double;
    Ok(Parsed {
        spec: Spec {
            nodes,
            weights,
            sets: Vec::new(),
            roots,
            n,
            agg,
        },
        post,
        base: base.values,
        double,
        labels,
        binary_case,
        all_positive,
    })
}

/// TreeEnsemble (ai.onnx.ml 5).
pub(crate) fn parse_v5(node: &NodeProto) -> TractResult<Parsed> {
    let n = node.get_attr_opt::<i64>("n_targets")?.unwrap_or(0);
    if n <= 0 || n > (1 << 24) {
        node.bail_attr("n_targets", &format!("must be a positive count, got {n}"))?;
    }
    let n = n as usize;
    let agg = match node.get_attr_opt::<i64>("aggregate_function")?.unwrap_or(1) {
        0 => Agg::Average,
        1 => Agg::Sum,
        2 => Agg::Min,
        3 => Agg::Max,
        other => node.bail_attr("aggregate_function", &format!("unknown value {other}"))?,
    };
    // onnxruntime reads this enum in its own order (NONE, LOGISTIC, SOFTMAX, SOFTMAX_ZERO,
    // PROBIT), which the reference outputs follow.
    let post = match node.get_attr_opt::<i64>("post_transform")?.unwrap_or(0) {
        0 => PostTransform::None,
        1 => PostTransform::Logistic,
        2 => PostTransform::Softmax,
        3 => PostTransform::SoftmaxZero,
        4 => PostTransform::Probit,
        other => node.bail_attr("post_transform", &format!("unknown value {other}"))?,
    };
    let featureids = ints(node, "nodes_featureids")?;
    let trueids = ints(node, "nodes_truenodeids")?;
    let trueleafs = ints(node, "nodes_trueleafs")?;
    let falseids = ints(node, "nodes_falsenodeids")?;
    let falseleafs = ints(node, "nodes_falseleafs")?;
    let missing = ints(node, "nodes_missing_value_tracks_true")?;
    let modes = tensor_codes(node, "nodes_modes")?.unwrap_or_default();
    let splits = tensor_values(node, "nodes_splits")?.unwrap_or_default();
    let members = tensor_values(node, "membership_values")?.unwrap_or_default();
    let leaf_targets = ints(node, "leaf_targetids")?;
    let leaf_weights = tensor_values(node, "leaf_weights")?.unwrap_or_default();
    let roots_attr = ints(node, "tree_roots")?;

    let count = featureids.len();
    same_len(
        node,
        "nodes_truenodeids",
        trueids.len(),
        "nodes_featureids",
        count,
    )?;
    same_len(
        node,
        "nodes_trueleafs",
        trueleafs.len(),
        "nodes_featureids",
        count,
    )?;
    same_len(
        node,
        "nodes_falsenodeids",
        falseids.len(),
        "nodes_featureids",
        count,
    )?;
    same_len(
        node,
        "nodes_falseleafs",
        falseleafs.len(),
        "nodes_featureids",
        count,
    )?;
    same_len(node, "nodes_modes", modes.len(), "nodes_featureids", count)?;
    same_len(
        node,
        "nodes_splits",
        splits.values.len(),
        "nodes_featureids",
        count,
    )?;
    if !missing.is_empty() {
        same_len(
            node,
            "nodes_missing_value_tracks_true",
            missing.len(),
            "nodes_featureids",
            count,
        )?;
    }
    let leaves = leaf_targets.len();
    same_len(
        node,
        "leaf_weights",
        leaf_weights.values.len(),
        "leaf_targetids",
        leaves,
    )?;

    // Interior nodes are spec nodes 0..count, leaf j is spec node count + j.
    let mut weights = Vec::with_capacity(leaves);
    for (j, &target) in leaf_targets.iter().enumerate() {
        if target < 0 || target as u64 >= n as u64 {
            node.bail_attr(
                "leaf_targetids",
                &format!("leaf {j} has target {target}, expected 0..{n}"),
            )?;
        }
        weights.push((target as u32, leaf_weights.values[j]));
    }
    // membership_values: one NaN-terminated run per BRANCH_MEMBER node, in node order.
    let mut member_at = 0usize;
    let mut nodes = Vec::with_capacity(count + leaves);
    for i in 0..count {
        let cond = match modes[i] {
            0 => Cond::Leq,
            1 => Cond::Lt,
            2 => Cond::Gte,
            3 => Cond::Gt,
            4 => Cond::Eq,
            5 => Cond::Neq,
            6 => {
                let start = member_at;
                while member_at < members.values.len() && !members.values[member_at].is_nan() {
                    member_at += 1;
                }
                let len = member_at - start;
                member_at += 1;
                if len == 0 {
                    node.bail_attr(
                        "membership_values",
                        &format!("node {i} (BRANCH_MEMBER) has no values"),
                    )?;
                }
                Cond::Member { start, len }
            }
            other => {
                node.bail_attr("nodes_modes", &format!("node {i} has unknown mode {other}"))?
            }
        };
        let feature = featureids[i];
        if !(0..=i32::MAX as i64).contains(&feature) {
            node.bail_attr(
                "nodes_featureids",
                &format!("node {i} reads feature {feature}"),
            )?;
        }
        let child = |attr: &str, id: i64, leaf: bool| -> TractResult<usize> {
            let limit = if leaf { leaves } else { count };
            if id < 0 || id as u64 >= limit as u64 {
                let what = if leaf { "leaf" } else { "node" };
                return node.bail_attr(
                    attr,
                    &format!("node {i} points to {what} {id}, out of {limit}"),
                );
            }
            Ok(if leaf {
                count + id as usize
            } else {
                id as usize
            })
        };
        let t = child("nodes_truenodeids", trueids[i], trueleafs[i] != 0)?;
        let f = child("nodes_falsenodeids", falseids[i], falseleafs[i] != 0)?;
        if t == i || f == i {
            node.bail_attr("nodes_truenodeids", &format!("node {i} points to itself"))?;
        }
        nodes.push(SpecNode::Branch {
            cond,
            feature: feature as u32,
            threshold: splits.values[i],
            missing_true: missing.get(i) == Some(&1),
            t,
            f,
        });
    }
    for j in 0..leaves {
        nodes.push(SpecNode::Leaf {
            value: leaf_weights.values[j],
            w_start: j,
            w_len: 1,
        });
    }
    let mut roots = Vec::with_capacity(roots_attr.len());
    for (k, &r) in roots_attr.iter().enumerate() {
        if r < 0 || r as u64 >= count as u64 {
            node.bail_attr(
                "tree_roots",
                &format!("tree {k} has root {r}, out of {count} nodes"),
            )?;
        }
        roots.push(r as usize);
    }
    let double = splits.double || leaf_weights.double || members.double;
    Ok(Parsed {
        spec: Spec {
            nodes,
            weights,
            sets: members.values,
            roots,
            n,
            agg,
        },
        post,
        base: Vec::new(),
        double,
        labels: None,
        binary_case: false,
        all_positive: true,
    })
}
