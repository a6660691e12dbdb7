//! Unit tests of the tree ensemble operators. Expected values were obtained from
//! onnxruntime 1.32 on the same attributes (see the report of the tree engine work).

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::{AttributeProto, NodeProto, TensorProto};
use tract_onnx::prelude::tract_ndarray;
use tract_onnx::tract_hir::internal::*;

use super::{attrs, Kind, Trees};
use crate::engine::op::{slice, Kernel};

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn floats(name: &str, v: &[f32]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Floats as i32,
        floats: v.to_vec(),
        ..Default::default()
    }
}

fn strs(name: &str, v: &[&str]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Strings as i32,
        strings: v.iter().map(|s| s.as_bytes().to_vec()).collect(),
        ..Default::default()
    }
}

fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn tensor_f(name: &str, v: &[f64], double: bool) -> AttributeProto {
    let t = if double {
        TensorProto {
            dims: vec![v.len() as i64],
            data_type: 11,
            double_data: v.to_vec(),
            ..Default::default()
        }
    } else {
        TensorProto {
            dims: vec![v.len() as i64],
            data_type: 1,
            float_data: v.iter().map(|x| *x as f32).collect(),
            ..Default::default()
        }
    };
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Tensor as i32,
        t: Some(t),
        ..Default::default()
    }
}

fn tensor_u8(name: &str, v: &[u8]) -> AttributeProto {
    let t = TensorProto {
        dims: vec![v.len() as i64],
        data_type: 2,
        raw_data: v.to_vec(),
        ..Default::default()
    };
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Tensor as i32,
        t: Some(t),
        ..Default::default()
    }
}

fn node(op: &str, attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: "n".into(),
        op_type: op.into(),
        domain: "ai.onnx.ml".into(),
        attribute: attrs,
        ..Default::default()
    }
}

/// Replaces or adds attributes.
fn with(mut attrs: Vec<AttributeProto>, extra: Vec<AttributeProto>) -> Vec<AttributeProto> {
    for e in extra {
        attrs.retain(|a| a.name != e.name);
        attrs.push(e);
    }
    attrs
}

fn without(mut attrs: Vec<AttributeProto>, name: &str) -> Vec<AttributeProto> {
    attrs.retain(|a| a.name != name);
    attrs
}

fn build(kind: Kind, attrs: Vec<AttributeProto>) -> TractResult<Trees> {
    let op = match kind {
        Kind::Classifier => "TreeEnsembleClassifier",
        Kind::Regressor => "TreeEnsembleRegressor",
        Kind::Ensemble => "TreeEnsemble",
    };
    let n = node(op, attrs);
    let parsed = match kind {
        Kind::Classifier => attrs::parse_v3(&n, true)?,
        Kind::Regressor => attrs::parse_v3(&n, false)?,
        Kind::Ensemble => attrs::parse_v5(&n)?,
    };
    Trees::new(kind, parsed, "n")
}

fn x32(rows: &[&[f32]]) -> Tensor {
    let w = rows.first().map_or(0, |r| r.len());
    let v: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    tract_ndarray::Array2::from_shape_vec((rows.len(), w), v)
        .unwrap()
        .into_tensor()
}

fn x64(rows: &[&[f64]]) -> Tensor {
    let w = rows.first().map_or(0, |r| r.len());
    let v: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    tract_ndarray::Array2::from_shape_vec((rows.len(), w), v)
        .unwrap()
        .into_tensor()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    slice::<f32>(&t.cast_to::<f32>().unwrap()).unwrap().to_vec()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    slice::<i64>(t).unwrap().to_vec()
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-6 + 1e-5 * w.abs(),
            "got {got:?}, want {want:?}"
        );
    }
}

/// One stump: node 0 tests feature `feat` against `thr` with `mode`; true -> leaf 1,
/// false -> leaf 2.
fn stump(mode: &str, thr: f32, feat: i64) -> Vec<AttributeProto> {
    vec![
        ints("nodes_treeids", &[0, 0, 0]),
        ints("nodes_nodeids", &[0, 1, 2]),
        ints("nodes_featureids", &[feat, 0, 0]),
        floats("nodes_values", &[thr, 0.0, 0.0]),
        strs("nodes_modes", &[mode, "LEAF", "LEAF"]),
        ints("nodes_truenodeids", &[1, 0, 0]),
        ints("nodes_falsenodeids", &[2, 0, 0]),
    ]
}

/// A regressor stump adding 1 on the true side and 2 on the false side.
fn reg_stump(mode: &str, thr: f32) -> Vec<AttributeProto> {
    with(
        stump(mode, thr, 0),
        vec![
            ints("target_treeids", &[0, 0]),
            ints("target_nodeids", &[1, 2]),
            ints("target_ids", &[0, 0]),
            floats("target_weights", &[1.0, 2.0]),
            int("n_targets", 1),
        ],
    )
}

/// Two stumps as one regressor: tree 0 as `reg_stump`, tree 1 an `==` on feature 1 against
/// an unused value adding 0 — which forces the general (per-node mode) kernel.
fn reg_stump_general(mode: &str, thr: f32) -> Vec<AttributeProto> {
    vec![
        ints("nodes_treeids", &[0, 0, 0, 1, 1, 1]),
        ints("nodes_nodeids", &[0, 1, 2, 0, 1, 2]),
        ints("nodes_featureids", &[0, 0, 0, 1, 0, 0]),
        floats("nodes_values", &[thr, 0.0, 0.0, 123.0, 0.0, 0.0]),
        strs(
            "nodes_modes",
            &[mode, "LEAF", "LEAF", "BRANCH_EQ", "LEAF", "LEAF"],
        ),
        ints("nodes_truenodeids", &[1, 0, 0, 1, 0, 0]),
        ints("nodes_falsenodeids", &[2, 0, 0, 2, 0, 0]),
        ints("target_treeids", &[0, 0, 1, 1]),
        ints("target_nodeids", &[1, 2, 1, 2]),
        ints("target_ids", &[0, 0, 0, 0]),
        floats("target_weights", &[1.0, 2.0, 0.0, 0.0]),
        int("n_targets", 1),
    ]
}

const MODES: [&str; 6] = [
    "BRANCH_LEQ",
    "BRANCH_LT",
    "BRANCH_GTE",
    "BRANCH_GT",
    "BRANCH_EQ",
    "BRANCH_NEQ",
];

/// onnxruntime's results for x = [NaN, 0.4, 0.5, 0.6] against 0.5, per mode: without and
/// with `nodes_missing_value_tracks_true`.
fn mode_expectations(mode: &str) -> ([f32; 4], [f32; 4]) {
    match mode {
        "BRANCH_LEQ" => ([2., 1., 1., 2.], [1., 1., 1., 2.]),
        "BRANCH_LT" => ([2., 1., 2., 2.], [1., 1., 2., 2.]),
        "BRANCH_GTE" => ([2., 2., 1., 1.], [1., 2., 1., 1.]),
        "BRANCH_GT" => ([2., 2., 2., 1.], [1., 2., 2., 1.]),
        "BRANCH_EQ" => ([2., 2., 1., 2.], [1., 2., 1., 2.]),
        "BRANCH_NEQ" => ([1., 1., 2., 1.], [1., 1., 2., 1.]),
        _ => unreachable!(),
    }
}

