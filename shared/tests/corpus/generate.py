#!/usr/bin/env python3
"""Conformance corpus generator for the edge-agent ai.onnx.ml operators.

Trains small scikit-learn / LightGBM / XGBoost models, exports them to ONNX
(skl2onnx / onnxmltools), adds hand-built graphs (onnx.helper) for operator
variants that no exporter emits, runs every model through onnxruntime
(single-threaded) and writes, per model,

    <set>/<model_id>/model.onnx
    <set>/<model_id>/input.csv      (or input.jsonl for map-typed inputs)
    <set>/<model_id>/expected.jsonl
    <set>/<model_id>/meta.json

plus <set>/index.json.  See README.md next to this file for the formats.

    python3 generate.py                 # both sets
    python3 generate.py --set dev
    python3 generate.py --set unseen

Everything is seeded; running it twice gives byte-identical files with the
same package versions.
"""

import argparse
import csv
import json
import math
import os
import re
import shutil
import sys
import time
import warnings

if __name__ == "__main__" and os.environ.get("PYTHONHASHSEED") != "0":
    # exporters iterate over sets (e.g. the order of opset_import entries):
    # pin the hash seed so the files are byte-identical between runs
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
warnings.filterwarnings("ignore")

import numpy as np
import pandas as pd
import onnx
import onnx.helper as oh
from onnx import TensorProto as TP
from onnx import numpy_helper as onh
import onnxruntime as ort

# ---------------------------------------------------------------------------
# skl2onnx 1.20 + onnx 1.23: the HistGradientBoosting converter puts numpy
# bools into nodes_missing_value_tracks_true, which onnx.helper rejects
# ("Expected an int, got a boolean").  Coerce bool lists to ints.
# ---------------------------------------------------------------------------
_orig_make_attribute = oh.make_attribute


def _make_attribute(key, value, *args, **kwargs):
    if isinstance(value, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in value):
        value = [int(v) for v in value]
    return _orig_make_attribute(key, value, *args, **kwargs)


oh.make_attribute = _make_attribute

import sklearn  # noqa: E402
import skl2onnx  # noqa: E402
from skl2onnx import to_onnx  # noqa: E402
from skl2onnx.common.data_types import Int64TensorType, StringTensorType  # noqa: E402
import onnxmltools  # noqa: E402
from onnxmltools.convert.common.data_types import FloatTensorType as MLFloatTensorType  # noqa: E402
import lightgbm  # noqa: E402
import xgboost  # noqa: E402
from sklearn import ensemble, linear_model, neural_network, svm, preprocessing, impute  # noqa: E402
from sklearn.compose import ColumnTransformer  # noqa: E402
from sklearn.datasets import make_classification, make_regression  # noqa: E402
from sklearn.pipeline import Pipeline, make_pipeline  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ML = "ai.onnx.ml"
SKL_OPSET = {"": 17, ML: 3}   # skl2onnx emits the lowest ai.onnx.ml version it needs
MLTOOLS_OPSET = 15            # highest opset onnxmltools 1.16 accepts
ROWS = 200

ELEM_NAMES = {
    TP.FLOAT: "float", TP.DOUBLE: "double", TP.INT64: "int64", TP.INT32: "int32",
    TP.STRING: "string", TP.BOOL: "bool", TP.UINT8: "uint8", TP.FLOAT16: "float16",
}
POST_NAMES = ["NONE", "SOFTMAX", "LOGISTIC", "SOFTMAX_ZERO", "PROBIT"]        # TreeEnsemble (opset 5) ints
AGG_NAMES = ["AVERAGE", "SUM", "MIN", "MAX"]                                   # TreeEnsemble (opset 5) ints
MODE_NAMES = ["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ", "BRANCH_MEMBER"]
BRANCH_MODES = MODE_NAMES[:6]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# onnxruntime helpers
# ---------------------------------------------------------------------------
def ort_session(model_bytes):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def type_desc(tp):
    """(elem_type string, shape list or None) of an onnx TypeProto."""
    which = tp.WhichOneof("value")
    if which == "tensor_type":
        tt = tp.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    shape.append(d.dim_value)
                elif d.HasField("dim_param"):
                    shape.append(d.dim_param)
                else:
                    shape.append(None)
        return ELEM_NAMES.get(tt.elem_type, str(tt.elem_type)), shape
    if which == "map_type":
        mt = tp.map_type
        return "map(%s,%s)" % (ELEM_NAMES.get(mt.key_type), type_desc(mt.value_type)[0]), None
    if which == "sequence_type":
        return "seq(%s)" % type_desc(tp.sequence_type.elem_type)[0], None
    return which, None


def graph_inputs(model):
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def op_list(model):
    return sorted({"%s:%s" % (n.domain or "ai.onnx", n.op_type) for n in model.graph.node})


# ---------------------------------------------------------------------------
# value rendering
# ---------------------------------------------------------------------------
def fnum(v):
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return v


def scalar(v):
    if isinstance(v, (bytes, np.bytes_)):
        return v.decode("utf-8")
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    return fnum(v)


def render_rows(value, n):
    """Split one ORT output into n per-row JSON values."""
    if isinstance(value, list):  # ZipMap: sequence of maps
        assert len(value) == n, (len(value), n)
        return [{str(scalar(k)): fnum(p) for k, p in d.items()} for d in value]
    arr = np.asarray(value)
    assert arr.shape[0] == n, ("output does not have one entry per row", arr.shape, n)
    flat = arr.reshape(n, -1)
    if flat.shape[1] == 1:
        return [scalar(r[0]) for r in flat]
    return [[scalar(x) for x in r] for r in flat]


def csv_cell(v, kind):
    if kind == "f":
        f = float(v)
        return "" if math.isnan(f) else repr(float(np.float32(f)))
    if kind == "d":
        f = float(v)
        return "" if math.isnan(f) else repr(f)
    if kind == "i":
        return str(int(v))
    s = v.decode("utf-8") if isinstance(v, bytes) else str(v)
    assert s != "", "empty strings are not representable in input.csv"
    return s


def cell_kind(arr):
    if arr.dtype == np.float32:
        return "f"
    if arr.dtype == np.float64:
        return "d"
    if np.issubdtype(arr.dtype, np.integer):
        return "i"
    return "s"


def has_nan(feeds):
    for a in feeds.values():
        if a.dtype.kind == "f" and np.isnan(a).any():
            return True
    return False


def compare_outputs(ort_out, ref_out):
    """(max relative numeric difference, number of differing labels)."""
    if isinstance(ort_out, list):  # ZipMap vs the tensor it was built from
        a = np.array([[float(v) for v in d.values()] for d in ort_out])
        return compare_outputs(a, ref_out)
    a, b = np.asarray(ort_out), np.asarray(ref_out)
    if a.size != b.size:
        return float("inf"), 0
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype == object or b.dtype == object or a.dtype.kind in "SU" or b.dtype.kind in "SU":
        return 0.0, int(sum(1 for x, y in zip(a, b) if scalar(x) != scalar(y)))
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        return 0.0, int(np.sum(a != b))
    a, b = a.astype(np.float64), b.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    with np.errstate(invalid="ignore"):
        d = np.where(both_nan, 0.0, np.abs(a - b) / (1.0 + np.abs(b)))
    d = np.where(np.isnan(d), np.inf, d)
    return float(d.max()) if d.size else 0.0, 0


def strip_zipmap(model):
    """The reference evaluator has no ZipMap: expose ZipMap's input tensor
    instead (compared against the ZipMap dict values)."""
    zm = [n for n in model.graph.node if n.op_type == "ZipMap"]
    if not zm:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in [n for n in m.graph.node if n.op_type == "ZipMap"]:
        for o in m.graph.output:
            if o.name == n.output[0]:
                o.CopyFrom(oh.make_tensor_value_info(n.input[0], TP.FLOAT, None))
        m.graph.node.remove(n)
    return m


def onnx_reference_check(model, runs):
    """Cross-check onnxruntime against onnx.reference.ReferenceEvaluator.
    runs: [(feeds, ort outputs)]."""
    from onnx.reference import ReferenceEvaluator
    try:
        ev = ReferenceEvaluator(strip_zipmap(model))
        worst, labels = 0.0, 0
        for feeds, ort_res in runs:
            ref = ev.run(None, feeds)
            for a, b in zip(ort_res, ref):
                d, m = compare_outputs(a, b)
                worst, labels = max(worst, d), labels + m
    except Exception as e:  # noqa: BLE001 - the reference lacks some ops/attributes
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {"status": "not run", "reason": msg[:160]}
    ok = worst <= 1e-4 and labels == 0
    return {"status": "agrees" if ok else "differs", "max_rel_diff": worst if math.isfinite(worst) else "Infinity",
            "differing_labels": labels}


# ---------------------------------------------------------------------------
# coverage tags: what operator variants a graph exercises
# ---------------------------------------------------------------------------
def attrs_of(node):
    out = {}
    for a in node.attribute:
        v = oh.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode("utf-8") for x in v]
        out[a.name] = v
    return out


def tensor_kind(t):
    return {TP.FLOAT: "float", TP.DOUBLE: "double", TP.INT64: "int64", TP.STRING: "string"}.get(t.data_type, str(t.data_type))


def coverage_tags(model):
    tags = set()
    for node in model.graph.node:
        op = node.op_type
        tags.add(op)
        if (node.domain or "") != ML:
            continue
        a = attrs_of(node)
        if op in ("TreeEnsembleClassifier", "TreeEnsembleRegressor"):
            tags.add("%s:post_transform=%s" % (op, a.get("post_transform", "NONE")))
            for m in set(a.get("nodes_modes", [])):
                tags.add("%s:mode=%s" % (op, m))
                tags.add("TreeEnsemble*:mode=%s" % m)
            if any(a.get("nodes_missing_value_tracks_true", [])):
                tags.add("%s:missing_value_tracks_true" % op)
            if op == "TreeEnsembleRegressor":
                tags.add("%s:aggregate_function=%s" % (op, a.get("aggregate_function", "SUM")))
                if a.get("n_targets", 1) > 1:
                    tags.add("%s:multi_target" % op)
            else:
                labels = a.get("classlabels_strings") or a.get("classlabels_int64s")
                tags.add("%s:labels=%s" % (op, "string" if "classlabels_strings" in a else "int64"))
                if len(labels) == 2:
                    tags.add("%s:binary" % op)
                    tags.add("%s:binary_base_values=%d" % (op, len(a.get("base_values", []))))
                    tags.add("%s:binary_class_ids=%d" % (op, len(set(a.get("class_ids", [])))))
                else:
                    tags.add("%s:multiclass" % op)
        elif op == "TreeEnsemble":
            tags.add("%s:post_transform=%s" % (op, POST_NAMES[a.get("post_transform", 0)]))
            tags.add("%s:aggregate_function=%s" % (op, AGG_NAMES[a.get("aggregate_function", 1)]))
            modes = onh.to_array(a["nodes_modes"]) if "nodes_modes" in a else []
            for m in set(int(x) for x in modes):
                tags.add("%s:mode=%s" % (op, MODE_NAMES[m]))
            if any(a.get("nodes_missing_value_tracks_true", [])):
                tags.add("%s:missing_value_tracks_true" % op)
            if a.get("n_targets", 1) > 1:
                tags.add("%s:multi_target" % op)
        elif op == "LinearClassifier":
            tags.add("%s:post_transform=%s" % (op, a.get("post_transform", "NONE")))
            labels = a.get("classlabels_strings") or a.get("classlabels_ints")
            tags.add("%s:labels=%s" % (op, "string" if "classlabels_strings" in a else "int64"))
            tags.add("%s:%s" % (op, "binary" if len(labels) == 2 else "multiclass"))
            if len(a.get("intercepts", [])) == 1:
                tags.add("%s:one_coefficient_row" % op)
        elif op == "LinearRegressor":
            tags.add("%s:post_transform=%s" % (op, a.get("post_transform", "NONE")))
            if a.get("targets", 1) > 1:
                tags.add("%s:multi_target" % op)
        elif op == "SVMClassifier":
            tags.add("%s:kernel=%s" % (op, a.get("kernel_type", "LINEAR")))
            tags.add("%s:%s" % (op, "probability" if a.get("prob_a") else "no_probability"))
            labels = a.get("classlabels_strings") or a.get("classlabels_ints")
            tags.add("%s:%s" % (op, "binary" if len(labels) == 2 else "multiclass"))
        elif op == "SVMRegressor":
            tags.add("%s:kernel=%s" % (op, a.get("kernel_type", "LINEAR")))
            if a.get("one_class", 0):
                tags.add("%s:one_class" % op)
        elif op == "Normalizer":
            tags.add("%s:norm=%s" % (op, a.get("norm", "MAX")))
        elif op == "OneHotEncoder":
            tags.add("%s:%s" % (op, "cats_strings" if "cats_strings" in a else "cats_int64s"))
            tags.add("%s:zeros=%d" % (op, a.get("zeros", 1)))
        elif op == "LabelEncoder":
            if "keys_tensor" in a:
                kt, vt, form = tensor_kind(a["keys_tensor"]), tensor_kind(a["values_tensor"]), "opset4_tensor"
            else:
                kt = [k for k in ("string", "int64", "float") if "keys_%ss" % k in a][0]
                vt = [k for k in ("string", "int64", "float") if "values_%ss" % k in a][0]
                form = "opset2_attr"
            tags.add("%s:%s:%s->%s" % (op, form, kt, vt))
        elif op == "CastMap":
            tags.add("%s:map_form=%s" % (op, a.get("map_form", "DENSE")))
            tags.add("%s:cast_to=%s" % (op, a.get("cast_to", "TO_FLOAT")))
        elif op == "ZipMap":
            tags.add("%s:labels=%s" % (op, "string" if "classlabels_strings" in a else "int64"))
    return tags