/// Runs `rows` once as a small batch (tree lanes) and once repeated into a large one (row
/// lanes), checks both agree, and returns the small batch's first output.
fn run_both(k: &Trees, rows: &[f32], width: usize) -> Vec<f32> {
    let n = rows.len() / width;
    let small = tract_ndarray::Array2::from_shape_vec((n, width), rows.to_vec())
        .unwrap()
        .into_tensor();
    let out = f32s(&k.eval(&[&small]).unwrap()[0]);
    let reps = 40;
    let big: Vec<f32> = (0..reps).flat_map(|_| rows.iter().copied()).collect();
    let big = tract_ndarray::Array2::from_shape_vec((n * reps, width), big)
        .unwrap()
        .into_tensor();
    let big_out = f32s(&k.eval(&[&big]).unwrap()[0]);
    for r in 0..reps {
        assert_eq!(
            &big_out[r * out.len()..(r + 1) * out.len()],
            &out[..],
            "batched rows differ"
        );
    }
    out
}

#[test]
fn every_mode_and_missing_value_tracking_match_onnxruntime() {
    let xs = [f32::NAN, 0.0, 0.4, 0.0, 0.5, 0.0, 0.6, 0.0];
    for mode in MODES {
        let (plain, tracked) = mode_expectations(mode);
        // 0: the stump alone; 1: with an `==` tree (truth-table kernel); 2: that tree
        // against a NaN threshold with missing value tracking (literal general kernel)
        for variant in 0..3 {
            let mut base = if variant == 0 {
                reg_stump(mode, 0.5)
            } else {
                reg_stump_general(mode, 0.5)
            };
            let mut mvt = vec![0i64; if variant == 0 { 3 } else { 6 }];
            if variant == 2 {
                base = with(
                    base,
                    vec![floats("nodes_values", &[0.5, 0.0, 0.0, f32::NAN, 0.0, 0.0])],
                );
                mvt[3] = 1;
            }
            let k = build(
                Kind::Regressor,
                with(
                    base.clone(),
                    vec![ints("nodes_missing_value_tracks_true", &mvt)],
                ),
            )
            .unwrap();
            let kernel = k.single.as_ref().unwrap().kernel();
            assert!(
                matches!(
                    (variant, kernel),
                    (0, "fast" | "fast, NaN to a" | "masked") | (1, "masked") | (2, "general")
                ),
                "{mode} variant {variant} runs {kernel}"
            );
            assert_eq!(run_both(&k, &xs, 2), plain, "{mode} variant {variant}");
            mvt[0] = 1;
            let k = build(
                Kind::Regressor,
                with(base, vec![ints("nodes_missing_value_tracks_true", &mvt)]),
            )
            .unwrap();
            assert_eq!(
                run_both(&k, &xs, 2),
                tracked,
                "{mode} tracked, variant {variant}"
            );
        }
    }
}

#[test]
fn double_inputs_compare_in_double_and_integers_in_float() {
    // float threshold 0.1f = 0.10000000149..: onnxruntime compares a double input in double.
    let k = build(Kind::Regressor, reg_stump("BRANCH_LEQ", 0.1)).unwrap();
    let x = x64(&[
        &[0.1, 0.0],
        &[0.1000000015, 0.0],
        &[0.10000000149011612, 0.0],
        &[0.1000000014901162, 0.0],
    ]);
    assert_eq!(f32s(&k.eval(&[&x]).unwrap()[0]), [1., 2., 1., 2.]);
    // int64 16777217 becomes 16777216.0f, which is <= 16777216.
    let k = build(Kind::Regressor, reg_stump("BRANCH_LEQ", 16777216.0)).unwrap();
    let x = tract_ndarray::arr2(&[
        [16777217i64, 0],
        [16777216, 0],
        [16777215, 0],
        [16777218, 0],
    ])
    .into_tensor();
    assert_eq!(f32s(&k.eval(&[&x]).unwrap()[0]), [1., 1., 1., 2.]);
    let x = x.cast_to::<i32>().unwrap().into_owned();
    assert_eq!(f32s(&k.eval(&[&x]).unwrap()[0]), [1., 1., 1., 2.]);
    // double thresholds (nodes_values_as_tensor) on double input
    let attrs = with(
        without(reg_stump("BRANCH_LEQ", 0.1), "nodes_values"),
        vec![tensor_f("nodes_values_as_tensor", &[0.1, 0.0, 0.0], true)],
    );
    let k = build(Kind::Regressor, attrs).unwrap();
    let x = x64(&[&[0.1, 0.0], &[0.1000000001, 0.0]]);
    assert_eq!(f32s(&k.eval(&[&x]).unwrap()[0]), [1., 2.]);
}

#[test]
fn one_dimensional_input_is_one_row() {
    let k = build(Kind::Regressor, reg_stump("BRANCH_LEQ", 0.5)).unwrap();
    let x = tensor1(&[0.7f32, 0.0]);
    let out = k.eval(&[&x]).unwrap();
    assert_eq!(out[0].shape(), &[1, 1]);
    assert_eq!(f32s(&out[0]), [2.]);
}

/// Two stumps (feature 0, then feature 1) with weights 1 / 2 and -3 / 5.
fn two_trees(
    agg: &str,
    n_targets: i64,
    target_ids: &[i64],
    base: Option<&[f32]>,
) -> Vec<AttributeProto> {
    let mut a = vec![
        ints("nodes_treeids", &[0, 0, 0, 1, 1, 1]),
        ints("nodes_nodeids", &[0, 1, 2, 0, 1, 2]),
        ints("nodes_featureids", &[0, 0, 0, 1, 0, 0]),
        floats("nodes_values", &[0.5, 0.0, 0.0, 0.5, 0.0, 0.0]),
        strs(
            "nodes_modes",
            &["BRANCH_LEQ", "LEAF", "LEAF", "BRANCH_LEQ", "LEAF", "LEAF"],
        ),
        ints("nodes_truenodeids", &[1, 0, 0, 1, 0, 0]),
        ints("nodes_falsenodeids", &[2, 0, 0, 2, 0, 0]),
        ints("target_treeids", &[0, 0, 1, 1]),
        ints("target_nodeids", &[1, 2, 1, 2]),
        ints("target_ids", target_ids),
        floats("target_weights", &[1.0, 2.0, -3.0, 5.0]),
        int("n_targets", n_targets),
        string("aggregate_function", agg),
    ];
    if let Some(b) = base {
        a.push(floats("base_values", b));
    }
    a
}

#[test]
fn aggregate_functions_and_base_values() {
    let xs = [0., 0., 1., 0., 0., 1., 1., 1.];
    type Case = (&'static str, [f32; 4], [f32; 8], [f32; 8]);
    let cases: [Case; 4] = [
        (
            "SUM",
            [8., 9., 16., 17.],
            [11., 17., 0., 19., 16., 0., 15., 22.],
            [1., -3., 0., -1., 6., 0., 5., 2.],
        ),
        (
            "AVERAGE",
            [9., 9.5, 13., 13.5],
            [10.5, 18.5, 0., 19.5, 13., 0., 12.5, 21.],
            [0.5, -1.5, 0., -0.5, 3., 0., 2.5, 1.],
        ),
        (
            "MIN",
            [7., 7., 11., 12.],
            [11., 17., 0., 17., 11., 0., 15., 22.],
            [1., -3., 0., -3., 1., 0., 5., 2.],
        ),
        (
            "MAX",
            [11., 12., 15., 15.],
            [11., 17., 0., 22., 15., 0., 15., 22.],
            [1., -3., 0., 2., 5., 0., 5., 2.],
        ),
    ];
    for (agg, one, two_base, two) in cases {
        let k = build(
            Kind::Regressor,
            two_trees(agg, 1, &[0, 0, 0, 0], Some(&[10.0])),
        )
        .unwrap();
        assert_eq!(run_both(&k, &xs, 2), one, "{agg} one target");
        let k = build(
            Kind::Regressor,
            two_trees(agg, 2, &[0, 1, 1, 0], Some(&[10.0, 20.0])),
        )
        .unwrap();
        assert_eq!(
            run_both(&k, &xs, 2),
            two_base,
            "{agg} two targets with base values"
        );
        let k = build(Kind::Regressor, two_trees(agg, 2, &[0, 1, 1, 0], None)).unwrap();
        assert_eq!(run_both(&k, &xs, 2), two, "{agg} two targets");
    }
}

#[test]
fn one_target_leaf_adds_its_first_weight_or_its_node_value() {
    // leaf 1 has two weights (only the first counts), leaf 2 none (its nodes_values 9 counts)
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![
            floats("nodes_values", &[0.5, 7.0, 9.0]),
            ints("target_nodeids", &[1, 1]),
        ],
    );
    let k = build(Kind::Regressor, a).unwrap();
    assert_eq!(run_both(&k, &[0., 0., 1., 0.], 2), [1., 9.]);
}

#[test]
fn regressor_post_transforms() {
    // one target: only PROBIT applies
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![
            floats("target_weights", &[0.3, 0.8]),
            string("post_transform", "LOGISTIC"),
        ],
    );
    assert_close(
        &run_both(
            &build(Kind::Regressor, a.clone()).unwrap(),
            &[0., 0., 1., 0.],
            2,
        ),
        &[0.3, 0.8],
    );
    let a = with(a, vec![string("post_transform", "PROBIT")]);
    let got = run_both(&build(Kind::Regressor, a).unwrap(), &[0., 0., 1., 0.], 2);
    assert_close(&got, &[super::probit(0.3), super::probit(0.8)]);
    // two targets: softmax over both
    let k = build(
        Kind::Regressor,
        with(
            two_trees("SUM", 2, &[0, 1, 1, 0], None),
            vec![string("post_transform", "SOFTMAX")],
        ),
    )
    .unwrap();
    let got = run_both(&k, &[0., 0.], 2);
    let (a, b) = (1f32.exp(), (-3f32).exp());
    assert_close(&got, &[a / (a + b), b / (a + b)]);
}

/// Classifier stump with labels 10 / 20: row [0, 0] reaches leaf 1, row [1, 0] leaf 2.
fn cls_stump(
    class_ids: &[i64],
    weights: &[f32],
    base: Option<&[f32]>,
    post: &str,
) -> Vec<AttributeProto> {
    let mut a = with(
        stump("BRANCH_LEQ", 0.5, 0),
        vec![
            ints("class_treeids", &[0, 0]),
            ints("class_nodeids", &[1, 2]),
            ints("class_ids", class_ids),
            floats("class_weights", weights),
            ints("classlabels_int64s", &[10, 20]),
            string("post_transform", post),
        ],
    );
    if let Some(b) = base {
        a.push(floats("base_values", b));
    }
    a
}

fn classify(attrs: Vec<AttributeProto>) -> (Vec<i64>, Vec<f32>) {
    let k = build(Kind::Classifier, attrs).unwrap();
    let x = x32(&[&[0., 0.], &[1., 0.]]);
    let out = k.eval(&[&x]).unwrap();
    // the same through the row-lane path
    let big: Vec<&[f32]> = (0..20)
        .flat_map(|_| [&[0f32, 0.][..], &[1f32, 0.][..]])
        .collect();
    let out_big = k.eval(&[&x32(&big)]).unwrap();
    let (labels, scores) = (i64s(&out[0]), f32s(&out[1]));
    assert_eq!(i64s(&out_big[0])[..2], labels[..]);
    assert_eq!(f32s(&out_big[1])[..scores.len()], scores[..]);
    (labels, scores)
}

#[test]
fn binary_classifier_cases_match_onnxruntime() {
    // one class used, positive weights, no base values
    let (l, s) = classify(cls_stump(&[1, 1], &[0.7, 0.2], None, "NONE"));
    assert_eq!(l, [20, 10]);
    assert_close(&s, &[0., 0.7, 0., 0.2]);
    // two base values: class 1 = base[1] + (class 0's sum, here none)
    let (l, s) = classify(cls_stump(&[1, 1], &[0.7, 0.2], Some(&[0.1, 0.3]), "NONE"));
    assert_eq!(l, [10, 10]);
    assert_close(&s, &[0., 0.3, 0., 0.3]);
    // class 0 only: one score, second column added as 1 - s
    let (l, s) = classify(cls_stump(&[0, 0], &[0.7, 0.2], None, "NONE"));
    assert_eq!(l, [20, 10]);
    assert_close(&s, &[0.3, 0.7, 0.8, 0.2]);
    let (_, s) = classify(cls_stump(&[0, 0], &[0.7, 0.2], None, "LOGISTIC"));
    assert_close(&s, &[0.33181226, 0.66818774, 0.45016605, 0.54983395]);
    let (_, s) = classify(cls_stump(&[0, 0], &[0.7, 0.2], None, "SOFTMAX"));
    assert_close(&s, &[0.3, 0.7, 0.8, 0.2]);
    // one base value
    let (l, s) = classify(cls_stump(&[0, 0], &[0.7, 0.2], Some(&[0.1]), "NONE"));
    assert_eq!(l, [20, 10]);
    assert_close(&s, &[0.2, 0.8, 0.7, 0.3]);
    // two base values, class 1 never scored: binary as multiclass, class 1 reads 0
    let (l, s) = classify(cls_stump(&[0, 0], &[0.7, 0.2], Some(&[0.1, 0.3]), "NONE"));
    assert_eq!(l, [20, 10]);
    assert_close(&s, &[0.8, 0., 0.3, 0.]);
    // mixed-sign weights
    let (l, s) = classify(cls_stump(&[1, 1], &[0.7, -0.2], Some(&[0.1, 0.3]), "NONE"));
    assert_eq!(l, [20, 20]);
    assert_close(&s, &[0., 0.3, 0., 0.3]);
    let (l, s) = classify(cls_stump(&[0, 0], &[0.7, -0.2], None, "NONE"));
    assert_eq!(l, [20, 10]);
    assert_close(&s, &[-0.7, 0.7, 0.2, -0.2]);
    let (_, s) = classify(cls_stump(&[0, 0], &[0.7, -0.2], None, "LOGISTIC"));
    assert_close(&s, &[0.33181226, 0.66818774, 0.54983395, 0.45016605]);
    let (l, s) = classify(cls_stump(&[0, 0], &[0.7, -0.2], Some(&[0.1]), "NONE"));
    assert_eq!(l, [20, 10]);
    assert_close(&s, &[-0.8, 0.8, 0.1, -0.1]);
    // both classes used: not the binary case; the label is onnxruntime's literal 1 / 0
    let (l, s) = classify(cls_stump(&[0, 1], &[0.7, 0.2], None, "NONE"));
    assert_eq!(l, [1, 1]);
    assert_close(&s, &[-0.7, 0.7, 0., 0.2]);
    let (_, s) = classify(cls_stump(&[0, 1], &[0.7, 0.2], None, "PROBIT"));
    assert_close(&s[..1], &[super::probit(0.7)]);
}