# onnxruntime applies SOFTMAX/LOGISTIC (codes 1/2) of the opset-5 TreeEnsemble swapped
# with respect to the ONNX spec; the corpus only uses the codes where it agrees.
TE_POSTS_ORT_AGREES = ["NONE", "SOFTMAX_ZERO", "PROBIT"]

LE_COMBOS = ["string->int64", "int64->string", "string->float", "float->string",
             "int64->float", "string->string", "int64->int64"]

REQUIRED_DEV = (
    ["TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble", "LinearClassifier",
     "LinearRegressor", "SVMClassifier", "SVMRegressor", "Scaler", "Imputer", "Normalizer",
     "Binarizer", "OneHotEncoder", "LabelEncoder", "ArrayFeatureExtractor", "FeatureVectorizer",
     "CastMap", "ZipMap"]
    + ["TreeEnsembleClassifier:post_transform=%s" % p for p in POST_NAMES]
    + ["TreeEnsembleRegressor:post_transform=%s" % p for p in POST_NAMES]
    + ["TreeEnsembleRegressor:aggregate_function=%s" % a for a in ["SUM", "AVERAGE", "MIN", "MAX"]]
    + ["TreeEnsemble%s:mode=%s" % (w, m) for w in ("Classifier", "Regressor") for m in BRANCH_MODES + ["LEAF"]]
    + ["TreeEnsembleClassifier:binary", "TreeEnsembleClassifier:multiclass",
       "TreeEnsembleClassifier:binary_base_values=1", "TreeEnsembleClassifier:binary_base_values=2",
       "TreeEnsembleClassifier:labels=string", "TreeEnsembleClassifier:labels=int64",
       "TreeEnsembleClassifier:missing_value_tracks_true", "TreeEnsembleRegressor:missing_value_tracks_true",
       "TreeEnsembleRegressor:multi_target"]
    + ["TreeEnsemble:mode=%s" % m for m in MODE_NAMES]
    + ["TreeEnsemble:aggregate_function=%s" % a for a in AGG_NAMES]
    + ["TreeEnsemble:post_transform=%s" % p for p in TE_POSTS_ORT_AGREES]
    + ["TreeEnsemble:missing_value_tracks_true", "TreeEnsemble:multi_target"]
    + ["LinearClassifier:post_transform=%s" % p for p in POST_NAMES]
    + ["LinearClassifier:binary", "LinearClassifier:multiclass", "LinearClassifier:labels=string",
       "LinearClassifier:labels=int64", "LinearClassifier:one_coefficient_row",
       "LinearRegressor:multi_target"]
    + ["LinearRegressor:post_transform=%s" % p for p in POST_NAMES]
    + ["SVMClassifier:kernel=%s" % k for k in ["LINEAR", "POLY", "RBF", "SIGMOID"]]
    + ["SVMClassifier:probability", "SVMClassifier:no_probability", "SVMClassifier:binary", "SVMClassifier:multiclass"]
    + ["SVMRegressor:kernel=%s" % k for k in ["LINEAR", "POLY", "RBF", "SIGMOID"]]
    + ["SVMRegressor:one_class"]
    + ["Normalizer:norm=%s" % n for n in ["L1", "L2", "MAX"]]
    + ["OneHotEncoder:cats_strings", "OneHotEncoder:cats_int64s", "OneHotEncoder:zeros=1"]
    + ["LabelEncoder:%s:%s" % (f, c) for f in ("opset2_attr", "opset4_tensor") for c in LE_COMBOS]
    + ["CastMap:map_form=DENSE", "CastMap:map_form=SPARSE",
       "CastMap:cast_to=TO_FLOAT", "CastMap:cast_to=TO_INT64", "CastMap:cast_to=TO_STRING"]
    + ["ZipMap:labels=int64", "ZipMap:labels=string"]
)