#[test]
fn single_label_classifier() {
    let base = |b: Option<&[f32]>, post: &str| {
        with(
            cls_stump(&[0, 0], &[0.3, 0.8], b, post),
            vec![ints("classlabels_int64s", &[5])],
        )
    };
    let (l, s) = classify(base(None, "NONE"));
    assert_eq!((l, s), (vec![1, 1], vec![0.3, 0.8]));
    let (_, s) = classify(base(Some(&[0.1, 0.2]), "NONE"));
    assert_close(&s, &[-0.5, -1.0]);
    let (_, s) = classify(base(Some(&[0.1, 0.2]), "LOGISTIC"));
    assert_close(&s, &[0.37754065, 0.2689414]);
}

fn multi(class_ids: &[i64], weights: &[f32], nodes: &[i64], labels: &[i64]) -> Vec<AttributeProto> {
    with(
        stump("BRANCH_LEQ", 0.5, 0),
        vec![
            ints("class_treeids", &vec![0; class_ids.len()]),
            ints("class_nodeids", nodes),
            ints("class_ids", class_ids),
            floats("class_weights", weights),
            ints("classlabels_int64s", labels),
        ],
    )
}

#[test]
fn multiclass_labels_ties_and_missing_scores() {
    // ties go to the first class; classes nobody scored are skipped and read 0
    let (l, s) = classify(multi(
        &[0, 2, 2, 1],
        &[1.0, 1.0, 0.5, 0.5],
        &[1, 1, 2, 2],
        &[7, 8, 9],
    ));
    assert_eq!(l, [7, 8]);
    assert_close(&s, &[1., 0., 1., 0., 0.5, 0.5]);
    // only negative scores: the best scored class still wins over unscored ones
    let (l, s) = classify(multi(&[1, 2], &[-1.0, -2.0], &[1, 2], &[7, 8, 9]));
    assert_eq!(l, [8, 9]);
    assert_close(&s, &[0., -1., 0., 0., 0., -2.]);
    let (_, s) = classify(with(
        multi(&[1, 2], &[-1.0, -2.0], &[1, 2], &[7, 8, 9]),
        vec![string("post_transform", "SOFTMAX_ZERO")],
    ));
    assert_close(&s, &[0., 1., 0., 0., 0., 1.]);
    // base values give every class a score
    let (l, s) = classify(with(
        multi(&[1], &[1.0], &[1], &[7, 8, 9]),
        vec![floats("base_values", &[0.1, 0.2, 0.3])],
    ));
    assert_eq!(l, [8, 9]);
    assert_close(&s, &[0.1, 1.2, 0.3, 0.1, 0.2, 0.3]);
    // no score at all for a row: an error, as in onnxruntime
    let k = build(Kind::Classifier, multi(&[1], &[1.0], &[1], &[7, 8, 9])).unwrap();
    assert!(k.eval(&[&x32(&[&[1., 0.]])]).is_err());
    // string labels
    let a = with(
        without(
            multi(&[1, 2], &[1.0, 2.0], &[1, 2], &[0, 0, 0]),
            "classlabels_int64s",
        ),
        vec![strs("classlabels_strings", &["a", "b", "c"])],
    );
    let out = build(Kind::Classifier, a)
        .unwrap()
        .eval(&[&x32(&[&[0., 0.], &[1., 0.]])])
        .unwrap();
    assert_eq!(slice::<String>(&out[0]).unwrap(), ["b", "c"]);
}

#[test]
fn tensor_attributes_in_double() {
    let a = with(
        without(
            without(
                cls_stump(&[0, 1], &[0.7, 0.2], None, "NONE"),
                "class_weights",
            ),
            "nodes_values",
        ),
        vec![
            tensor_f("class_weights_as_tensor", &[0.7, 0.2], true),
            tensor_f("nodes_values_as_tensor", &[0.5, 0.0, 0.0], true),
            tensor_f("base_values_as_tensor", &[0.0, 0.0], true),
        ],
    );
    let k = build(Kind::Classifier, a).unwrap();
    let out = k.eval(&[&x64(&[&[0., 0.], &[1., 0.]])]).unwrap();
    // onnxruntime: two base values and class 1 scored -> class 1 = base[1] + class 0's sum
    assert_eq!(i64s(&out[0]), [1, 0]);
    assert_close(&f32s(&out[1]), &[0.7, 0.0, 0.0, 0.0]);
}

/// TreeEnsemble v5: node 0 `x0 <= 0.5` -> leaf 0 | node 1; node 1 `x1 (mode) 0.5` -> leaf 1 |
/// leaf 2; leaves target 0/1/0 with weights 1/2/3.
fn v5(modes: &[u8], members: Option<&[f64]>, extra: Vec<AttributeProto>) -> Vec<AttributeProto> {
    let mut a = vec![
        int("n_targets", 2),
        ints("nodes_featureids", &[0, 1]),
        ints("nodes_truenodeids", &[0, 1]),
        ints("nodes_trueleafs", &[1, 1]),
        ints("nodes_falsenodeids", &[1, 2]),
        ints("nodes_falseleafs", &[0, 1]),
        ints("tree_roots", &[0]),
        ints("leaf_targetids", &[0, 1, 0]),
        tensor_u8("nodes_modes", modes),
        tensor_f("nodes_splits", &[0.5, 0.5], false),
        tensor_f("leaf_weights", &[1.0, 2.0, 3.0], false),
    ];
    if let Some(m) = members {
        a.push(tensor_f("membership_values", m, false));
    }
    with(a, extra)
}

#[test]
fn tree_ensemble_v5() {
    let xs = [0., 0., 1., 0., 1., 1., 1., f32::NAN, 1., 3.];
    let k = build(Kind::Ensemble, v5(&[0, 0], None, vec![])).unwrap();
    assert_eq!(
        run_both(&k, &xs, 2),
        [1., 0., 0., 2., 3., 0., 3., 0., 3., 0.]
    );
    // post_transform 1 is LOGISTIC in onnxruntime
    let k = build(
        Kind::Ensemble,
        v5(&[0, 0], None, vec![int("post_transform", 1)]),
    )
    .unwrap();
    assert_close(&run_both(&k, &xs[..2], 2), &[0.7310586, 0.5]);
    let k = build(
        Kind::Ensemble,
        v5(&[0, 0], None, vec![int("post_transform", 2)]),
    )
    .unwrap();
    assert_close(&run_both(&k, &xs[..2], 2), &[0.7310586, 0.26894143]);
    // set membership, NaN-separated values, missing tracking
    let k = build(
        Kind::Ensemble,
        v5(&[0, 6], Some(&[1.0, 3.0, f64::NAN]), vec![]),
    )
    .unwrap();
    assert_eq!(
        run_both(&k, &xs, 2),
        [1., 0., 3., 0., 0., 2., 3., 0., 0., 2.]
    );
    let k = build(
        Kind::Ensemble,
        v5(
            &[0, 6],
            Some(&[1.0, 3.0]),
            vec![ints("nodes_missing_value_tracks_true", &[0, 1])],
        ),
    )
    .unwrap();
    assert_eq!(
        run_both(&k, &xs, 2),
        [1., 0., 3., 0., 0., 2., 0., 2., 0., 2.]
    );
    // two trees sharing node 1, every aggregate function
    let expect: [(i64, [f32; 4]); 4] = [
        (0, [0.5, 1.0, 0.0, 2.0]),
        (1, [1.0, 2.0, 0.0, 4.0]),
        (2, [1.0, 2.0, 0.0, 2.0]),
        (3, [1.0, 2.0, 0.0, 2.0]),
    ];
    for (agg, want) in expect {
        let a = v5(
            &[0, 0],
            None,
            vec![ints("tree_roots", &[0, 1]), int("aggregate_function", agg)],
        );
        assert_eq!(
            run_both(&build(Kind::Ensemble, a).unwrap(), &xs[..4], 2),
            want,
            "agg {agg}"
        );
    }
    // double input gives double output
    let k = build(Kind::Ensemble, v5(&[0, 0], None, vec![])).unwrap();
    let out = k.eval(&[&x64(&[&[1., 0.]])]).unwrap();
    assert_eq!(out[0].datum_type(), f64::datum_type());
    assert_eq!(slice::<f64>(&out[0]).unwrap(), [0.0, 2.0]);
}

fn err_of(kind: Kind, attrs: Vec<AttributeProto>) -> String {
    match build(kind, attrs) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn malformed_attributes_are_errors_naming_them() {
    let r = Kind::Regressor;
    // a cycle: node 1 goes back to node 0
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![
            strs("nodes_modes", &["BRANCH_LEQ", "BRANCH_LEQ", "LEAF"]),
            ints("nodes_truenodeids", &[1, 0, 0]),
        ],
    );
    assert!(err_of(r, a).contains("cycle"));
    // a child id that does not exist
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![ints("nodes_falsenodeids", &[7, 0, 0])],
    );
    assert!(err_of(r, a).contains("nodes_falsenodeids"));
    // a node pointing to itself
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![ints("nodes_truenodeids", &[0, 0, 0])],
    );
    assert!(err_of(r, a).contains("itself"));
    // a child in another tree
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![
            ints("nodes_treeids", &[0, 0, 1]),
            ints("target_treeids", &[0, 1]),
        ],
    );
    assert!(err_of(r, a).contains("nodes_falsenodeids"));
    // length mismatches
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![ints("nodes_featureids", &[0, 0])],
    );
    assert!(err_of(r, a).contains("nodes_featureids"));
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![floats("target_weights", &[1.0])],
    );
    assert!(err_of(r, a).contains("target_weights"));
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![floats("nodes_values", &[0.5])],
    );
    assert!(err_of(r, a).contains("nodes_values"));
    // unknown mode, duplicate node, target out of range, bad base values, bad n_targets
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![strs("nodes_modes", &["BRANCH_XX", "LEAF", "LEAF"])],
    );
    assert!(err_of(r, a).contains("nodes_modes"));
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![ints("nodes_nodeids", &[0, 1, 1])],
    );
    assert!(err_of(r, a).contains("nodes_nodeids"));
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![ints("target_ids", &[0, 3])],
    );
    assert!(err_of(r, a).contains("target_ids"));
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![ints("target_nodeids", &[1, 9])],
    );
    assert!(err_of(r, a).contains("target_nodeids"));
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![floats("base_values", &[1.0, 2.0])],
    );
    assert!(err_of(r, a).contains("base_values"));
    let a = with(reg_stump("BRANCH_LEQ", 0.5), vec![int("n_targets", 0)]);
    assert!(err_of(r, a).contains("n_targets"));
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![ints("nodes_featureids", &[-1, 0, 0])],
    );
    assert!(err_of(r, a).contains("nodes_featureids"));
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![string("aggregate_function", "MEDIAN")],
    );
    assert!(err_of(r, a).contains("aggregate_function"));
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![tensor_f("nodes_values_as_tensor", &[0.5, 0.0, 0.0], true)],
    );
    assert!(err_of(r, a).contains("nodes_values"));
    let a = with(
        reg_stump("BRANCH_LEQ", 0.5),
        vec![string("post_transform", "SQUARE")],
    );
    assert!(err_of(r, a).contains("post_transform"));
    // classifiers
    let c = Kind::Classifier;
    assert!(err_of(
        c,
        without(
            cls_stump(&[0, 1], &[1.0, 1.0], None, "NONE"),
            "classlabels_int64s"
        )
    )
    .contains("classlabels"));
    let a = with(
        multi(&[1], &[1.0], &[1], &[7, 8, 9]),
        vec![floats("base_values", &[0.1, 0.2])],
    );
    assert!(err_of(c, a).contains("base_values"));
    assert!(err_of(c, multi(&[3], &[1.0], &[1], &[7, 8, 9])).contains("class_ids"));
    // v5
    let e = Kind::Ensemble;
    assert!(err_of(e, v5(&[0, 9], None, vec![])).contains("nodes_modes"));
    assert!(err_of(
        e,
        v5(&[0, 0], None, vec![ints("nodes_truenodeids", &[5, 1])])
    )
    .contains("nodes_truenodeids"));
    assert!(err_of(
        e,
        v5(&[0, 0], None, vec![ints("leaf_targetids", &[0, 1, 4])])
    )
    .contains("leaf_targetids"));
    assert!(err_of(e, v5(&[0, 6], None, vec![])).contains("membership_values"));
    assert!(err_of(e, v5(&[0, 0], None, vec![ints("tree_roots", &[2])])).contains("tree_roots"));
    let a = v5(
        &[0, 0],
        None,
        vec![
            ints("nodes_falsenodeids", &[1, 0]),
            ints("nodes_falseleafs", &[0, 0]),
        ],
    );
    assert!(err_of(e, a).contains("cycle"));
    assert!(
        err_of(e, v5(&[0, 0], None, vec![ints("nodes_trueleafs", &[1])]))
            .contains("nodes_trueleafs")
    );
    let bad_tensor = AttributeProto {
        name: "nodes_splits".into(),
        r#type: AttributeType::Tensor as i32,
        t: Some(TensorProto {
            dims: vec![2],
            data_type: 1,
            raw_data: vec![0; 5],
            ..Default::default()
        }),
        ..Default::default()
    };
    assert!(err_of(e, v5(&[0, 0], None, vec![bad_tensor])).contains("nodes_splits"));
}