# ---------------------------------------------------------------------------
# the corpus writer
# ---------------------------------------------------------------------------
class Corpus:
    def __init__(self, name, root):
        self.name = name
        self.dir = os.path.join(root, name)
        if os.path.isdir(self.dir):
            shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        self.ids = []
        self.tags = set()
        self.summary = []
        self.reference = {}

    def add(self, model_id, model, feeds=None, *, kind, source, feature_names=None, bench=False,
            bench_group=None, map_rows=None, native=None, notes=None):
        """feeds: {input name: ndarray} (N rows each) for tensor inputs;
        map_rows: (input name, [dict per row]) for a single map-typed input;
        native: optional (output index, expected ndarray) to compare ORT with
        the training library (max abs diff goes to meta.json)."""
        assert model_id not in self.ids, model_id
        if re.fullmatch(r"[0-9a-f]{32}", model.graph.name):
            model.graph.name = model_id  # onnxmltools names graphs with a random uuid
        onnx.checker.check_model(model)
        data = model.SerializeToString()
        sess = ort_session(data)
        ins = graph_inputs(model)
        outs = list(model.graph.output)
        out_names = [o.name for o in outs]
        assert [i.name for i in sess.get_inputs()] == [i.name for i in ins]

        # ---- run onnxruntime
        if map_rows is not None:
            name, rows = map_rows
            n = len(rows)
            per_out = [[] for _ in outs]
            runs = []
            for r in rows:
                res = sess.run(out_names, {name: r})
                runs.append(({name: r}, res))
                for k, v in enumerate(res):
                    per_out[k].extend(render_rows(v, 1))
        else:
            n = len(next(iter(feeds.values())))
            assert set(feeds) == {i.name for i in ins}, (set(feeds), [i.name for i in ins])
            res = sess.run(out_names, {i.name: feeds[i.name] for i in ins})
            runs = [({i.name: feeds[i.name] for i in ins}, res)]
            per_out = [render_rows(v, n) for v in res]
        reference = onnx_reference_check(model, runs)
        nonfinite = 0
        for col in per_out:
            for v in col:
                vals = v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else [v]
                nonfinite += sum(1 for x in vals if x in ("NaN", "Infinity", "-Infinity"))
        if nonfinite:
            log("  note: %s has %d non-finite output values" % (model_id, nonfinite))

        native_diff = None
        if native is not None and map_rows is None:
            k, want = native
            got = res[k]
            if isinstance(got, list):
                keys = list(got[0].keys())
                got = np.array([[d[c] for c in keys] for d in got])
            native_diff = float(np.max(np.abs(np.asarray(got, np.float64).reshape(want.shape) - want)))

        d = os.path.join(self.dir, model_id)
        os.makedirs(d)
        with open(os.path.join(d, "model.onnx"), "wb") as f:
            f.write(data)

        # ---- inputs
        if map_rows is not None:
            name, rows = map_rows
            with open(os.path.join(d, "input.jsonl"), "w") as f:
                for r in rows:
                    f.write(json.dumps({name: {str(int(k)): fnum(v) if isinstance(v, float) else v
                                               for k, v in r.items()}}) + "\n")
            feature_names = None
        else:
            if len(ins) == 1 and feeds[ins[0].name].ndim == 2:
                arr = feeds[ins[0].name]
                if feature_names is None:
                    feature_names = [ins[0].name] if arr.shape[1] == 1 else ["f%d" % j for j in range(arr.shape[1])]
                assert len(feature_names) == arr.shape[1]
                header = list(feature_names)
                cols = [arr[:, j] for j in range(arr.shape[1])]
            else:
                feature_names = None
                header = [i.name for i in ins]
                cols = []
                for i in ins:
                    a = feeds[i.name]
                    assert a.ndim == 1 or a.shape[1:] == (1,), (i.name, a.shape)
                    cols.append(a.reshape(n))
            kinds = [cell_kind(c) for c in cols]
            with open(os.path.join(d, "input.csv"), "w", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(header)
                for r in range(n):
                    w.writerow([csv_cell(c[r], k) for c, k in zip(cols, kinds)])

        # ---- expected outputs
        with open(os.path.join(d, "expected.jsonl"), "w") as f:
            for r in range(n):
                f.write(json.dumps({name: per_out[k][r] for k, name in enumerate(out_names)}) + "\n")

        # ---- meta
        tags = coverage_tags(model)
        meta = {
            "id": model_id,
            "source": source,
            "ops": op_list(model),
            "inputs": [dict(zip(("name", "elem_type", "shape"), (i.name,) + type_desc(i.type))) for i in ins],
            "outputs": [dict(zip(("name", "elem_type", "shape"), (o.name,) + type_desc(o.type))) for o in outs],
            "rows": n,
            "kind": kind,
            "feature_names": feature_names,
            "bench": bool(bench),
            "bench_group": bench_group,
            "opset_import": dict(sorted({(o.domain or "ai.onnx"): o.version for o in model.opset_import}.items())),
            "has_missing_inputs": bool(map_rows is None and has_nan(feeds)),
            "covers": sorted(tags),
        }
        meta["onnx_reference"] = reference
        if native_diff is not None:
            meta["native_max_abs_diff"] = native_diff
        if nonfinite:
            meta["nonfinite_outputs"] = nonfinite
        if notes:
            meta["notes"] = notes
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        self.ids.append(model_id)
        self.tags |= tags
        self.summary.append((model_id, meta["ops"], source, os.path.getsize(os.path.join(d, "model.onnx"))))
        self.reference[model_id] = reference
        log("  %-34s %8d bytes  ref:%-8s %s" % (model_id, len(data), reference["status"],
                                                ", ".join(o.split(":")[1] for o in meta["ops"])))

    def finish(self):
        with open(os.path.join(self.dir, "index.json"), "w") as f:
            json.dump({"set": self.name, "models": self.ids,
                       "generator": {"onnx": onnx.__version__, "onnxruntime": ort.__version__,
                                     "scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__,
                                     "onnxmltools": onnxmltools.__version__, "lightgbm": lightgbm.__version__,
                                     "xgboost": xgboost.__version__, "numpy": np.__version__}},
                      f, indent=1)
            f.write("\n")


# ---------------------------------------------------------------------------
# data helpers
# ---------------------------------------------------------------------------
def clf_data(seed, n_features, n_classes, n_train=1000, n_test=ROWS, informative=None, sep=1.0):
    X, y = make_classification(n_train + n_test, n_features, n_informative=informative or max(2, n_features // 2),
                               n_redundant=min(2, n_features // 4), n_classes=n_classes,
                               n_clusters_per_class=1, class_sep=sep, random_state=seed)
    X = X.astype(np.float32)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def reg_data(seed, n_features, n_targets=1, n_train=1000, n_test=ROWS):
    X, y = make_regression(n_train + n_test, n_features, n_informative=max(2, n_features // 2),
                           n_targets=n_targets, noise=5.0, random_state=seed)
    X = X.astype(np.float32)
    y = (y / (np.std(y) + 1e-9)).astype(np.float64)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def add_nan(X, seed, frac=0.1):
    rng = np.random.RandomState(seed)
    X = X.copy()
    X[rng.rand(*X.shape) < frac] = np.nan
    return X


def skl(model, X=None, initial_types=None, zipmap=True, **extra):
    options = {}
    if not zipmap:
        options[id(model)] = {"zipmap": False}
    opts = dict(target_opset=SKL_OPSET, options=options or None)
    if initial_types is not None:
        return to_onnx(model, initial_types=initial_types, **opts, **extra)
    return to_onnx(model, X[:1], **opts, **extra)


def mltools(conv, model, n_features, zipmap=True):
    kw = {} if zipmap else {"zipmap": False}
    return conv(model, initial_types=[("input", MLFloatTensorType([None, n_features]))],
                target_opset=MLTOOLS_OPSET, **kw)


def proba_of(m, X):
    return m.predict_proba(X).astype(np.float64)


def hand_model(nodes, inputs, outputs, ml_opset=3, onnx_opset=17, initializers=(), name="hand"):
    g = oh.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", onnx_opset), oh.make_opsetid(ML, ml_opset)],
                      producer_name="edge-agent-corpus", producer_version="1")
    m.ir_version = 10 if onnx_opset >= 21 else 8
    return m


def tvi(name, elem, shape):
    return oh.make_tensor_value_info(name, elem, shape)


# ---------------------------------------------------------------------------
# hand-built tree ensembles
# ---------------------------------------------------------------------------
def int_feature_data(seed, n, n_int=4, n_cont=2, nan_frac=0.0):
    """Integer-valued columns (0..5) so thresholds are hit exactly (exercises
    LEQ vs LT, GTE vs GT, EQ, NEQ) plus continuous columns."""
    rng = np.random.RandomState(seed)
    X = np.concatenate([rng.randint(0, 6, (n, n_int)).astype(np.float32),
                        rng.normal(0, 1, (n, n_cont)).astype(np.float32)], axis=1)
    if nan_frac:
        X[rng.rand(*X.shape) < nan_frac] = np.nan
    return X


def random_trees(seed, n_trees, max_depth, n_int=4, n_cont=2, modes=BRANCH_MODES, leaf=None, missing_p=0.3,
                 min_depth=1):
    """Random binary trees. Each tree is a list of dicts (preorder, root 0).
    leaf(rng, tree_index) -> list of (target/class id, weight)."""
    rng = np.random.RandomState(seed)
    int_thr = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.5, 2.5, 3.5]
    trees = []
    for t in range(n_trees):
        nodes = []

        def build(depth):
            nid = len(nodes)
            nodes.append(None)
            if depth >= max_depth or (depth >= min_depth and rng.rand() < 0.25):
                nodes[nid] = {"mode": "LEAF", "weights": leaf(rng, t)}
                return nid
            f = int(rng.randint(n_int + n_cont))
            m = modes[int(rng.randint(len(modes)))]
            if f < n_int:
                v = float(int_thr[int(rng.randint(len(int_thr)))])
            else:
                v = float(np.float32(rng.normal(0, 0.8)))
            node = {"mode": m, "feature": f, "value": v, "miss": int(rng.rand() < missing_p)}
            node["true"] = build(depth + 1)
            node["false"] = build(depth + 1)
            nodes[nid] = node
            return nid

        build(0)
        trees.append(nodes)
    return trees


def tree_node_attrs(trees):
    a = {k: [] for k in ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_modes", "nodes_values",
                         "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true")}
    for t, nodes in enumerate(trees):
        for i, n in enumerate(nodes):
            a["nodes_treeids"].append(t)
            a["nodes_nodeids"].append(i)
            a["nodes_modes"].append(n["mode"])
            leafy = n["mode"] == "LEAF"
            a["nodes_featureids"].append(0 if leafy else n["feature"])
            a["nodes_values"].append(0.0 if leafy else n["value"])
            a["nodes_truenodeids"].append(0 if leafy else n["true"])
            a["nodes_falsenodeids"].append(0 if leafy else n["false"])
            a["nodes_missing_value_tracks_true"].append(0 if leafy else n["miss"])
    return a


def leaf_attrs(trees, prefix):
    a = {prefix + "_treeids": [], prefix + "_nodeids": [], prefix + "_ids": [], prefix + "_weights": []}
    for t, nodes in enumerate(trees):
        for i, n in enumerate(nodes):
            if n["mode"] == "LEAF":
                for cid, w in n["weights"]:
                    a[prefix + "_treeids"].append(t)
                    a[prefix + "_nodeids"].append(i)
                    a[prefix + "_ids"].append(cid)
                    a[prefix + "_weights"].append(float(np.float32(w)))
    return a


def ter_model(trees, n_targets, n_features, aggregate="SUM", post="NONE", base_values=None):
    attrs = tree_node_attrs(trees)
    attrs.update(leaf_attrs(trees, "target"))
    attrs.update(n_targets=n_targets, aggregate_function=aggregate, post_transform=post)
    if base_values is not None:
        attrs["base_values"] = [float(v) for v in base_values]
    node = oh.make_node("TreeEnsembleRegressor", ["X"], ["variable"], domain=ML, **attrs)
    return hand_model([node], [tvi("X", TP.FLOAT, [None, n_features])], [tvi("variable", TP.FLOAT, [None, n_targets])])


def tec_model(trees, labels, n_features, post="NONE", base_values=None, zipmap=False):
    attrs = tree_node_attrs(trees)
    attrs.update(leaf_attrs(trees, "class"))
    attrs["post_transform"] = post
    strings = isinstance(labels[0], str)
    if strings:
        attrs["classlabels_strings"] = list(labels)
    else:
        attrs["classlabels_int64s"] = [int(x) for x in labels]
    if base_values is not None:
        attrs["base_values"] = [float(v) for v in base_values]
    lt = TP.STRING if strings else TP.INT64
    nodes = [oh.make_node("TreeEnsembleClassifier", ["X"], ["label", "probabilities"], domain=ML, **attrs)]
    outputs = [tvi("label", lt, [None]), tvi("probabilities", TP.FLOAT, [None, len(labels)])]
    if zipmap:
        zk = {"classlabels_strings": list(labels)} if strings else {"classlabels_int64s": [int(x) for x in labels]}
        nodes.append(oh.make_node("ZipMap", ["probabilities"], ["output_probability"], domain=ML, **zk))
        outputs[1] = oh.make_value_info("output_probability", oh.make_sequence_type_proto(
            oh.make_map_type_proto(lt, oh.make_tensor_type_proto(TP.FLOAT, []))))
    return hand_model(nodes, [tvi("X", TP.FLOAT, [None, n_features])], outputs)


def find_node(model, op):
    return [n for n in model.graph.node if n.op_type == op][0]


def ter_attrs_to_trees(node):
    """Parse a TreeEnsembleRegressor/Classifier NodeProto into per-tree dicts
    keyed by node id, plus leaf weight lists."""
    a = attrs_of(node)
    prefix = "target" if node.op_type == "TreeEnsembleRegressor" else "class"
    values = a.get("nodes_values")
    if values is None:
        values = list(onh.to_array(a["nodes_values_as_tensor"]))
    miss = a.get("nodes_missing_value_tracks_true") or [0] * len(a["nodes_nodeids"])
    trees = {}
    for k in range(len(a["nodes_nodeids"])):
        t, i = a["nodes_treeids"][k], a["nodes_nodeids"][k]
        trees.setdefault(t, {})[i] = {
            "mode": a["nodes_modes"][k], "feature": a["nodes_featureids"][k], "value": float(values[k]),
            "true": a["nodes_truenodeids"][k], "false": a["nodes_falsenodeids"][k], "miss": int(miss[k]),
            "weights": []}
    for k in range(len(a[prefix + "_ids"])):
        trees[a[prefix + "_treeids"][k]][a[prefix + "_nodeids"][k]]["weights"].append(
            (a[prefix + "_ids"][k], a[prefix + "_weights"][k]))
    return a, trees


def te_from_ter(node, membership=None, aggregate=None, post=None, fold_base=True):
    """Convert a TreeEnsembleRegressor NodeProto into an ai.onnx.ml opset-5
    TreeEnsemble node (attribute conversion). Leaves must carry at most one
    target weight.  base_values (if any) are folded into the first tree's
    leaves (exact for SUM).  membership: {(tree, node id): [values]} turns
    those BRANCH_EQ nodes into BRANCH_MEMBER nodes."""
    a, trees = ter_attrs_to_trees(node)
    n_targets = a.get("n_targets", 1)
    agg = aggregate or a.get("aggregate_function", "SUM")
    pt = post or a.get("post_transform", "NONE")
    base = a.get("base_values") or []
    if base:
        assert fold_base and agg == "SUM" and n_targets == 1 and len(base) == 1
    out = {k: [] for k in ("nodes_featureids", "nodes_splits", "nodes_modes", "nodes_truenodeids",
                           "nodes_trueleafs", "nodes_falsenodeids", "nodes_falseleafs",
                           "nodes_missing_value_tracks_true", "tree_roots", "leaf_targetids", "leaf_weights",
                           "membership_values")}
    for t in sorted(trees):
        nodes = trees[t]
        children = {c for n in nodes.values() if n["mode"] != "LEAF" for c in (n["true"], n["false"])}
        roots = [i for i in nodes if i not in children]
        assert len(roots) == 1, roots
        root = roots[0]

        def add_leaf(n, first_tree):
            w = n["weights"]
            assert len(w) <= 1, "TreeEnsemble leaves carry a single target"
            tid, wt = (w[0] if w else (0, 0.0))
            if first_tree and base:
                wt = float(np.float32(wt) + np.float32(base[0]))
            out["leaf_targetids"].append(int(tid))
            out["leaf_weights"].append(wt)
            return len(out["leaf_weights"]) - 1

        def add_node(i, first_tree):
            n = nodes[i]
            idx = len(out["nodes_featureids"])
            for k in ("nodes_featureids", "nodes_splits", "nodes_modes", "nodes_truenodeids", "nodes_trueleafs",
                      "nodes_falsenodeids", "nodes_falseleafs", "nodes_missing_value_tracks_true"):
                out[k].append(None)
            out["nodes_featureids"][idx] = n["feature"]
            mode = n["mode"]
            split = n["value"]
            if membership and (t, i) in membership:
                assert mode == "BRANCH_EQ"
                mode = "BRANCH_MEMBER"
                out["membership_values"].extend(list(membership[(t, i)]) + [float("nan")])
                split = float("nan")
            out["nodes_modes"][idx] = MODE_NAMES.index(mode)
            out["nodes_splits"][idx] = split
            out["nodes_missing_value_tracks_true"][idx] = n["miss"]
            for side in ("true", "false"):
                c = nodes[n[side]]
                if c["mode"] == "LEAF":
                    out["nodes_%sleafs" % side][idx] = 1
                    out["nodes_%snodeids" % side][idx] = add_leaf(c, first_tree)
                else:
                    out["nodes_%sleafs" % side][idx] = 0
                    out["nodes_%snodeids" % side][idx] = add_node(n[side], first_tree)
            return idx

        first = t == min(trees)
        if nodes[root]["mode"] == "LEAF":
            # a single-leaf tree: TreeEnsemble roots must be interior nodes
            idx = len(out["nodes_featureids"])
            leaf_a = add_leaf(nodes[root], first)
            leaf_b = add_leaf(nodes[root], first)
            for k, v in (("nodes_featureids", 0), ("nodes_splits", 0.0), ("nodes_modes", 0),
                         ("nodes_truenodeids", leaf_a), ("nodes_trueleafs", 1), ("nodes_falsenodeids", leaf_b),
                         ("nodes_falseleafs", 1), ("nodes_missing_value_tracks_true", 0)):
                out[k].append(v)
            out["tree_roots"].append(idx)
        else:
            out["tree_roots"].append(add_node(root, first))
    attrs = {
        "nodes_featureids": out["nodes_featureids"],
        "nodes_splits": onh.from_array(np.array(out["nodes_splits"], np.float32), "nodes_splits"),
        "nodes_modes": onh.from_array(np.array(out["nodes_modes"], np.uint8), "nodes_modes"),
        "nodes_truenodeids": out["nodes_truenodeids"], "nodes_trueleafs": out["nodes_trueleafs"],
        "nodes_falsenodeids": out["nodes_falsenodeids"], "nodes_falseleafs": out["nodes_falseleafs"],
        "nodes_missing_value_tracks_true": out["nodes_missing_value_tracks_true"],
        "tree_roots": out["tree_roots"], "leaf_targetids": out["leaf_targetids"],
        "leaf_weights": onh.from_array(np.array(out["leaf_weights"], np.float32), "leaf_weights"),
        "n_targets": n_targets,
        "aggregate_function": AGG_NAMES.index(agg),
        "post_transform": POST_NAMES.index(pt),
    }
    if out["membership_values"]:
        attrs["membership_values"] = onh.from_array(np.array(out["membership_values"], np.float32), "membership_values")
    return attrs, n_targets


def te_walk(attrs, X):
    """Independent plain-Python evaluation of TreeEnsemble (opset 5)
    attributes, aggregate applied, post_transform ignored."""
    modes = onh.to_array(attrs["nodes_modes"])
    splits = onh.to_array(attrs["nodes_splits"])
    weights = onh.to_array(attrs["leaf_weights"])
    sets, cur = [], []
    if "membership_values" in attrs:
        for v in onh.to_array(attrs["membership_values"]):
            if np.isnan(v):
                sets.append(set(float(x) for x in cur))
                cur = []
            else:
                cur.append(v)
    member = {}
    for i, md in enumerate(modes):
        if md == 6:
            member[i] = sets[len(member)]
    miss = attrs.get("nodes_missing_value_tracks_true") or [0] * len(modes)
    nt = attrs["n_targets"]
    agg = AGG_NAMES[attrs["aggregate_function"]]
    out = np.zeros((len(X), nt))
    for r, x in enumerate(X):
        acc = [[] for _ in range(nt)]
        for root in attrs["tree_roots"]:
            i = root
            while True:
                v, s_, md = float(x[attrs["nodes_featureids"][i]]), float(splits[i]), int(modes[i])
                if math.isnan(v) and miss[i]:
                    go = True
                elif md == 6:
                    go = v in member[i]
                else:
                    go = [v <= s_, v < s_, v >= s_, v > s_, v == s_, v != s_][md]
                side = "true" if go else "false"
                nxt = attrs["nodes_%snodeids" % side][i]
                if attrs["nodes_%sleafs" % side][i]:
                    acc[attrs["leaf_targetids"][nxt]].append(float(weights[nxt]))
                    break
                i = nxt
        for t in range(nt):
            w = acc[t]
            if agg == "SUM":
                out[r, t] = sum(w)
            elif agg == "AVERAGE":
                out[r, t] = sum(w) / len(attrs["tree_roots"])
            elif agg == "MIN":
                out[r, t] = min(w) if w else 0.0
            else:
                out[r, t] = max(w) if w else 0.0
    return out


def te_model(attrs, n_targets, n_features):
    node = oh.make_node("TreeEnsemble", ["X"], ["Y"], domain=ML, **attrs)
    return hand_model([node], [tvi("X", TP.FLOAT, [None, n_features])], [tvi("Y", TP.FLOAT, [None, n_targets])],
                      ml_opset=5, onnx_opset=21)


def run1(model, feeds):
    return ort_session(model.SerializeToString()).run(None, feeds)


def check_close(a, b, what, tol=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.nanmax(np.abs(a - b) / (1.0 + np.abs(b)))
    if not (diff <= tol):
        raise SystemExit("equivalence check failed for %s: %g" % (what, diff))


# ---------------------------------------------------------------------------
# exporter-made models shared by both sets
# ---------------------------------------------------------------------------
def add_tree_clf(c, mid, est, seed, n_features, n_classes, *, source, nan=False, zipmap=True, labels=None,
                 bench=False, bench_group=None, n_train=1000):
    Xtr, ytr, Xte, _ = clf_data(seed, n_features, n_classes, n_train=n_train)
    if labels is not None:
        ytr = np.array(labels)[ytr]
    if nan:
        Xtr, Xte = add_nan(Xtr, seed + 1), add_nan(Xte, seed + 2)
    est.fit(Xtr, ytr)
    onx = skl(est, Xtr, zipmap=zipmap)
    c.add(mid, onx, {"X": Xte}, kind="classifier", source=source, bench=bench, bench_group=bench_group,
          native=(1, proba_of(est, Xte)))
    return est


def add_tree_reg(c, mid, est, seed, n_features, *, source, nan=False, n_targets=1):
    Xtr, ytr, Xte, _ = reg_data(seed, n_features, n_targets)
    if nan:
        Xtr, Xte = add_nan(Xtr, seed + 1), add_nan(Xte, seed + 2)
    est.fit(Xtr, ytr)
    onx = skl(est, Xtr)
    c.add(mid, onx, {"X": Xte}, kind="regressor", source=source,
          native=(0, est.predict(Xte).reshape(len(Xte), -1)))
    return est, onx, Xte


def add_lgbm(c, mid, est, seed, n_features, n_classes, *, source, zipmap=True, bench=False):
    if n_classes:
        Xtr, ytr, Xte, _ = clf_data(seed, n_features, n_classes, n_train=2000)
    else:
        Xtr, ytr, Xte, _ = reg_data(seed, n_features, n_train=2000)
    Xtr, Xte = add_nan(Xtr, seed + 1), add_nan(Xte, seed + 2)
    est.fit(Xtr, ytr)
    onx = mltools(onnxmltools.convert_lightgbm, est, n_features, zipmap=zipmap)
    native = (1, proba_of(est, Xte)) if n_classes else (0, est.predict(Xte).reshape(-1, 1))
    c.add(mid, onx, {"input": Xte}, kind="classifier" if n_classes else "regressor", source=source,
          bench=bench, bench_group="lightgbm" if bench else None, native=native)


def add_xgb(c, mid, est, seed, n_features, n_classes, *, source, bench=False):
    if n_classes:
        Xtr, ytr, Xte, _ = clf_data(seed, n_features, n_classes, n_train=2000)
    else:
        Xtr, ytr, Xte, _ = reg_data(seed, n_features, n_train=2000)
    Xtr, Xte = add_nan(Xtr, seed + 1), add_nan(Xte, seed + 2)
    est.fit(Xtr, ytr)
    onx = mltools(onnxmltools.convert_xgboost, est, n_features)
    native = (1, proba_of(est, Xte)) if n_classes else (0, est.predict(Xte).reshape(-1, 1))
    c.add(mid, onx, {"input": Xte}, kind="classifier" if n_classes else "regressor", source=source,
          bench=bench, bench_group="xgboost" if bench else None, native=native)


def frame_data(seed, n_train=800, n_test=ROWS, colors=("red", "green", "blue"), unseen_color="purple"):
    rng = np.random.RandomState(seed)
    n = n_train + n_test
    df = pd.DataFrame({
        "color": rng.choice(list(colors), n),
        "size": rng.normal(10, 3, n).astype(np.float32),
        "weight": rng.gamma(2.0, 2.0, n).astype(np.float32),
        "count": rng.randint(0, 5, n).astype(np.int64),
    })
    score = (df["size"] - 10) / 3 + (df["color"] == colors[0]) * 1.2 - (df["count"] - 2) * 0.4 + rng.normal(0, 0.5, n)
    # missing numeric cells + unseen categories in the scored rows
    for col in ("size", "weight"):
        df.loc[rng.rand(n) < 0.1, col] = np.nan
    te = df.iloc[n_train:].copy()
    te.loc[te.index[::17], "color"] = unseen_color
    te.loc[te.index[5::23], "count"] = 7
    return df.iloc[:n_train], score.iloc[:n_train].values, te, score.iloc[n_train:].values


def frame_feeds(df):
    """One [N,1] array per DataFrame column, typed like skl2onnx's inputs."""
    feeds = {}
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_float_dtype(s.dtype):
            v = s.to_numpy(np.float32)
        elif pd.api.types.is_integer_dtype(s.dtype):
            v = s.to_numpy(np.int64)
        else:
            v = np.array([str(x) for x in s], dtype=object)
        feeds[col] = v.reshape(-1, 1)
    return feeds


# ---------------------------------------------------------------------------
# dev set
# ---------------------------------------------------------------------------
def build_dev(c):
    S = 1000  # seed base of the dev set

    # ---------------- realistic exporter outputs: trees
    add_tree_clf(c, "rf_clf_100x10_bench", ensemble.RandomForestClassifier(100, max_depth=10, random_state=S, n_jobs=1),
                 S + 1, 20, 3, n_train=2000, bench=True, bench_group="rf",
                 source="sklearn RandomForestClassifier n_estimators=100 max_depth=10, 20 features, 3 classes; skl2onnx, ZipMap on")
    add_tree_reg(c, "rf_reg", ensemble.RandomForestRegressor(30, max_depth=8, random_state=S, n_jobs=1), S + 2, 10,
                 source="sklearn RandomForestRegressor n_estimators=30 max_depth=8, 10 features; skl2onnx")
    add_tree_clf(c, "et_clf_str_labels", ensemble.ExtraTreesClassifier(25, max_depth=7, random_state=S), S + 3, 8, 3,
                 labels=["bird", "cat", "dog"],
                 source="sklearn ExtraTreesClassifier n_estimators=25 max_depth=7, string labels; skl2onnx, ZipMap on")
    add_tree_clf(c, "gb_clf_binary", ensemble.GradientBoostingClassifier(n_estimators=50, max_depth=3, random_state=S),
                 S + 4, 10, 2, source="sklearn GradientBoostingClassifier binary n_estimators=50 max_depth=3; skl2onnx, ZipMap on")
    add_tree_clf(c, "gb_clf_multi_bench", ensemble.GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=S),
                 S + 5, 20, 3, bench=True, bench_group="gb",
                 source="sklearn GradientBoostingClassifier 3 classes n_estimators=100 max_depth=3, 20 features; skl2onnx, ZipMap on")
    add_tree_reg(c, "gb_reg", ensemble.GradientBoostingRegressor(n_estimators=60, max_depth=4, learning_rate=0.1, random_state=S),
                 S + 6, 8, source="sklearn GradientBoostingRegressor n_estimators=60 max_depth=4; skl2onnx")
    add_tree_clf(c, "hgb_clf_multi_nan_nozipmap", ensemble.HistGradientBoostingClassifier(max_iter=40, max_depth=5, random_state=S),
                 S + 7, 8, 3, nan=True, zipmap=False,
                 source="sklearn HistGradientBoostingClassifier 3 classes max_iter=40 max_depth=5, 10% NaN; skl2onnx zipmap=False")
    _, hgb_reg_onx, hgb_reg_X = add_tree_reg(
        c, "hgb_reg_nan", ensemble.HistGradientBoostingRegressor(max_iter=40, max_depth=5, random_state=S), S + 8, 8,
        nan=True, source="sklearn HistGradientBoostingRegressor max_iter=40 max_depth=5, 10% NaN; skl2onnx")

    add_lgbm(c, "lgbm_clf_binary", lightgbm.LGBMClassifier(n_estimators=50, num_leaves=15, random_state=S, n_jobs=1,
                                                           deterministic=True, verbose=-1), S + 9, 10, 2,
             source="LightGBM LGBMClassifier binary n_estimators=50 num_leaves=15, 10% NaN; onnxmltools, ZipMap on")
    add_lgbm(c, "lgbm_clf_multi_bench", lightgbm.LGBMClassifier(n_estimators=100, num_leaves=31, random_state=S, n_jobs=1,
                                                                deterministic=True, verbose=-1), S + 10, 20, 3, bench=True,
             source="LightGBM LGBMClassifier 3 classes n_estimators=100 num_leaves=31, 20 features, 10% NaN; onnxmltools, ZipMap on")
    add_lgbm(c, "lgbm_reg", lightgbm.LGBMRegressor(n_estimators=60, num_leaves=31, random_state=S, n_jobs=1,
                                                   deterministic=True, verbose=-1), S + 11, 10, 0,
             source="LightGBM LGBMRegressor n_estimators=60 num_leaves=31, 10% NaN; onnxmltools")
    add_xgb(c, "xgb_clf_binary", xgboost.XGBClassifier(n_estimators=50, max_depth=4, random_state=S, n_jobs=1), S + 12, 10, 2,
            source="XGBoost XGBClassifier binary n_estimators=50 max_depth=4, 10% NaN; onnxmltools")
    add_xgb(c, "xgb_clf_multi_bench", xgboost.XGBClassifier(n_estimators=100, max_depth=6, random_state=S, n_jobs=1),
            S + 13, 20, 3, bench=True,
            source="XGBoost XGBClassifier 3 classes n_estimators=100 max_depth=6, 20 features, 10% NaN; onnxmltools")
    add_xgb(c, "xgb_reg", xgboost.XGBRegressor(n_estimators=60, max_depth=5, random_state=S, n_jobs=1), S + 14, 10, 0,
            source="XGBoost XGBRegressor n_estimators=60 max_depth=5, 10% NaN; onnxmltools")

    # ---------------- linear / mlp / svm
    Xtr, ytr, Xte, _ = clf_data(S + 20, 20, 3)
    lr = linear_model.LogisticRegression(max_iter=1000).fit(Xtr, ytr)
    c.add("logreg_multi_bench", skl(lr, Xtr), {"X": Xte}, kind="classifier", bench=True, bench_group="linear",
          native=(1, proba_of(lr, Xte)),
          source="sklearn LogisticRegression 3 classes (multinomial), 20 features; skl2onnx, ZipMap on")
    Xtr, ytr, Xte, _ = clf_data(S + 21, 8, 2)
    lr = linear_model.LogisticRegression().fit(Xtr, ytr)
    c.add("logreg_binary_nozipmap", skl(lr, Xtr, zipmap=False), {"X": Xte}, kind="classifier",
          native=(1, proba_of(lr, Xte)), source="sklearn LogisticRegression binary, 8 features; skl2onnx zipmap=False")
    Xtr, ytr, Xte, _ = clf_data(S + 22, 6, 4)
    lsvc = svm.LinearSVC(random_state=S).fit(Xtr, ytr)
    c.add("linear_svc_multi", skl(lsvc, Xtr), {"X": Xte}, kind="classifier",
          source="sklearn LinearSVC 4 classes, 6 features; skl2onnx")
    Xtr, ytr, Xte, _ = reg_data(S + 23, 7, n_targets=3)
    lin = linear_model.LinearRegression().fit(Xtr, ytr)
    c.add("linreg_multi_target", skl(lin, Xtr), {"X": Xte}, kind="regressor", native=(0, lin.predict(Xte)),
          source="sklearn LinearRegression 3 targets, 7 features; skl2onnx")
    Xtr, ytr, Xte, _ = clf_data(S + 24, 20, 3)
    mlp = neural_network.MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=300, random_state=S).fit(Xtr, ytr)
    c.add("mlp_clf_bench", skl(mlp, Xtr), {"X": Xte}, kind="classifier", bench=True, bench_group="mlp",
          native=(1, proba_of(mlp, Xte)),
          source="sklearn MLPClassifier hidden=(64,32) relu, 3 classes, 20 features; skl2onnx, ZipMap on")

    Xtr, ytr, Xte, _ = clf_data(S + 25, 6, 3, n_train=400)
    for k in ("linear", "poly", "rbf", "sigmoid"):
        m = svm.SVC(kernel=k, probability=True, random_state=S, gamma="scale", coef0=0.5 if k != "rbf" else 0.0,
                    degree=3).fit(Xtr, ytr)
        c.add("svc_%s_prob" % k, skl(m, Xtr), {"X": Xte}, kind="classifier", native=(1, proba_of(m, Xte)),
              source="sklearn SVC kernel=%s probability=True, 3 classes; skl2onnx (prob_a/prob_b)" % k)
    m = svm.SVC(kernel="rbf", random_state=S).fit(Xtr, ytr)
    c.add("svc_rbf_noprob", skl(m, Xtr), {"X": Xte}, kind="classifier",
          source="sklearn SVC kernel=rbf probability=False (ovr decision), 3 classes; skl2onnx")
    Xtr2, ytr2, Xte2, _ = clf_data(S + 26, 5, 2, n_train=300)
    m = svm.SVC(kernel="rbf", probability=True, random_state=S).fit(Xtr2, np.array(["no", "yes"])[ytr2])
    c.add("svc_binary_str_prob", skl(m, Xtr2), {"X": Xte2}, kind="classifier", native=(1, proba_of(m, Xte2)),
          source="sklearn SVC rbf probability=True binary, string labels; skl2onnx")
    Xtr, ytr, Xte, _ = reg_data(S + 27, 5, n_train=400)
    for k in ("linear", "poly", "rbf", "sigmoid"):
        m = svm.SVR(kernel=k, C=2.0, coef0=0.3 if k != "rbf" else 0.0, gamma="scale").fit(Xtr, ytr)
        c.add("svr_%s" % k, skl(m, Xtr), {"X": Xte}, kind="regressor", native=(0, m.predict(Xte).reshape(-1, 1)),
              source="sklearn SVR kernel=%s; skl2onnx" % k)
    m = svm.OneClassSVM(nu=0.1, gamma="scale").fit(Xtr)
    onx = skl(m, Xtr)
    c.add("one_class_svm", onx, {"X": Xte}, kind="classifier",
          source="sklearn OneClassSVM rbf nu=0.1; skl2onnx (SVMRegressor computing the decision function, then Sign)")
    # skl2onnx does not use the one_class attribute; hand-edit the same SVMRegressor to set it
    svr_node = onnx.NodeProto()
    svr_node.CopyFrom(find_node(onx, "SVMRegressor"))
    svr_node.ClearField("output")
    svr_node.output.append("variable")
    for a in svr_node.attribute:
        if a.name == "one_class":
            svr_node.attribute.remove(a)
            break
    svr_node.attribute.append(oh.make_attribute("one_class", 1))
    oc = hand_model([svr_node], [tvi("X", TP.FLOAT, [None, Xte.shape[1]])], [tvi("variable", TP.FLOAT, [None, 1])],
                    ml_opset=1)
    c.add("svm_regressor_one_class_attr", oc, {"X": Xte}, kind="regressor",
          source="the SVMRegressor of one_class_svm hand-edited to one_class=1 (output is +1/-1)")

    # ---------------- preprocessing
    Xtr, ytr, Xte, _ = clf_data(S + 30, 6, 2)
    Xtr_n, Xte_n = add_nan(Xtr, S + 31), add_nan(Xte, S + 32)
    for norm in ("l1", "l2", "max"):
        m = preprocessing.Normalizer(norm=norm).fit(Xtr)
        c.add("normalizer_%s" % norm, skl(m, Xtr), {"X": Xte}, kind="transformer", native=(0, m.transform(Xte)),
              source="sklearn Normalizer norm=%s; skl2onnx" % norm)
    m = preprocessing.Binarizer(threshold=0.25).fit(Xtr)
    c.add("binarizer", skl(m, Xtr), {"X": Xte}, kind="transformer", native=(0, m.transform(Xte)),
          source="sklearn Binarizer threshold=0.25; skl2onnx")
    m = preprocessing.StandardScaler().fit(Xtr)
    c.add("standard_scaler", skl(m, Xtr), {"X": Xte}, kind="transformer", native=(0, m.transform(Xte)),
          source="sklearn StandardScaler; skl2onnx")
    m = preprocessing.MinMaxScaler().fit(Xtr)
    c.add("minmax_scaler", skl(m, Xtr), {"X": Xte}, kind="transformer", native=(0, m.transform(Xte)),
          source="sklearn MinMaxScaler; skl2onnx")
    m = impute.SimpleImputer(strategy="median").fit(Xtr_n)
    c.add("simple_imputer_nan", skl(m, Xtr_n), {"X": Xte_n}, kind="transformer", native=(0, m.transform(Xte_n)),
          source="sklearn SimpleImputer strategy=median, 10% NaN; skl2onnx")
    rng = np.random.RandomState(S + 33)
    cats = rng.choice(["low", "mid", "high", "max"], (600, 2)).astype(object)
    te = rng.choice(["low", "mid", "high", "max", "unknown"], (ROWS, 2)).astype(object)
    m = preprocessing.OneHotEncoder(handle_unknown="ignore").fit(cats)
    c.add("onehot_strings", skl(m, initial_types=[("X", StringTensorType([None, 2]))]), {"X": te},
          kind="transformer", feature_names=["level_a", "level_b"], native=(0, m.transform(te).toarray()),
          source="sklearn OneHotEncoder handle_unknown=ignore on 2 string columns; skl2onnx")
    icats = rng.randint(0, 4, (600, 3)).astype(np.int64)
    ite = rng.randint(0, 6, (ROWS, 3)).astype(np.int64)
    m = preprocessing.OneHotEncoder(handle_unknown="ignore").fit(icats)
    c.add("onehot_int64", skl(m, initial_types=[("X", Int64TensorType([None, 3]))]), {"X": ite},
          kind="transformer", native=(0, m.transform(ite).toarray()),
          source="sklearn OneHotEncoder handle_unknown=ignore on 3 int64 columns (unseen values 4,5); skl2onnx")
    le = preprocessing.LabelEncoder().fit(["apple", "banana", "cherry", "date"])
    c.add("sklearn_label_encoder", skl(le, initial_types=[("fruit", StringTensorType([None]))]),
          {"fruit": rng.choice(["apple", "banana", "cherry", "date"], ROWS).astype(object)}, kind="transformer",
          source="sklearn LabelEncoder (strings -> int64); skl2onnx (LabelEncoder opset 2)")

    # ---------------- pipelines
    Xtr, ytr, Xte, _ = clf_data(S + 40, 10, 3)
    Xtr, Xte = add_nan(Xtr, S + 41), add_nan(Xte, S + 42)
    p = Pipeline([("impute", impute.SimpleImputer()), ("scale", preprocessing.StandardScaler()),
                  ("rf", ensemble.RandomForestClassifier(15, max_depth=6, random_state=S))]).fit(Xtr, ytr)
    c.add("pipe_impute_scale_rf", skl(p, Xtr), {"X": Xte}, kind="classifier", native=(1, proba_of(p, Xte)),
          source="sklearn Pipeline(SimpleImputer, StandardScaler, RandomForestClassifier 15x6), 10% NaN; skl2onnx")
    dtr, ytr_s, dte, _ = frame_data(S + 43)
    ct = ColumnTransformer([
        ("cat", preprocessing.OneHotEncoder(handle_unknown="ignore"), ["color", "count"]),
        ("num", make_pipeline(impute.SimpleImputer(), preprocessing.StandardScaler()), ["size", "weight"])])
    p = Pipeline([("ct", ct), ("lr", linear_model.LogisticRegression())]).fit(dtr, ytr_s > 0)
    c.add("df_columntransformer_logreg", skl(p, dtr), frame_feeds(dte), kind="classifier",
          native=(1, proba_of(p, dte)),
          source="sklearn Pipeline(ColumnTransformer(OneHotEncoder[color:str,count:int64], "
                 "SimpleImputer+StandardScaler[size,weight]), LogisticRegression) from a pandas DataFrame "
                 "(one input per column); skl2onnx")
    ct = ColumnTransformer([("cat", preprocessing.OrdinalEncoder(), ["color"]),
                            ("num", impute.SimpleImputer(strategy="median"), ["size", "weight"])])
    cols = ["color", "size", "weight"]
    dtr2 = dtr[cols]
    dte2 = dte[cols].copy()
    dte2["color"] = dte2["color"].replace("purple", "red")  # OrdinalEncoder has no handle_unknown in ONNX
    p = Pipeline([("ct", ct), ("gb", ensemble.GradientBoostingRegressor(n_estimators=30, max_depth=3, random_state=S))]).fit(dtr2, ytr_s)
    c.add("df_ordinal_gbr", skl(p, dtr2), frame_feeds(dte2), kind="regressor",
          native=(0, p.predict(dte2).reshape(-1, 1)),
          source="sklearn Pipeline(ColumnTransformer(OrdinalEncoder[color:str], SimpleImputer[size,weight]), "
                 "GradientBoostingRegressor 30x3) from a pandas DataFrame; skl2onnx (string column -> LabelEncoder)")

    # ---------------- hand-built / hand-edited tree ensembles
    build_hand_trees(c, S + 100)
    # TreeEnsemble (opset 5) converted from the exported HistGradientBoostingRegressor above
    ter = find_node(hgb_reg_onx, "TreeEnsembleRegressor")
    attrs, nt = te_from_ter(ter)
    te = te_model(attrs, nt, hgb_reg_X.shape[1])
    check_close(run1(te, {"X": hgb_reg_X})[0], run1(hgb_reg_onx, {"X": hgb_reg_X})[0], "te_from_hgb_reg")
    c.add("te_from_hgb_reg_sum", te, {"X": hgb_reg_X}, kind="regressor",
          source="ai.onnx.ml TreeEnsemble (opset 5) converted from the TreeEnsembleRegressor of hgb_reg_nan "
                 "(base value folded into tree 0), missing tracks true, SUM/NONE")
    build_hand_te(c, S + 200)

    # ---------------- hand-built linear models
    build_hand_linear(c, S + 300)

    # ---------------- hand-built preprocessing graphs
    build_hand_label_encoders(c, S + 400)
    build_hand_castmap(c, S + 500)
    build_hand_misc(c, S + 600)


def leaf_fn(n_targets, lo=-1.0, hi=1.0, dense=False, p=0.6, single=False):
    def f(rng, t):
        if single:
            return [(t % n_targets, rng.uniform(lo, hi))]
        ws = [(k, rng.uniform(lo, hi)) for k in range(n_targets) if dense or rng.rand() < p]
        return ws
    return f


def build_hand_trees(c, seed):
    """TreeEnsembleClassifier / TreeEnsembleRegressor variants no exporter emits."""
    X = int_feature_data(seed, ROWS, nan_frac=0.1)
    nf = X.shape[1]
    feeds = {"X": X}
    src = "hand-built random trees (integer-valued features so thresholds are hit exactly, all branch modes, 10% NaN)"

    # -- regressor: every aggregate function and post_transform
    trees = random_trees(seed + 1, 6, 4, leaf=leaf_fn(2), missing_p=0.4)
    c.add("ter_sum_none_2t", ter_model(trees, 2, nf, "SUM", "NONE", base_values=[0.5, -0.25]), feeds,
          kind="regressor", source=src + "; TreeEnsembleRegressor 2 targets SUM NONE base_values")
    # (2 targets: onnxruntime ignores LOGISTIC/SOFTMAX/SOFTMAX_ZERO for a single target)
    trees = random_trees(seed + 2, 5, 4, leaf=leaf_fn(2, dense=True))
    c.add("ter_average_logistic_2t", ter_model(trees, 2, nf, "AVERAGE", "LOGISTIC"), feeds,
          kind="regressor", source=src + "; TreeEnsembleRegressor 2 targets AVERAGE LOGISTIC")
    trees = random_trees(seed + 3, 5, 4, leaf=leaf_fn(3, p=0.7))
    c.add("ter_min_softmax_3t", ter_model(trees, 3, nf, "MIN", "SOFTMAX"), feeds,
          kind="regressor", source=src + "; TreeEnsembleRegressor 3 targets MIN SOFTMAX (sparse leaf weights)")
    trees = random_trees(seed + 4, 5, 4, leaf=leaf_fn(3, lo=0.0, p=0.4))
    c.add("ter_max_softmax_zero_3t", ter_model(trees, 3, nf, "MAX", "SOFTMAX_ZERO"), feeds,
          kind="regressor", source=src + "; TreeEnsembleRegressor 3 targets MAX SOFTMAX_ZERO (sparse leaves, zero scores)")
    trees = random_trees(seed + 5, 5, 4, leaf=leaf_fn(3, lo=0.0, p=0.4))
    c.add("ter_sum_softmax_zero_3t", ter_model(trees, 3, nf, "SUM", "SOFTMAX_ZERO"), feeds,
          kind="regressor", source=src + "; TreeEnsembleRegressor 3 targets SUM SOFTMAX_ZERO (sparse leaves, zero scores)")
    trees = random_trees(seed + 6, 6, 4, leaf=leaf_fn(1, lo=0.05, hi=0.95, dense=True))
    c.add("ter_average_probit", ter_model(trees, 1, nf, "AVERAGE", "PROBIT"), feeds,
          kind="regressor", source=src + "; TreeEnsembleRegressor single target AVERAGE PROBIT (scores in (0,1))")

    # -- realistic tree hand-edited: BRANCH_LEQ -> BRANCH_GT with swapped children (equivalent)
    Xtr, ytr, Xte, _ = reg_data(seed + 7, 6)
    gb = ensemble.GradientBoostingRegressor(n_estimators=20, max_depth=3, random_state=0).fit(Xtr, ytr)
    onx = skl(gb, Xtr)
    node = find_node(onx, "TreeEnsembleRegressor")
    modes = [a for a in node.attribute if a.name == "nodes_modes"][0]
    tn = [a for a in node.attribute if a.name == "nodes_truenodeids"][0]
    fn = [a for a in node.attribute if a.name == "nodes_falsenodeids"][0]
    k = 0
    for i, m in enumerate(modes.strings):
        if m == b"BRANCH_LEQ":
            if k % 2 == 0:
                modes.strings[i] = b"BRANCH_GT"
                tn.ints[i], fn.ints[i] = fn.ints[i], tn.ints[i]
            k += 1
    orig = skl(gb, Xtr)
    check_close(run1(onx, {"X": Xte})[0], run1(orig, {"X": Xte})[0], "gb edited to BRANCH_GT")
    c.add("ter_gb_edited_gt", onx, {"X": Xte}, kind="regressor",
          source="sklearn GradientBoostingRegressor 20x3 via skl2onnx, hand-edited: every other BRANCH_LEQ node "
                 "turned into BRANCH_GT with swapped children (same predictions)")

    # -- classifier variants
    labels3 = ["setosa", "versicolor", "virginica"]
    trees = random_trees(seed + 10, 6, 4, leaf=leaf_fn(3, p=0.7))
    c.add("tec_multi_softmax_str", tec_model(trees, labels3, nf, "SOFTMAX", base_values=[0.1, 0.0, -0.1]), feeds,
          kind="classifier", source=src + "; TreeEnsembleClassifier 3 string classes SOFTMAX base_values")
    trees = random_trees(seed + 11, 6, 4, leaf=leaf_fn(4, lo=0.0, p=0.35))
    c.add("tec_multi_softmax_zero_int", tec_model(trees, [10, 20, 30, 40], nf, "SOFTMAX_ZERO"), feeds,
          kind="classifier", source=src + "; TreeEnsembleClassifier 4 int64 classes SOFTMAX_ZERO (sparse leaves)")
    trees = random_trees(seed + 12, 5, 4, leaf=leaf_fn(3))
    c.add("tec_multi_logistic_zipmap", tec_model(trees, [0, 1, 2], nf, "LOGISTIC", zipmap=True), feeds,
          kind="classifier", source=src + "; TreeEnsembleClassifier 3 classes LOGISTIC + ZipMap")
    trees = random_trees(seed + 13, 5, 4, leaf=leaf_fn(3))
    c.add("tec_multi_none", tec_model(trees, [0, 1, 2], nf, "NONE"), feeds,
          kind="classifier", source=src + "; TreeEnsembleClassifier 3 classes NONE")
    trees = random_trees(seed + 14, 4, 3, leaf=leaf_fn(3, lo=0.02, hi=0.24, dense=True))
    c.add("tec_multi_probit", tec_model(trees, [0, 1, 2], nf, "PROBIT"), feeds,
          kind="classifier", source=src + "; TreeEnsembleClassifier 3 classes PROBIT (scores in (0,1))")
    trees = random_trees(seed + 15, 6, 4, leaf=leaf_fn(2, dense=True))
    c.add("tec_binary_2base_none", tec_model(trees, [0, 1], nf, "NONE", base_values=[0.2, -0.2]), feeds,
          kind="classifier", source=src + "; TreeEnsembleClassifier binary, weights for both classes, 2 base_values, NONE")
    trees = random_trees(seed + 16, 6, 4, leaf=lambda r, t: [(1, r.uniform(-1, 1))])
    c.add("tec_binary_1base_logistic_str", tec_model(trees, ["neg", "pos"], nf, "LOGISTIC", base_values=[-0.3]), feeds,
          kind="classifier", source=src + "; TreeEnsembleClassifier binary string labels, weights for class id 1 only, 1 base_value, LOGISTIC")
    trees = random_trees(seed + 17, 6, 4, leaf=lambda r, t: [(0, r.uniform(-1, 1))])
    c.add("tec_binary_1base_none_zipmap", tec_model(trees, [0, 1], nf, "NONE", base_values=[0.1], zipmap=True), feeds,
          kind="classifier", source=src + "; TreeEnsembleClassifier binary, weights for class id 0 only, 1 base_value, NONE + ZipMap")
    trees = random_trees(seed + 18, 6, 4, leaf=leaf_fn(2, dense=True))
    c.add("tec_binary_2base_softmax", tec_model(trees, [0, 1], nf, "SOFTMAX", base_values=[0.0, 0.3]), feeds,
          kind="classifier", source=src + "; TreeEnsembleClassifier binary, weights for both classes, 2 base_values, SOFTMAX")