#[test]
fn too_deep_trees_are_refused() {
    // a chain of BRANCH_LEQ nodes deeper than the limit
    let depth = super::forest::MAX_DEPTH as i64 + 1;
    let count = 2 * depth + 1;
    let mut modes = Vec::new();
    let (mut t, mut f, mut feats) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..count {
        if i < depth {
            modes.push("BRANCH_LEQ");
            t.push(depth + 1 + i);
            f.push(if i + 1 < depth { i + 1 } else { depth });
        } else {
            modes.push("LEAF");
            t.push(0);
            f.push(0);
        }
        feats.push(0);
    }
    let a = vec![
        ints("nodes_treeids", &vec![0; count as usize]),
        ints("nodes_nodeids", &(0..count).collect::<Vec<_>>()),
        ints("nodes_featureids", &feats),
        floats("nodes_values", &vec![0.5; count as usize]),
        strs("nodes_modes", &modes),
        ints("nodes_truenodeids", &t),
        ints("nodes_falsenodeids", &f),
        int("n_targets", 1),
    ];
    assert!(err_of(Kind::Regressor, a).contains("deeper"));
}

#[test]
fn inputs_that_do_not_fit_are_errors() {
    let k = build(
        Kind::Regressor,
        with(
            reg_stump("BRANCH_LEQ", 0.5),
            vec![ints("nodes_featureids", &[3, 0, 0])],
        ),
    )
    .unwrap();
    let err = k.eval(&[&x32(&[&[0., 0.]])]).unwrap_err();
    assert!(format!("{err:#}").contains("feature 3"), "{err:#}");
    let x3 = tract_ndarray::Array3::<f32>::zeros((1, 2, 2)).into_tensor();
    assert!(k.eval(&[&x3]).is_err());
    let s = tensor1(&["a".to_string()]);
    assert!(k.eval(&[&s]).is_err());
    let v5k = build(Kind::Ensemble, v5(&[0, 0], None, vec![])).unwrap();
    assert!(v5k.eval(&[&tensor2(&[[1i64, 2]])]).is_err());
    // zero rows
    let empty = tract_ndarray::Array2::<f32>::zeros((0, 4)).into_tensor();
    assert_eq!(k.eval(&[&empty]).unwrap()[0].shape(), &[0, 1]);
}

#[test]
fn shared_subtrees_and_split_tree_ids_follow_onnxruntime() {
    // node 0: x0 <= .5 ? node 2 : node 1; node 1: x1 <= .5 ? node 2 : leaf 3 (node 2 shared)
    let a = vec![
        ints("nodes_treeids", &[0, 0, 0, 0]),
        ints("nodes_nodeids", &[0, 1, 2, 3]),
        ints("nodes_featureids", &[0, 1, 0, 0]),
        floats("nodes_values", &[0.5, 0.5, 0.0, 0.0]),
        strs("nodes_modes", &["BRANCH_LEQ", "BRANCH_LEQ", "LEAF", "LEAF"]),
        ints("nodes_truenodeids", &[2, 2, 0, 0]),
        ints("nodes_falsenodeids", &[1, 3, 0, 0]),
        ints("target_treeids", &[0, 0]),
        ints("target_nodeids", &[2, 3]),
        ints("target_ids", &[0, 0]),
        floats("target_weights", &[1.0, 2.0]),
        int("n_targets", 1),
    ];
    let k = build(Kind::Regressor, a).unwrap();
    assert_eq!(
        run_both(&k, &[0., 0., 1., 0., 0., 1., 1., 1.], 2),
        [1., 1., 1., 2.]
    );
    // tree 0's leaves listed after tree 1: onnxruntime starts a new tree at each change of
    // tree id, so the run "tree 0, leaves 1 and 2" is a third tree (rooted at leaf 1)
    let a = vec![
        ints("nodes_treeids", &[0, 1, 1, 1, 0, 0]),
        ints("nodes_nodeids", &[0, 0, 1, 2, 1, 2]),
        ints("nodes_featureids", &[0, 1, 0, 0, 0, 0]),
        floats("nodes_values", &[0.5, 0.5, 0.0, 0.0, 0.0, 0.0]),
        strs(
            "nodes_modes",
            &["BRANCH_LEQ", "BRANCH_LEQ", "LEAF", "LEAF", "LEAF", "LEAF"],
        ),
        ints("nodes_truenodeids", &[1, 1, 0, 0, 0, 0]),
        ints("nodes_falsenodeids", &[2, 2, 0, 0, 0, 0]),
        ints("target_treeids", &[0, 0, 1, 1]),
        ints("target_nodeids", &[1, 2, 1, 2]),
        ints("target_ids", &[0, 0, 0, 0]),
        floats("target_weights", &[1.0, 2.0, 10.0, 20.0]),
        int("n_targets", 1),
    ];
    let k = build(Kind::Regressor, a).unwrap();
    assert_eq!(
        run_both(&k, &[0., 0., 1., 0., 0., 1., 1., 1.], 2),
        [12., 13., 22., 23.]
    );
}

/// A deterministic pseudo-random forest: `trees` complete trees of `depth` levels over
/// `features` features, `classes` weights per leaf; NaN tracking on no node (`tracked` 0),
/// on random nodes (1) or on all (2).
fn random_forest(
    trees: usize,
    depth: u32,
    features: i64,
    classes: usize,
    mode: &str,
    tracked: u8,
) -> Vec<AttributeProto> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut tid, mut nid, mut feat, mut val, mut modes, mut tn, mut fnn, mut mvt) = (
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
    );
    let (mut ct, mut cn, mut ci, mut cw) = (vec![], vec![], vec![], vec![]);
    let per_tree = (1i64 << (depth + 1)) - 1;
    for t in 0..trees as i64 {
        for i in 0..per_tree {
            tid.push(t);
            nid.push(i);
            if i < (1 << depth) - 1 {
                feat.push((rnd() % features as u64) as i64);
                val.push((rnd() % 1000) as f32 / 1000.0);
                modes.push(mode);
                tn.push(2 * i + 1);
                fnn.push(2 * i + 2);
                mvt.push(match tracked {
                    0 => 0,
                    1 => (rnd() % 2) as i64,
                    _ => 1,
                });
            } else {
                feat.push(0);
                val.push(0.0);
                modes.push("LEAF");
                tn.push(0);
                fnn.push(0);
                mvt.push(0);
                for c in 0..classes {
                    ct.push(t);
                    cn.push(i);
                    ci.push(c as i64);
                    cw.push((rnd() % 100) as f32 / 100.0);
                }
            }
        }
    }
    vec![
        ints("nodes_treeids", &tid),
        ints("nodes_nodeids", &nid),
        ints("nodes_featureids", &feat),
        floats("nodes_values", &val),
        strs("nodes_modes", &modes),
        ints("nodes_truenodeids", &tn),
        ints("nodes_falsenodeids", &fnn),
        ints("nodes_missing_value_tracks_true", &mvt),
        ints("class_treeids", &ct),
        ints("class_nodeids", &cn),
        ints("class_ids", &ci),
        floats("class_weights", &cw),
        ints(
            "classlabels_int64s",
            &(0..classes as i64).collect::<Vec<_>>(),
        ),
    ]
}