def build_hand_te(c, seed):
    """TreeEnsemble (ai.onnx.ml opset 5) built by converting hand-built
    TreeEnsembleRegressor attributes; checked against the TER first, then
    some BRANCH_EQ nodes get turned into BRANCH_MEMBER sets."""
    X = int_feature_data(seed, ROWS, nan_frac=0.1)
    nf = X.shape[1]
    feeds = {"X": X}
    rng = np.random.RandomState(seed)
    modes = BRANCH_MODES + ["BRANCH_EQ", "BRANCH_EQ"]  # more EQ nodes to turn into MEMBER nodes
    # Only NONE / SOFTMAX_ZERO / PROBIT: onnxruntime 1.32 swaps the opset-5
    # codes 1 (SOFTMAX) and 2 (LOGISTIC) -- see README.md.
    configs = [
        ("te_member_average_none_2t", 2, "AVERAGE", "NONE", leaf_fn(2, single=True)),
        ("te_member_min_probit", 1, "MIN", "PROBIT", leaf_fn(1, lo=0.05, hi=0.95, single=True)),
        ("te_member_max_softmax_zero_3t", 3, "MAX", "SOFTMAX_ZERO", leaf_fn(3, lo=0.0, single=True)),
        ("te_member_sum_softmax_zero_2t", 2, "SUM", "SOFTMAX_ZERO", leaf_fn(2, lo=-0.5, single=True)),
    ]
    for k, (mid, nt, agg, pt, lf) in enumerate(configs):
        trees = random_trees(seed + 10 + k, 3 * nt + 3, 4, modes=modes, leaf=lf, missing_p=0.4)
        ter = ter_model(trees, nt, nf, agg, pt)
        tnode = find_node(ter, "TreeEnsembleRegressor")
        attrs, _ = te_from_ter(tnode)
        te = te_model(attrs, nt, nf)
        check_close(run1(te, feeds)[0], run1(ter, feeds)[0], mid + " (before MEMBER)")
        membership = {}
        for t, nodes in enumerate(trees):
            for i, n in enumerate(nodes):
                if n["mode"] == "BRANCH_EQ" and n["feature"] < 4:
                    extra = sorted(set(rng.choice([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 2.5], rng.randint(1, 4))) - {n["value"]})
                    membership[(t, i)] = [n["value"]] + [float(v) for v in extra]
        assert membership
        attrs, _ = te_from_ter(tnode, membership=membership)
        # independent check of the BRANCH_MEMBER model (post_transform off)
        plain = dict(attrs, post_transform=0)
        check_close(run1(te_model(plain, nt, nf), feeds)[0], te_walk(plain, X), mid + " (python walk)")
        c.add(mid, te_model(attrs, nt, nf), feeds, kind="regressor",
              source="hand-built TreeEnsemble (opset 5) converted from TreeEnsembleRegressor attributes; "
                     "%d targets %s %s, BRANCH_MEMBER sets, all other modes, missing tracks true, 10%% NaN" % (nt, agg, pt))


def build_hand_linear(c, seed):
    rng = np.random.RandomState(seed)
    nf = 5
    X = rng.normal(0, 1, (ROWS, nf)).astype(np.float32)
    X[::10] = 0.0  # rows with exactly zero scores (SOFTMAX_ZERO)
    Xu = rng.uniform(0, 1, (ROWS, nf)).astype(np.float32)  # PROBIT needs scores in (0, 1)
    Xu[::10] = 0.0
    xin = [tvi("X", TP.FLOAT, [None, nf])]

    def lc(mid, n_classes, labels, post, rows=None, coef_scale=1.0, intercept=None, feeds=None, zero_class=False):
        rows = rows or n_classes
        coef = (rng.normal(0, 1, (rows, nf)) * coef_scale).astype(np.float32)
        if zero_class:
            coef[-1] = 0.0
        inter = (rng.normal(0, 0.5, rows) if intercept is None else np.full(rows, intercept)).astype(np.float32)
        if zero_class:
            inter[-1] = 0.0
        kw = dict(coefficients=[float(v) for v in coef.ravel()], intercepts=[float(v) for v in inter],
                  post_transform=post, multi_class=0)
        strings = isinstance(labels[0], str)
        if strings:
            kw["classlabels_strings"] = list(labels)
        else:
            kw["classlabels_ints"] = [int(v) for v in labels]
        node = oh.make_node("LinearClassifier", ["X"], ["label", "probabilities"], domain=ML, **kw)
        m = hand_model([node], xin, [tvi("label", TP.STRING if strings else TP.INT64, [None]),
                                     tvi("probabilities", TP.FLOAT, [None, len(labels)])],
                       ml_opset=1)
        c.add(mid, m, {"X": X if feeds is None else feeds}, kind="classifier",
              source="hand-built LinearClassifier %d coefficient row(s), %d classes (%s labels), post_transform=%s"
                     % (rows, len(labels), "string" if strings else "int64", post))

    lc("linclf_multi_none_str", 3, ["a", "b", "c"], "NONE")
    lc("linclf_multi_softmax_zero", 4, [1, 2, 3, 4], "SOFTMAX_ZERO", zero_class=True)
    lc("linclf_multi_logistic", 3, [5, 6, 7], "LOGISTIC")
    lc("linclf_multi_softmax_str", 3, ["x", "y", "z"], "SOFTMAX")
    # PROBIT: positive coefficients summing below 1 keep raw scores inside (0, 1)
    coef = rng.uniform(0.02, 0.15, (3, nf)).astype(np.float32)
    node = oh.make_node("LinearClassifier", ["X"], ["label", "probabilities"], domain=ML,
                        coefficients=[float(v) for v in coef.ravel()], intercepts=[0.05, 0.1, 0.15],
                        classlabels_ints=[0, 1, 2], post_transform="PROBIT")
    c.add("linclf_multi_probit", hand_model([node], xin, [tvi("label", TP.INT64, [None]),
                                                           tvi("probabilities", TP.FLOAT, [None, 3])], ml_opset=1),
          {"X": Xu}, kind="classifier",
          source="hand-built LinearClassifier 3 classes int64 labels, post_transform=PROBIT (scores kept in (0,1))")
    lc("linclf_binary_1row_none", 2, [3, 7], "NONE", rows=1)
    lc("linclf_binary_1row_logistic_str", 2, ["no", "yes"], "LOGISTIC", rows=1)
    lc("linclf_binary_2row_softmax", 2, [0, 1], "SOFTMAX", rows=2)

    def lreg(mid, targets, post, feeds, lo=None, hi=None):
        if lo is None:
            coef = rng.normal(0, 1, (targets, nf)).astype(np.float32)
            inter = rng.normal(0, 0.5, targets).astype(np.float32)
        else:
            coef = rng.uniform(lo, hi, (targets, nf)).astype(np.float32)
            inter = np.full(targets, 0.05, np.float32)
        node = oh.make_node("LinearRegressor", ["X"], ["variable"], domain=ML,
                            coefficients=[float(v) for v in coef.ravel()], intercepts=[float(v) for v in inter],
                            targets=targets, post_transform=post)
        m = hand_model([node], xin, [tvi("variable", TP.FLOAT, [None, targets])], ml_opset=1)
        c.add(mid, m, {"X": feeds}, kind="regressor",
              source="hand-built LinearRegressor %d target(s), post_transform=%s" % (targets, post))

    lreg("linreg_single_none", 1, "NONE", X)
    lreg("linreg_multi_softmax", 3, "SOFTMAX", X)
    lreg("linreg_multi_logistic", 2, "LOGISTIC", X)
    lreg("linreg_multi_softmax_zero", 3, "SOFTMAX_ZERO", X)
    lreg("linreg_single_probit", 1, "PROBIT", Xu, lo=0.02, hi=0.15)