#[test]
fn batch_and_single_rows_agree_on_random_forests() {
    let width = 6;
    let mut seed = 7u64;
    let rows: Vec<f32> = (0..37 * width)
        .map(|i| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if i % 11 == 3 {
                f32::NAN
            } else {
                (seed >> 40) as f32 / (1u64 << 24) as f32
            }
        })
        .collect();
    for (mode, tracked) in [
        ("BRANCH_LEQ", 0),
        ("BRANCH_LT", 1),
        ("BRANCH_GT", 2),
        ("BRANCH_NEQ", 0),
    ] {
        for classes in [2, 3] {
            let k = build(
                Kind::Classifier,
                random_forest(13, 4, width as i64, classes, mode, tracked),
            )
            .unwrap();
            let all = k
                .eval(&[
                    &tract_ndarray::Array2::from_shape_vec((37, width), rows.clone())
                        .unwrap()
                        .into_tensor(),
                ])
                .unwrap();
            for r in 0..37 {
                let one = tensor1(&rows[r * width..(r + 1) * width]);
                let out = k.eval(&[&one]).unwrap();
                assert_eq!(i64s(&out[0])[0], i64s(&all[0])[r]);
                assert_eq!(
                    f32s(&out[1])[..],
                    f32s(&all[1])[r * classes..(r + 1) * classes]
                );
            }
        }
    }
}

/// Adds to a classifier a stump on `==` whose leaves add 0 to every class: the outputs do
/// not change, but the ensemble now needs the general (per-node mode) kernel.
fn force_general(attrs: Vec<AttributeProto>, classes: usize) -> Vec<AttributeProto> {
    let get = |name: &str| attrs.iter().find(|a| a.name == name).cloned().unwrap();
    let tid = get("nodes_treeids").ints;
    let t = tid.iter().max().copied().unwrap_or(0) + 1;
    let push_ints = |name: &str, extra: &[i64]| {
        let mut v = get(name).ints;
        v.extend_from_slice(extra);
        ints(name, &v)
    };
    let mut values = get("nodes_values").floats;
    values.extend_from_slice(&[123456.0, 0.0, 0.0]);
    let mut modes: Vec<String> = get("nodes_modes")
        .strings
        .iter()
        .map(|s| String::from_utf8(s.clone()).unwrap())
        .collect();
    modes.extend(["BRANCH_EQ", "LEAF", "LEAF"].map(String::from));
    let modes: Vec<&str> = modes.iter().map(|s| s.as_str()).collect();
    let mut weights = get("class_weights").floats;
    weights.extend(std::iter::repeat_n(0.0, 2 * classes));
    let leaf_ids: Vec<i64> = (0..2 * classes as i64)
        .map(|i| 1 + i / classes as i64)
        .collect();
    let class_ids: Vec<i64> = (0..2 * classes as i64)
        .map(|i| i % classes as i64)
        .collect();
    with(
        attrs.clone(),
        vec![
            push_ints("nodes_treeids", &[t, t, t]),
            push_ints("nodes_nodeids", &[0, 1, 2]),
            push_ints("nodes_featureids", &[0, 0, 0]),
            floats("nodes_values", &values),
            strs("nodes_modes", &modes),
            push_ints("nodes_truenodeids", &[1, 0, 0]),
            push_ints("nodes_falsenodeids", &[2, 0, 0]),
            push_ints("nodes_missing_value_tracks_true", &[0, 0, 0]),
            push_ints("class_treeids", &vec![t; 2 * classes]),
            push_ints("class_nodeids", &leaf_ids),
            push_ints("class_ids", &class_ids),
            floats("class_weights", &weights),
        ],
    )
}

#[test]
fn fast_kernels_agree_with_the_general_one() {
    let width = 6;
    let rows = 300;
    let mut seed = 11u64;
    let x: Vec<f32> = (0..rows * width)
        .map(|i| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            match i % 17 {
                3 => f32::NAN,
                5 => 0.5,
                _ => (seed >> 40) as f32 / (1u64 << 24) as f32,
            }
        })
        .collect();
    let xt = tract_ndarray::Array2::from_shape_vec((rows, width), x)
        .unwrap()
        .into_tensor();
    for mode in ["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT"] {
        for tracked in [0, 1, 2, 3, 4, 5] {
            // one class (one-target accumulation) or three (dense accumulation)
            let classes = 1 + 2 * (tracked as usize % 2);
            let mvt = match tracked {
                3 | 4 => 1,
                5 => 2,
                t => t,
            };
            let mut attrs = random_forest(9, 5, width as i64, classes, mode, mvt);
            if tracked >= 3 {
                // infinite (3) or NaN (4, 5: all nodes tracked) thresholds defeat the NaN
                // planes and the all-NaN-to-a kernel: the per-node flag kernel runs, or the
                // general one for `>=`/`>` against NaN
                let special = if tracked == 3 {
                    [
                        f32::NEG_INFINITY,
                        f32::INFINITY,
                        f32::INFINITY,
                        f32::NEG_INFINITY,
                    ]
                } else {
                    [f32::NAN; 4]
                };
                let values = attrs.iter_mut().find(|a| a.name == "nodes_values").unwrap();
                values.floats[..4].copy_from_slice(&special);
                if tracked < 5 {
                    let mvt = attrs
                        .iter_mut()
                        .find(|a| a.name == "nodes_missing_value_tracks_true")
                        .unwrap();
                    mvt.ints[..4].copy_from_slice(&[0, 1, 0, 1]);
                }
            }
            let fast = build(Kind::Classifier, attrs.clone()).unwrap();
            // `>=`/`>` are normalised to `<`/`<=` with swapped children: untracked NaN then
            // goes to the swapped-in side.
            let swapped = mode.starts_with("BRANCH_G");
            let kernel = match (tracked, swapped) {
                (4 | 5, true) => "general",
                // -inf against `<` (BRANCH_LT, BRANCH_GTE normalised) defeats the planes
                (3, _) if !mode.contains("LT") && !mode.contains("GTE") => "fast, NaN planes",
                (3..=5, _) => "fast, NaN flags",
                (1, _) => "fast, NaN planes",
                (0, false) | (2, true) => "fast",
                _ => "fast, NaN to a",
            };
            assert_eq!(fast.single.as_ref().unwrap().kernel(), kernel);
            let fast = fast.eval(&[&xt]).unwrap();
            let general = build(Kind::Classifier, force_general(attrs.clone(), classes)).unwrap();
            let expected = if tracked >= 4 { "general" } else { "masked" };
            assert_eq!(general.single.as_ref().unwrap().kernel(), expected);
            let general = general.eval(&[&xt]).unwrap();
            assert_eq!(
                i64s(&fast[0]),
                i64s(&general[0]),
                "{mode} tracked={tracked}"
            );
            assert_eq!(
                f32s(&fast[1]),
                f32s(&general[1]),
                "{mode} tracked={tracked}"
            );
            // one row at a time (tree lanes)
            let fast_k = build(Kind::Classifier, attrs.clone()).unwrap();
            let general_k = build(Kind::Classifier, force_general(attrs, classes)).unwrap();
            for r in [0, 1, 7, 150] {
                let one = xt.slice(0, r, r + 1).unwrap();
                for k in [&fast_k, &general_k] {
                    let out = k.eval(&[&one]).unwrap();
                    assert_eq!(
                        f32s(&out[1]),
                        f32s(&fast[1])[r * classes..(r + 1) * classes]
                    );
                }
            }
        }
    }
}

/// A categorical split as converters write it: `x0 == 1`, else `x0 == 4`, else `x0 == c`,
/// all true branches to one leaf (weight 10) — or, with `distinct`, to three equal leaves,
/// which keeps the chain from being merged into one membership test.
fn eq_chain(c: f32, mvt: [i64; 3], distinct: bool) -> Vec<AttributeProto> {
    let t = if distinct { [3, 5, 6] } else { [3, 3, 3] };
    vec![
        ints("nodes_treeids", &[0; 7]),
        ints("nodes_nodeids", &[0, 1, 2, 3, 4, 5, 6]),
        ints("nodes_featureids", &[0; 7]),
        floats("nodes_values", &[1.0, 4.0, c, 0.0, 0.0, 0.0, 0.0]),
        strs(
            "nodes_modes",
            &[
                "BRANCH_EQ",
                "BRANCH_EQ",
                "BRANCH_EQ",
                "LEAF",
                "LEAF",
                "LEAF",
                "LEAF",
            ],
        ),
        ints("nodes_truenodeids", &[t[0], t[1], t[2], 0, 0, 0, 0]),
        ints("nodes_falsenodeids", &[1, 2, 4, 0, 0, 0, 0]),
        ints(
            "nodes_missing_value_tracks_true",
            &[mvt[0], mvt[1], mvt[2], 0, 0, 0, 0],
        ),
        ints("target_treeids", &[0; 4]),
        ints("target_nodeids", &[3, 4, 5, 6]),
        ints("target_ids", &[0; 4]),
        floats("target_weights", &[10.0, 20.0, 10.0, 10.0]),
        int("n_targets", 1),
    ]
}

#[test]
fn equality_chains_become_exact_membership_tests() {
    let values = [
        0.0,
        1.0,
        2.0,
        2.5,
        4.0,
        7.0,
        100.0,
        f32::NAN,
        -1.0,
        70.0,
        -0.0,
        1.0000001,
        63.0,
        64.0,
    ];
    let xs: Vec<f32> = values.iter().flat_map(|v| [*v, 0.0]).collect();
    for c in [7.0, 63.0, 100.0, 2.5, f32::NAN] {
        for mvt in [[0, 0, 0], [0, 1, 0], [1, 0, 0]] {
            let merged = build(Kind::Regressor, eq_chain(c, mvt, false)).unwrap();
            let plain = build(Kind::Regressor, eq_chain(c, mvt, true)).unwrap();
            assert_eq!(merged.single.as_ref().unwrap().member_nodes(), 1);
            assert_eq!(plain.single.as_ref().unwrap().member_nodes(), 0);
            let want = run_both(&plain, &xs, 2);
            assert_eq!(run_both(&merged, &xs, 2), want, "c={c} mvt={mvt:?}");
            // the same through the double-precision forest (widened from the float one)
            let x64: Vec<f64> = xs.iter().map(|v| *v as f64).collect();
            let x64 = tract_ndarray::Array2::from_shape_vec((xs.len() / 2, 2), x64)
                .unwrap()
                .into_tensor();
            assert_eq!(
                f32s(&merged.eval(&[&x64]).unwrap()[0]),
                want,
                "c={c} mvt={mvt:?} double"
            );
            // spot checks of the reference itself
            assert_eq!(want[1], 10.0);
            assert_eq!(want[0], 20.0);
            assert_eq!(want[7], if mvt == [0, 0, 0] { 20.0 } else { 10.0 });
        }
    }
}

#[test]
fn large_membership_sets_are_scanned() {
    // 70 distinct values on one feature: too many for a 64-entry category dictionary
    let mut members: Vec<f64> = (0..70).map(|i| i as f64 + 0.5).collect();
    members.push(f64::NAN);
    let k = build(Kind::Ensemble, v5(&[0, 6], Some(&members), vec![])).unwrap();
    assert_eq!(k.single.as_ref().unwrap().kernel(), "masked");
    assert_eq!(k.single.as_ref().unwrap().member_nodes(), 1);
    let xs = [1., 0.5, 1., 69.5, 1., 70.5, 1., 3., 1., f32::NAN, 0., 0.5];
    assert_eq!(
        run_both(&k, &xs, 2),
        [0., 2., 0., 2., 3., 0., 3., 0., 3., 0., 1., 0.]
    );
    // a few values with -0.0 and 0.0 as one category
    let k = build(
        Kind::Ensemble,
        v5(&[0, 6], Some(&[-0.0, 2.5, f64::NAN]), vec![]),
    )
    .unwrap();
    let xs = [1., 0.0, 1., -0.0, 1., 2.5, 1., 2.4, 1., -2.5];
    assert_eq!(
        run_both(&k, &xs, 2),
        [0., 2., 0., 2., 0., 2., 3., 0., 3., 0.]
    );
}

#[test]
fn membership_nodes_ignore_their_split_value() {
    // converters leave the split of a BRANCH_MEMBER node NaN; with missing value tracking
    // that must not force the literal kernel nor change the result
    let k = build(
        Kind::Ensemble,
        v5(
            &[0, 6],
            Some(&[1.0, 3.0]),
            vec![
                tensor_f("nodes_splits", &[0.5, f64::NAN], false),
                ints("nodes_missing_value_tracks_true", &[0, 1]),
            ],
        ),
    )
    .unwrap();
    assert_eq!(k.single.as_ref().unwrap().kernel(), "masked");
    let xs = [0., 0., 1., 0., 1., 1., 1., f32::NAN, 1., 3.];
    assert_eq!(
        run_both(&k, &xs, 2),
        [1., 0., 3., 0., 0., 2., 0., 2., 0., 2.]
    );
}