def build_hand_label_encoders(c, seed):
    """One graph per LabelEncoder form, one input/output per key->value type pair."""
    rng = np.random.RandomState(seed)
    skeys = ["alpha", "beta", "gamma", "delta", "epsilon"]
    ikeys = [-3, 0, 7, 42, 1000000]
    fkeys = [-1.5, 0.0, 0.25, 3.0, 1e6]
    svals = ["A", "B", "C", "D", "E"]
    ivals = [10, 20, 30, -40, 50]
    fvals = [0.5, -2.25, 3.75, 100.0, -0.125]
    unseen = {"string": ["zeta", "ALPHA", "alpha_"], "int64": [1, -1, 99], "float": [0.5, -3.0, 2.0]}
    keys = {"string": skeys, "int64": ikeys, "float": fkeys}
    vals = {"string": svals, "int64": ivals, "float": fvals}
    np_t = {"string": object, "int64": np.int64, "float": np.float32}
    onnx_t = {"string": TP.STRING, "int64": TP.INT64, "float": TP.FLOAT}
    defaults = {"string": "__unknown__", "int64": -99, "float": -7.5}
    short = {"string": "s", "int64": "i", "float": "f"}

    def column(kt, n):
        pool = keys[kt]
        out = []
        for _ in range(n):
            if rng.rand() < 0.2:
                out.append(unseen[kt][rng.randint(len(unseen[kt]))])
            else:
                out.append(pool[rng.randint(len(pool))])
        return np.array(out, dtype=np_t[kt])

    for form in ("v2", "v4"):
        nodes, ins, outs, feeds = [], [], [], {}
        for k, combo in enumerate(LE_COMBOS):
            kt, vt = combo.split("->")
            name = "%s2%s" % (short[kt], short[vt])
            shape = [None] if form == "v2" else [None, 1]
            col = column(kt, ROWS)
            feeds[name] = col if form == "v2" else col.reshape(-1, 1)
            ins.append(tvi(name, onnx_t[kt], shape))
            outs.append(tvi(name + "_out", onnx_t[vt], shape))
            if form == "v2":
                kw = {"keys_%ss" % kt: keys[kt], "values_%ss" % vt: vals[vt]}
                if k % 2 == 0:  # explicit default on every other pair, spec default on the rest
                    kw["default_%s" % vt] = defaults[vt]
            else:
                kw = {"keys_tensor": onh.from_array(np.array(keys[kt], dtype=np_t[kt]), "keys"),
                      "values_tensor": onh.from_array(np.array(vals[vt], dtype=np_t[vt]), "values")}
                if k % 2 == 0:
                    kw["default_tensor"] = onh.from_array(np.array([defaults[vt]], dtype=np_t[vt]), "default")
            nodes.append(oh.make_node("LabelEncoder", [name], [name + "_out"], domain=ML, name="le_" + name, **kw))
        ml = 2 if form == "v2" else 4
        m = hand_model(nodes, ins, outs, ml_opset=ml, onnx_opset=17 if form == "v2" else 21)
        c.add("label_encoder_%s" % ("opset2_attrs" if form == "v2" else "opset4_tensors"), m, feeds,
              kind="transformer",
              source="hand-built LabelEncoder ai.onnx.ml opset %d (%s), pairs %s; ~20%% unseen keys hit the default "
                     "(explicit default on every other pair)" % (ml, "keys_*/values_* attributes" if form == "v2"
                                                                 else "keys_tensor/values_tensor/default_tensor",
                                                                 ", ".join(LE_COMBOS)))


def build_hand_castmap(c, seed):
    rng = np.random.RandomState(seed)
    min_ = oh.make_value_info("features", oh.make_map_type_proto(TP.INT64, oh.make_tensor_type_proto(TP.FLOAT, None)))

    def val():
        v = float(np.float32(rng.choice([rng.normal(0, 3), rng.uniform(-5, 5), float(rng.randint(-4, 5))])))
        return v

    def rows_fixed(keys):
        out = []
        for _ in range(ROWS):
            ks = list(keys)
            rng.shuffle(ks)
            out.append({int(k): val() for k in ks})
        return out

    def rows_sparse(max_map, min_n=1):
        out = []
        for _ in range(ROWS):
            n = rng.randint(min_n, max_map + 1)
            ks = rng.choice(max_map, n, replace=False)
            out.append({int(k): val() for k in ks})
        return out

    configs = [
        ("castmap_dense_to_float", "DENSE", "TO_FLOAT", None, rows_fixed(range(6))),
        ("castmap_dense_to_int64", "DENSE", "TO_INT64", None, rows_fixed([0, 2, 5, 9])),
        ("castmap_dense_to_string", "DENSE", "TO_STRING", None, rows_fixed(range(4))),
        ("castmap_sparse_to_float", "SPARSE", "TO_FLOAT", 8, rows_sparse(8)),
        ("castmap_sparse_to_int64", "SPARSE", "TO_INT64", 6, rows_sparse(6)),
    ]
    for mid, form, cast, max_map, rows in configs:
        et = {"TO_FLOAT": TP.FLOAT, "TO_INT64": TP.INT64, "TO_STRING": TP.STRING}[cast]
        kw = dict(map_form=form, cast_to=cast)
        if max_map:
            kw["max_map"] = max_map
        m = hand_model([oh.make_node("CastMap", ["features"], ["Y"], domain=ML, **kw)], [min_],
                       [tvi("Y", et, [1, max_map if max_map else None])], ml_opset=1)
        c.add(mid, m, map_rows=("features", rows), kind="transformer",
              source="hand-built CastMap map(int64,float) map_form=%s cast_to=%s%s; one map per row (a CastMap "
                     "input is a single map, so each row is one run)" % (form, cast, " max_map=%d" % max_map if max_map else ""))


def build_hand_misc(c, seed):
    rng = np.random.RandomState(seed)
    # ArrayFeatureExtractor on floats (constant indices, repeated) and on a string label table
    X = rng.normal(0, 1, (ROWS, 6)).astype(np.float32)
    idx = onh.from_array(np.array([4, 0, 4], np.int64), "idx")
    classes = onh.from_array(np.array(["lo", "mid", "hi"], dtype=object), "classes")
    nodes = [
        oh.make_node("ArrayFeatureExtractor", ["X", "idx"], ["picked"], domain=ML),
        oh.make_node("ArgMax", ["picked"], ["am"], axis=1, keepdims=0),
        oh.make_node("ArrayFeatureExtractor", ["classes", "am"], ["label_2d"], domain=ML),  # -> [1, N]
        oh.make_node("Reshape", ["label_2d", "flat"], ["label"]),
    ]
    m = hand_model(nodes, [tvi("X", TP.FLOAT, [None, 6])],
                   [tvi("picked", TP.FLOAT, [None, 3]), tvi("label", TP.STRING, [None])], ml_opset=1,
                   initializers=[idx, classes, onh.from_array(np.array([-1], np.int64), "flat")])
    c.add("array_feature_extractor", m, {"X": X}, kind="transformer",
          source="hand-built ArrayFeatureExtractor: X[:, [4,0,4]] then a string label table indexed by ArgMax")
    # FeatureVectorizer (its variadic inputs must share one type): one over two
    # float inputs, one over two int64 inputs, concatenated, then a Scaler
    a = rng.normal(0, 2, (ROWS, 1)).astype(np.float32)
    b = rng.randint(-5, 100, (ROWS, 1)).astype(np.int64)
    e = rng.uniform(0, 1, (ROWS, 1)).astype(np.float32)
    d = rng.randint(0, 3, (ROWS, 1)).astype(np.int64)
    nodes = [
        oh.make_node("FeatureVectorizer", ["a", "e"], ["vec_f"], domain=ML, inputdimensions=[1, 1]),
        oh.make_node("FeatureVectorizer", ["b", "d"], ["vec_i"], domain=ML, inputdimensions=[1, 1]),
        oh.make_node("Concat", ["vec_f", "vec_i"], ["vec"], axis=1),
        oh.make_node("Scaler", ["vec"], ["scaled"], domain=ML, offset=[0.5, 0.0, 10.0, 1.0], scale=[2.0, 3.0, 0.1, -1.0]),
    ]
    m = hand_model(nodes, [tvi("a", TP.FLOAT, [None, 1]), tvi("b", TP.INT64, [None, 1]),
                           tvi("e", TP.FLOAT, [None, 1]), tvi("d", TP.INT64, [None, 1])],
                   [tvi("vec", TP.FLOAT, [None, 4]), tvi("scaled", TP.FLOAT, [None, 4])], ml_opset=1)
    c.add("feature_vectorizer_scaler", m, {"a": a, "b": b, "e": e, "d": d}, kind="transformer",
          source="hand-built FeatureVectorizer over (float a, float e) and over (int64 b, int64 d), "
                 "inputdimensions=[1,1], Concat, then Scaler; multi-input")
    # Imputer with a replaced value that is not NaN (per-feature values), then an
    # Imputer for NaN with a single broadcast value, then Binarizer (onnxruntime's
    # Binarizer rejects NaN input, so NaN must be gone before it)
    Xi = rng.randint(-1, 4, (ROWS, 4)).astype(np.float32)
    Xi[rng.rand(ROWS, 4) < 0.1] = np.nan
    nodes = [
        oh.make_node("Imputer", ["X"], ["imp1"], domain=ML, imputed_value_floats=[9.0, 8.0, 7.0, 6.0],
                     replaced_value_float=-1.0),
        oh.make_node("Imputer", ["imp1"], ["imputed"], domain=ML, imputed_value_floats=[0.5],
                     replaced_value_float=float("nan")),
        oh.make_node("Binarizer", ["imputed"], ["bin"], domain=ML, threshold=2.0),
    ]
    m = hand_model(nodes, [tvi("X", TP.FLOAT, [None, 4])],
                   [tvi("imputed", TP.FLOAT, [None, 4]), tvi("bin", TP.FLOAT, [None, 4])], ml_opset=1)
    c.add("imputer_chain_binarizer", m, {"X": Xi}, kind="transformer",
          source="hand-built Imputer(replaced_value_float=-1, per-feature values) -> Imputer(NaN, one broadcast "
                 "value 0.5) -> Binarizer threshold=2; 10% NaN")


# ---------------------------------------------------------------------------
# unseen set: same export paths, different seeds / shapes / hyperparameters
# ---------------------------------------------------------------------------
def build_unseen(c):
    S = 7000
    add_tree_clf(c, "rf_clf_5class_str", ensemble.RandomForestClassifier(40, max_depth=6, random_state=S, n_jobs=1),
                 S + 1, 12, 5, labels=["a1", "b2", "c3", "d4", "e5"],
                 source="sklearn RandomForestClassifier n_estimators=40 max_depth=6, 12 features, 5 string classes; skl2onnx ZipMap on")
    _, et_onx, et_X = add_tree_reg(c, "et_reg", ensemble.ExtraTreesRegressor(30, max_depth=7, random_state=S), S + 2, 9,
                                   source="sklearn ExtraTreesRegressor n_estimators=30 max_depth=7, 9 features; skl2onnx")
    attrs, nt = te_from_ter(find_node(et_onx, "TreeEnsembleRegressor"))
    te = te_model(attrs, nt, et_X.shape[1])
    check_close(run1(te, {"X": et_X})[0], run1(et_onx, {"X": et_X})[0], "te_from_et_reg")
    c.add("te_from_et_reg", te, {"X": et_X}, kind="regressor",
          source="ai.onnx.ml TreeEnsemble (opset 5) converted from the TreeEnsembleRegressor of et_reg")
    add_tree_clf(c, "gb_clf_binary_lr03", ensemble.GradientBoostingClassifier(n_estimators=30, max_depth=4, learning_rate=0.3,
                                                                               random_state=S),
                 S + 3, 15, 2, zipmap=False,
                 source="sklearn GradientBoostingClassifier binary n_estimators=30 max_depth=4 lr=0.3, 15 features; skl2onnx zipmap=False")
    add_tree_clf(c, "hgb_clf_binary_nan", ensemble.HistGradientBoostingClassifier(max_iter=25, max_depth=4, learning_rate=0.2,
                                                                                  random_state=S),
                 S + 4, 7, 2, nan=True,
                 source="sklearn HistGradientBoostingClassifier binary max_iter=25 max_depth=4, 10% NaN; skl2onnx ZipMap on")
    add_tree_reg(c, "gb_reg_multi_depth6", ensemble.GradientBoostingRegressor(n_estimators=25, max_depth=6, learning_rate=0.2,
                                                                             random_state=S),
                 S + 5, 11, source="sklearn GradientBoostingRegressor n_estimators=25 max_depth=6 lr=0.2; skl2onnx")
    add_lgbm(c, "lgbm_clf_5class_nozipmap", lightgbm.LGBMClassifier(n_estimators=30, num_leaves=15, learning_rate=0.2,
                                                                     random_state=S, n_jobs=1, deterministic=True, verbose=-1),
             S + 6, 9, 5, zipmap=False,
             source="LightGBM LGBMClassifier 5 classes n_estimators=30 num_leaves=15 lr=0.2, 10% NaN; onnxmltools zipmap=False")
    add_lgbm(c, "lgbm_reg_deep", lightgbm.LGBMRegressor(n_estimators=40, num_leaves=63, min_child_samples=5, random_state=S,
                                                        n_jobs=1, deterministic=True, verbose=-1), S + 7, 7, 0,
             source="LightGBM LGBMRegressor n_estimators=40 num_leaves=63, 7 features, 10% NaN; onnxmltools")
    add_xgb(c, "xgb_clf_4class", xgboost.XGBClassifier(n_estimators=40, max_depth=4, learning_rate=0.2, random_state=S,
                                                       n_jobs=1), S + 8, 13, 4,
            source="XGBoost XGBClassifier 4 classes n_estimators=40 max_depth=4 lr=0.2, 10% NaN; onnxmltools")
    add_xgb(c, "xgb_reg_depth8", xgboost.XGBRegressor(n_estimators=30, max_depth=8, learning_rate=0.15, random_state=S,
                                                      n_jobs=1), S + 9, 6, 0,
            source="XGBoost XGBRegressor n_estimators=30 max_depth=8, 10% NaN; onnxmltools")
    Xtr, ytr, Xte, _ = clf_data(S + 10, 12, 2)
    m = linear_model.LogisticRegression(C=0.5).fit(Xtr, np.array(["ham", "spam"])[ytr])
    c.add("logreg_binary_str", skl(m, Xtr), {"X": Xte}, kind="classifier", native=(1, proba_of(m, Xte)),
          source="sklearn LogisticRegression binary C=0.5, string labels, 12 features; skl2onnx ZipMap on")
    Xtr, ytr, Xte, _ = clf_data(S + 11, 9, 4)
    m = neural_network.MLPClassifier(hidden_layer_sizes=(16,), activation="tanh", max_iter=400, random_state=S).fit(Xtr, np.array(["n", "e", "s", "w"])[ytr])
    c.add("mlp_clf_tanh_str", skl(m, Xtr), {"X": Xte}, kind="classifier", native=(1, proba_of(m, Xte)),
          source="sklearn MLPClassifier hidden=(16,) tanh, 4 string classes; skl2onnx ZipMap on")
    Xtr, ytr, Xte, _ = reg_data(S + 12, 6)
    m = neural_network.MLPRegressor(hidden_layer_sizes=(32, 16), max_iter=400, random_state=S).fit(Xtr, ytr)
    c.add("mlp_reg", skl(m, Xtr), {"X": Xte}, kind="regressor", native=(0, m.predict(Xte).reshape(-1, 1)),
          source="sklearn MLPRegressor hidden=(32,16); skl2onnx")
    Xtr, ytr, Xte, _ = clf_data(S + 13, 4, 2, n_train=300)
    m = svm.SVC(kernel="poly", degree=2, C=3.0, random_state=S).fit(Xtr, ytr)
    c.add("svc_poly_binary_noprob", skl(m, Xtr), {"X": Xte}, kind="classifier",
          source="sklearn SVC kernel=poly degree=2 binary probability=False; skl2onnx")
    Xtr, ytr, Xte, _ = clf_data(S + 14, 7, 4, n_train=400)
    m = svm.SVC(kernel="rbf", gamma=0.3, probability=True, random_state=S).fit(Xtr, ytr)
    c.add("svc_rbf_4class_prob", skl(m, Xtr), {"X": Xte}, kind="classifier", native=(1, proba_of(m, Xte)),
          source="sklearn SVC rbf gamma=0.3 probability=True 4 classes; skl2onnx")
    Xtr, ytr, Xte, _ = reg_data(S + 15, 4, n_train=300)
    m = svm.SVR(kernel="rbf", gamma=0.5, C=5.0, epsilon=0.05).fit(Xtr, ytr)
    c.add("svr_rbf_gamma05", skl(m, Xtr), {"X": Xte}, kind="regressor", native=(0, m.predict(Xte).reshape(-1, 1)),
          source="sklearn SVR rbf gamma=0.5 C=5; skl2onnx")
    Xtr, ytr, Xte, _ = clf_data(S + 16, 8, 3)
    Xtr, Xte = add_nan(Xtr, S + 17), add_nan(Xte, S + 18)
    p = Pipeline([("impute", impute.SimpleImputer(strategy="most_frequent")), ("scale", preprocessing.MinMaxScaler()),
                  ("gb", ensemble.GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=S))]).fit(Xtr, ytr)
    c.add("pipe_impute_minmax_gb", skl(p, Xtr), {"X": Xte}, kind="classifier", native=(1, proba_of(p, Xte)),
          source="sklearn Pipeline(SimpleImputer most_frequent, MinMaxScaler, GradientBoostingClassifier 20x3), 10% NaN; skl2onnx")
    Xtr, ytr, Xte, _ = clf_data(S + 30, 6, 2)
    m = svm.LinearSVC(C=0.3, random_state=S).fit(Xtr, np.array(["left", "right"])[ytr])
    c.add("linear_svc_binary_str", skl(m, Xtr), {"X": Xte}, kind="classifier",
          source="sklearn LinearSVC binary C=0.3, string labels; skl2onnx")
    Xtr, ytr, Xte, _ = clf_data(S + 31, 10, 4)
    p = Pipeline([("scale", preprocessing.StandardScaler()), ("norm", preprocessing.Normalizer(norm="l2")),
                  ("lr", linear_model.LogisticRegression(C=2.0, max_iter=500))]).fit(Xtr, ytr)
    c.add("pipe_scale_l2norm_logreg_nozipmap", skl(p, Xtr, zipmap=False), {"X": Xte}, kind="classifier",
          native=(1, proba_of(p, Xte)),
          source="sklearn Pipeline(StandardScaler, Normalizer l2, LogisticRegression 4 classes); skl2onnx zipmap=False")
    dtr, ytr_s, dte, _ = frame_data(S + 32, colors=("gold", "silver", "bronze"), unseen_color="gold")
    cols = ["color", "size", "weight"]
    ct = ColumnTransformer([("cat", preprocessing.OrdinalEncoder(), ["color"]), ("num", "passthrough", ["size", "weight"])])
    p = Pipeline([("ct", ct), ("hgb", ensemble.HistGradientBoostingRegressor(max_iter=30, max_depth=4, random_state=S))]).fit(
        dtr[cols], ytr_s)
    c.add("df_ordinal_passthrough_hgb_reg", skl(p, dtr[cols]), frame_feeds(dte[cols]), kind="regressor",
          native=(0, p.predict(dte[cols]).reshape(-1, 1)),
          source="sklearn Pipeline(ColumnTransformer(OrdinalEncoder[color:str], passthrough[size,weight] with NaN), "
                 "HistGradientBoostingRegressor 30x4) from a pandas DataFrame; skl2onnx")
    dtr, ytr_s, dte, _ = frame_data(S + 19, colors=("north", "south", "east", "west"), unseen_color="up")
    ct = ColumnTransformer([
        ("cat", preprocessing.OneHotEncoder(handle_unknown="ignore"), ["color"]),
        ("num", make_pipeline(impute.SimpleImputer(strategy="median"), preprocessing.StandardScaler()), ["size", "weight", "count"])])
    p = Pipeline([("ct", ct), ("rf", ensemble.RandomForestClassifier(20, max_depth=5, random_state=S))]).fit(
        dtr, np.digitize(ytr_s, [-0.5, 0.5]))
    c.add("df_columntransformer_rf", skl(p, dtr), frame_feeds(dte), kind="classifier", native=(1, proba_of(p, dte)),
          source="sklearn Pipeline(ColumnTransformer(OneHotEncoder[color:str], SimpleImputer+StandardScaler"
                 "[size,weight,count]), RandomForestClassifier 20x5, 3 classes) from a pandas DataFrame; skl2onnx")
    X = int_feature_data(S + 20, ROWS, n_int=5, n_cont=3, nan_frac=0.1)
    trees = random_trees(S + 21, 8, 5, n_int=5, n_cont=3, leaf=leaf_fn(4, p=0.6))
    c.add("tec_random_4class_softmax", tec_model(trees, [2, 4, 6, 8], X.shape[1], "SOFTMAX", zipmap=True), {"X": X},
          kind="classifier",
          source="hand-built random TreeEnsembleClassifier 8 trees depth<=5, all branch modes, 4 int64 classes SOFTMAX + ZipMap, 10% NaN")


# ---------------------------------------------------------------------------
# re-read what was written and check it reproduces expected.jsonl exactly
# ---------------------------------------------------------------------------
READ_TYPES = {"float": np.float32, "double": np.float64, "int64": np.int64, "int32": np.int32, "string": object}


def read_feeds(model_dir, meta):
    """Feeds from input.csv following the documented rules, or a list of
    per-row feeds from input.jsonl."""
    jl = os.path.join(model_dir, "input.jsonl")
    if os.path.exists(jl):
        name = meta["inputs"][0]["name"]
        with open(jl) as f:
            return [{name: {int(k): float(v) for k, v in json.loads(line)[name].items()}} for line in f]
    with open(os.path.join(model_dir, "input.csv"), newline="") as f:
        rows = list(csv.reader(f))
    header, cols = rows[0], list(zip(*rows[1:]))

    def parse(cells, t):
        if t is object:
            return np.array(cells, dtype=object)
        if t in (np.float32, np.float64):
            return np.array([float(c) if c != "" else np.nan for c in cells], dtype=t)
        return np.array([int(c) for c in cells], dtype=t)

    ins = meta["inputs"]
    if len(ins) == 1 and ins[0]["shape"] is not None and len(ins[0]["shape"]) == 2:
        assert header == meta["feature_names"]
        t = READ_TYPES[ins[0]["elem_type"]]
        return {ins[0]["name"]: np.stack([parse(c, t) for c in cols], axis=1)}
    assert header == [i["name"] for i in ins]
    feeds = {}
    for i, c in zip(ins, cols):
        a = parse(c, READ_TYPES[i["elem_type"]])
        feeds[i["name"]] = a.reshape(-1, 1) if i["shape"] is not None and len(i["shape"]) == 2 else a
    return feeds


def verify_set(set_dir):
    with open(os.path.join(set_dir, "index.json")) as f:
        ids = json.load(f)["models"]
    for mid in ids:
        d = os.path.join(set_dir, mid)
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
        sess = ort_session(open(os.path.join(d, "model.onnx"), "rb").read())
        names = [o["name"] for o in meta["outputs"]]
        feeds = read_feeds(d, meta)
        lines = []
        runs = feeds if isinstance(feeds, list) else [feeds]
        for fd in runs:
            res = sess.run(names, fd)
            n = 1 if isinstance(feeds, list) else meta["rows"]
            cols = [render_rows(v, n) for v in res]
            lines += [json.dumps({nm: cols[k][r] for k, nm in enumerate(names)}) for r in range(n)]
        with open(os.path.join(d, "expected.jsonl")) as f:
            want = f.read().splitlines()
        if lines != want or len(want) != meta["rows"]:
            raise SystemExit("verification failed: %s/%s does not reproduce expected.jsonl from its files"
                             % (os.path.basename(set_dir), mid))


# ---------------------------------------------------------------------------
# README tables (regenerated between markers from the meta.json files on disk)
# ---------------------------------------------------------------------------
BEGIN_MARK = "<!-- BEGIN GENERATED TABLES (generate.py rewrites this part) -->"
END_MARK = "<!-- END GENERATED TABLES -->"


def short_ops(ops):
    ml = [o.split(":")[1] for o in ops if o.startswith(ML + ":")]
    std = [o.split(":")[1] for o in ops if not o.startswith(ML + ":")]
    if not ml:
        return "(" + ", ".join(std) + ")"
    return ", ".join(ml) + ((" + " + ", ".join(std)) if std else "")


def update_readme(root):
    path = os.path.join(root, "README.md")
    if not os.path.exists(path):
        return
    parts = []
    for name in ("dev", "unseen"):
        idx = os.path.join(root, name, "index.json")
        if not os.path.exists(idx):
            continue
        with open(idx) as f:
            ids = json.load(f)["models"]
        metas = []
        for mid in ids:
            with open(os.path.join(root, name, mid, "meta.json")) as f:
                metas.append(json.load(f))
        size = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(os.path.join(root, name)) for fn in fns)
        parts.append("### Set `%s` (%d models, %.1f MB)\n" % (name, len(metas), size / 1e6))
        parts.append("| model id | kind | ops | source | bench | ORT vs onnx reference |")
        parts.append("|---|---|---|---|---|---|")
        for m in metas:
            ref = m["onnx_reference"]
            r = ref["status"]
            if r == "differs":
                r = "differs (%.3g%s)" % (ref["max_rel_diff"] if isinstance(ref["max_rel_diff"], float) else float("inf"),
                                          ", %d labels" % ref["differing_labels"] if ref["differing_labels"] else "")
            parts.append("| `%s` | %s | %s | %s | %s | %s |" % (
                m["id"], m["kind"], short_ops(m["ops"]), m["source"].replace("|", "/"),
                m["bench_group"] if m["bench"] else "", r))
        tags = sorted({t for m in metas for t in m["covers"]})
        ops = sorted({o for m in metas for o in m["ops"]})
        parts.append("")
        parts.append("Operators in `%s`: %s\n" % (name, ", ".join("`%s`" % o for o in ops)))
        parts.append("<details><summary>Operator variants covered by `%s` (%d)</summary>\n" % (name, len(tags)))
        parts.append(", ".join("`%s`" % t for t in tags))
        parts.append("\n</details>\n")
    with open(path) as f:
        text = f.read()
    if BEGIN_MARK not in text or END_MARK not in text:
        return
    head, rest = text.split(BEGIN_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    with open(path, "w") as f:
        f.write(head + BEGIN_MARK + "\n\n" + "\n".join(parts) + "\n" + END_MARK + tail)


# ---------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=["dev", "unseen", "both"], default="both")
    ap.add_argument("--out", default=HERE, help="corpus root (default: the folder of this script)")
    args = ap.parse_args()
    t0 = time.time()
    sets = ["dev", "unseen"] if args.set == "both" else [args.set]
    for name in sets:
        log("== set %s" % name)
        c = Corpus(name, args.out)
        if name == "dev":
            build_dev(c)
            missing = [t for t in REQUIRED_DEV if t not in c.tags]
            if missing:
                raise SystemExit("dev set does not cover: %s" % ", ".join(missing))
            if len(c.ids) < 24:
                raise SystemExit("dev set has only %d models" % len(c.ids))
        else:
            build_unseen(c)
            if len(c.ids) < 10:
                raise SystemExit("unseen set has only %d models" % len(c.ids))
        c.finish()
        verify_set(c.dir)
        log("== set %s: re-read input files reproduce every expected.jsonl" % name)
        log("== set %s: %d models, covers %d operator variants" % (name, len(c.ids), len(c.tags)))
    update_readme(args.out)
    log("done in %.1fs" % (time.time() - t0))


if __name__ == "__main__":
    main()
