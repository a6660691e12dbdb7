#!/usr/bin/env python3
"""Predictive-maintenance example: synthetic sensor data, a model and its reference values.

Simulates machine sensor readings in the spirit of the AI4I 2020 predictive-maintenance
dataset (no download: every value comes from the rules below), trains a scikit-learn
StandardScaler + GradientBoostingClassifier pipeline, exports it to ONNX with skl2onnx and
writes, next to this file:

    reference.csv       2000 training-distribution rows, the 6 features (drift reference)
    holdout.csv         1500 unseen rows: the 6 features + failure + line
    model.onnx          the exported pipeline (input X float [N, 6]; outputs label, probabilities)
    mlflow-model/       the same model.onnx as an MLflow 2.x onnx-flavor model directory
    expected.json       onnxruntime / scikit-learn reference values for the Rust tests

    python3 deploy/examples/pdm/make_example.py
    python3 deploy/examples/pdm/make_example.py --check-engine /path/to/edge-agent

Everything is seeded: running it twice gives byte-identical files with the same package
versions (scikit-learn 1.9, skl2onnx 1.20, onnx 1.23, onnxruntime 1.32, numpy 2.4,
pandas 3.1). `--check-engine` additionally scores holdout.csv and reference.csv with
`edge-agent predict` and compares every row with onnxruntime (labels exact, probabilities
within 1e-5); it writes nothing into this folder.
"""

import os
import sys

if __name__ == "__main__" and os.environ.get("PYTHONHASHSEED") != "0":
    # exporters iterate over sets (e.g. the order of opset_import entries):
    # pin the hash seed so the files are byte-identical between runs
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import sklearn  # noqa: E402
import skl2onnx  # noqa: E402
import yaml  # noqa: E402
from skl2onnx import convert_sklearn  # noqa: E402
from skl2onnx.common.data_types import FloatTensorType  # noqa: E402
from sklearn import metrics  # noqa: E402
from sklearn.ensemble import GradientBoostingClassifier  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

SEED = 20200817
N_TRAIN = 8000
N_HOLDOUT = 1500
N_REFERENCE = 2000
REFERENCE_MISSING = 20  # 1 % of reference.csv's vibration cells are empty

# column name -> decimals written to the CSV files (the simulation rounds to these, so the
# model is trained on exactly the values the CSV files hold)
FEATURES = {
    "air_temperature_k": 1,
    "process_temperature_k": 1,
    "rotational_speed_rpm": 1,
    "torque_nm": 2,
    "tool_wear_min": 1,
    "vibration_rms_mm_s": 3,
}
FEATURE_NAMES = list(FEATURES)
LABEL = "failure"
GROUP = "line"

# Three machine lines with slightly different operating points:
#   A: the main line, nominal settings
#   B: heavier parts: more power at the spindle, lower speed, hence higher torque
#   C: the older line in the hotter hall: warmer air, weaker cooling (smaller process/air
#      temperature gap), worn bearings (higher baseline vibration)
LINES = {
    "A": dict(share=0.50, air_k=300.0, gap_k=10.0, power_w=6200.0, speed_rpm=1560.0, vib=1.45),
    "B": dict(share=0.30, air_k=300.5, gap_k=9.9, power_w=6800.0, speed_rpm=1470.0, vib=1.70),
    "C": dict(share=0.20, air_k=301.6, gap_k=9.2, power_w=6100.0, speed_rpm=1530.0, vib=2.20),
}

# failure rules (see README.md)
OSF_WEAR_TORQUE = 11500.0  # overstrain: tool wear [min] * torque [Nm] above this
HDF_GAP_K = 8.6  # heat dissipation: process - air temperature below this ...
HDF_SPEED_RPM = 1380.0  # ... while the spindle turns slower than this
PWF_MIN_W = 3500.0  # power failure: torque * angular speed outside [min, max]
PWF_MAX_W = 9000.0
VBF_RMS = 7.1  # vibration: ISO 10816 class II zone C/D boundary (mm/s RMS)
VBF_P = 0.85  # ... not every run above it fails inside the labelling window
TWF_FROM_MIN = 200.0  # tool wear failure: hazard grows from 200 min of tool wear
TWF_P_AT_END = 0.10
RNF_P = 0.003  # random failures, not explained by any sensor
MISSED_P = 0.04  # label noise: failures logged as routine maintenance
FALSE_ALARM_P = 0.004  # label noise: a healthy run logged as a failure

MODEL_PARAMS = dict(n_estimators=200, max_depth=3, learning_rate=0.1, subsample=0.8, random_state=7)
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}

# the MLflow model directory is written as mlflow.onnx.save_model / log_model (MLflow 2.22)
# writes it; fixed ids and time so the files do not change between runs
MLFLOW_VERSION = "2.22.0"
MLFLOW_PYTHON_VERSION = "3.11.7"
MLFLOW_RUN_ID = "5d1c7e0a9b3f4e6c8a2d71f0c4b9e853"
MLFLOW_MODEL_UUID = "a3f09c2e7b6d4d1f9e58c0b1d2e4f637"
MLFLOW_TIME_CREATED = "2025-06-02 07:41:18.204117"

ENGINE_TOLERANCE = 1e-5


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
def simulate(rng, n):
    """n rows of sensor readings, their line and the failure label (+ the failure modes)."""
    names = list(LINES)
    line = rng.choice(np.array(names), size=n, p=[LINES[k]["share"] for k in names])

    def par(key):
        return np.array([LINES[k][key] for k in line])

    air = par("air_k") + rng.normal(0.0, 1.8, n)
    process = air + par("gap_k") + rng.normal(0.0, 0.9, n)
    speed = par("speed_rpm") * np.exp(rng.normal(0.0, 0.10, n))
    # the drive delivers roughly constant power: torque falls as speed rises
    power = rng.normal(par("power_w"), 1150.0)
    torque = np.clip(power / (speed * 2.0 * np.pi / 60.0) + rng.normal(0.0, 1.2, n), 3.0, 85.0)
    # tools are replaced at about 4 hours of cutting; rows see every stage of a tool's life
    wear = rng.uniform(0.0, 246.0, n)
    # vibration grows with tool wear and speed; 2.5 % of runs have a bearing or imbalance defect
    defect = rng.random(n) < 0.025
    vibration = (
        par("vib") * np.exp(rng.normal(0.0, 0.22, n))
        + 0.0045 * wear
        + 0.0011 * np.maximum(speed - 1500.0, 0.0)
        + defect * rng.uniform(2.5, 6.5, n)
    )

    cols = {
        "air_temperature_k": air,
        "process_temperature_k": process,
        "rotational_speed_rpm": speed,
        "torque_nm": torque,
        "tool_wear_min": wear,
        "vibration_rms_mm_s": vibration,
    }
    df = pd.DataFrame({c: np.round(v, FEATURES[c]) for c, v in cols.items()})

    # the rules look at the recorded (rounded) values
    air, process, speed, torque, wear, vibration = (df[c].to_numpy() for c in FEATURE_NAMES)
    power_w = torque * speed * 2.0 * np.pi / 60.0
    u = rng.random((4, n))
    modes = {
        "tool_wear": (wear >= TWF_FROM_MIN)
        & (u[0] < TWF_P_AT_END * (wear - TWF_FROM_MIN) / (246.0 - TWF_FROM_MIN)),
        "overstrain": wear * torque > OSF_WEAR_TORQUE,
        "heat_dissipation": (process - air < HDF_GAP_K) & (speed < HDF_SPEED_RPM),
        "power": (power_w < PWF_MIN_W) | (power_w > PWF_MAX_W),
        "vibration": (vibration > VBF_RMS) & (u[1] < VBF_P),
        "random": u[2] < RNF_P,
    }
    failed = np.zeros(n, dtype=bool)
    for m in modes.values():
        failed |= m
    missed = failed & (u[3] < MISSED_P)
    false_alarm = ~failed & (rng.random(n) < FALSE_ALARM_P)
    df[LABEL] = ((failed & ~missed) | false_alarm).astype(np.int64)
    df[GROUP] = line.astype(object)
    modes["missed (label noise)"] = missed
    modes["false alarm (label noise)"] = false_alarm
    return df, modes


def fmt_cell(v, decimals):
    return "" if math.isnan(v) else f"{v:.{decimals}f}"


def write_csv(path, df, columns):
    lines = [",".join(columns)]
    kinds = [FEATURES.get(c) for c in columns]
    for row in zip(*(df[c].to_numpy() for c in columns)):
        cells = []
        for v, d in zip(row, kinds):
            cells.append(str(v) if d is None else fmt_cell(float(v), d))
        lines.append(",".join(cells))
    with open(path, "w", newline="\n") as f:
        f.write("\n".join(lines) + "\n")


def read_csv(path):
    return pd.read_csv(path, float_precision="round_trip", dtype={GROUP: str})


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------
def train(df):
    gbc = GradientBoostingClassifier(**MODEL_PARAMS)
    pipe = Pipeline([("scaler", StandardScaler()), ("gbc", gbc)])
    pipe.fit(df[FEATURE_NAMES].to_numpy(np.float64), df[LABEL].to_numpy())
    onx = convert_sklearn(
        pipe,
        initial_types=[("X", FloatTensorType([None, len(FEATURE_NAMES)]))],
        target_opset=TARGET_OPSET,
        options={id(gbc): {"zipmap": False}},
        name="pdm_failure_gbc",  # the graph name; skl2onnx would pick a random uuid
    )
    entry = onx.metadata_props.add()
    entry.key = "feature_names"
    entry.value = json.dumps(FEATURE_NAMES)
    onnx.checker.check_model(onx)
    return pipe, onx


def ort_session(model_bytes):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def ort_predict(sess, df):
    x = df[FEATURE_NAMES].to_numpy(np.float64).astype(np.float32)
    label, proba = sess.run(["label", "probabilities"], {"X": x})
    return np.asarray(label), np.asarray(proba)


def f32(v):
    """A float32 value as the shortest decimal that reads back to it (how the engine prints)."""
    return float(str(np.float32(v)))


# ---------------------------------------------------------------------------
# reference values
# ---------------------------------------------------------------------------
def rates(y, pred):
    pos, neg = y == 1, y == 0
    return {
        "count": int(len(y)),
        "positives": int(pos.sum()),
        "selection_rate": float(pred.mean()),
        "tpr": float(pred[pos].mean()),
        "fpr": float(pred[neg].mean()),
    }


def fairness(y, pred, groups):
    names = sorted(set(groups))
    per = {g: rates(y[groups == g], pred[groups == g]) for g in names}
    ref = max(names, key=lambda g: (per[g]["count"], g))
    diffs = {}
    for g in names:
        if g == ref:
            continue
        u, p = per[g], per[ref]
        diffs[g] = {
            "statistical_parity_difference": u["selection_rate"] - p["selection_rate"],
            "equal_opportunity_difference": u["tpr"] - p["tpr"],
            "average_odds_difference": 0.5 * ((u["fpr"] - p["fpr"]) + (u["tpr"] - p["tpr"])),
        }
    out = {
        "group_column": GROUP,
        "reference_group": ref,
        "groups": per,
        "differences_vs_reference": diffs,
    }
    worst = {}
    for metric in ("statistical_parity_difference", "equal_opportunity_difference", "average_odds_difference"):
        g = max(sorted(diffs), key=lambda k: abs(diffs[k][metric]))
        out[metric] = diffs[g][metric]
        worst[metric] = g
    out["worst_group"] = worst
    return out


def profile(df):
    out = {}
    n = len(df)
    for c in FEATURE_NAMES:
        v = df[c].to_numpy(np.float64)
        ok = v[~np.isnan(v)]
        out[c] = {
            "min": float(ok.min()),
            "max": float(ok.max()),
            "mean": float(ok.mean()),
            "std": float(ok.std(ddof=0)),
            "missing_rate": float((n - len(ok)) / n),
        }
    return out


# ---------------------------------------------------------------------------
# MLflow model directory
# ---------------------------------------------------------------------------
def write_mlflow_model(dirpath, model_bytes):
    if os.path.isdir(dirpath):
        shutil.rmtree(dirpath)
    os.makedirs(dirpath)
    with open(os.path.join(dirpath, "model.onnx"), "wb") as f:
        f.write(model_bytes)
    tensor = lambda dtype, shape, name=None: (  # noqa: E731
        ({"name": name} if name else {}) | {"type": "tensor", "tensor-spec": {"dtype": dtype, "shape": shape}}
    )
    mlmodel = {
        "artifact_path": "model",
        "flavors": {
            "onnx": {
                "code": None,
                "data": "model.onnx",
                "onnx_session_options": None,
                "onnx_version": onnx.__version__,
                "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
            },
            "python_function": {
                "data": "model.onnx",
                "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
                "loader_module": "mlflow.onnx",
                "python_version": MLFLOW_PYTHON_VERSION,
            },
        },
        "is_signature_from_type_hint": False,
        "mlflow_version": MLFLOW_VERSION,
        "model_size_bytes": len(model_bytes),
        "model_uuid": MLFLOW_MODEL_UUID,
        "prompts": None,
        "run_id": MLFLOW_RUN_ID,
        "signature": {
            "inputs": json.dumps([tensor("float32", [-1, len(FEATURE_NAMES)], "X")]),
            "outputs": json.dumps(
                [tensor("int64", [-1], "label"), tensor("float32", [-1, 2], "probabilities")]
            ),
            "params": None,
        },
        "type_hint_from_example": False,
        "utc_time_created": MLFLOW_TIME_CREATED,
    }
    # MLflow's Model.save: yaml.safe_dump(model.to_dict(), default_flow_style=False)
    with open(os.path.join(dirpath, "MLmodel"), "w") as f:
        yaml.safe_dump(mlmodel, stream=f, default_flow_style=False)
    reqs = [f"mlflow=={MLFLOW_VERSION}", f"onnx=={onnx.__version__}", f"onnxruntime=={ort.__version__}"]
    conda = {
        "channels": ["conda-forge"],
        "dependencies": [f"python={MLFLOW_PYTHON_VERSION}", "pip<=24.0", {"pip": reqs}],
        "name": "mlflow-env",
    }
    with open(os.path.join(dirpath, "conda.yaml"), "w") as f:
        yaml.safe_dump(conda, stream=f, default_flow_style=False)
    with open(os.path.join(dirpath, "python_env.yaml"), "w") as f:
        f.write(
            f"python: {MLFLOW_PYTHON_VERSION}\n"
            "build_dependencies:\n- pip==24.0\n- setuptools==69.5.1\n- wheel==0.43.0\n"
            "dependencies:\n- -r requirements.txt\n"
        )
    with open(os.path.join(dirpath, "requirements.txt"), "w") as f:
        f.write("\n".join(reqs))


# ---------------------------------------------------------------------------
# engine check
# ---------------------------------------------------------------------------
def check_engine(engine, model_path, sess):
    ok = True
    with tempfile.TemporaryDirectory(prefix="pdm-check-") as tmp:
        for name in ("holdout.csv", "reference.csv"):
            df = read_csv(os.path.join(HERE, name))
            inp = os.path.join(tmp, "features-" + name)
            write_csv(inp, df, FEATURE_NAMES)  # the 6 feature columns, header first
            res = subprocess.run(
                [engine, "predict", "--model", model_path, "--input", inp],
                capture_output=True,
                text=True,
            )
            if res.returncode != 0:
                print(f"engine check: {name}: exit {res.returncode}: {res.stderr.strip()}")
                ok = False
                continue
            rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
            label, proba = ort_predict(sess, df)
            if len(rows) != len(df):
                print(f"engine check: {name}: {len(rows)} output rows for {len(df)} input rows")
                ok = False
                continue
            e_label = np.array([r["label"] for r in rows], dtype=np.int64)
            e_proba = np.array([r["probabilities"] for r in rows], dtype=np.float64)
            label_mismatch = int((e_label != label).sum())
            delta = np.abs(e_proba - proba.astype(np.float64))
            max_delta = float(delta.max())
            bad = int((delta > ENGINE_TOLERANCE).any(axis=1).sum())
            missing = int(df[FEATURE_NAMES].isna().any(axis=1).sum())
            verdict = "OK" if label_mismatch == 0 and bad == 0 else "MISMATCH"
            print(
                f"engine check: {name}: {len(rows)} rows ({missing} with a missing value): "
                f"labels differ on {label_mismatch}, probabilities beyond {ENGINE_TOLERANCE:g} on {bad}, "
                f"max |engine - onnxruntime| = {max_delta:.3g}: {verdict}"
            )
            ok &= verdict == "OK"
    return ok


# ---------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--check-engine",
        metavar="PATH",
        help="an edge-agent binary: compare its `predict` output with onnxruntime on every row",
    )
    args = ap.parse_args()

    rng = np.random.default_rng(SEED)
    data, modes = simulate(rng, N_TRAIN + N_HOLDOUT)
    train_df = data.iloc[:N_TRAIN].reset_index(drop=True)
    holdout_df = data.iloc[N_TRAIN:].reset_index(drop=True)

    # reference.csv: a sample of the training rows, features only, a few vibration cells empty
    ref_idx = np.sort(rng.choice(N_TRAIN, size=N_REFERENCE, replace=False))
    reference_df = train_df.loc[ref_idx, FEATURE_NAMES].reset_index(drop=True)
    holes = rng.choice(N_REFERENCE, size=REFERENCE_MISSING, replace=False)
    reference_df.loc[holes, "vibration_rms_mm_s"] = np.nan

    write_csv(os.path.join(HERE, "reference.csv"), reference_df, FEATURE_NAMES)
    write_csv(os.path.join(HERE, "holdout.csv"), holdout_df, FEATURE_NAMES + [LABEL, GROUP])

    pipe, onx = train(train_df)
    model_bytes = onx.SerializeToString()
    model_path = os.path.join(HERE, "model.onnx")
    with open(model_path, "wb") as f:
        f.write(model_bytes)
    write_mlflow_model(os.path.join(HERE, "mlflow-model"), model_bytes)

    # reference values, from the files as written
    sess = ort_session(model_bytes)
    holdout = read_csv(os.path.join(HERE, "holdout.csv"))
    reference = read_csv(os.path.join(HERE, "reference.csv"))
    y = holdout[LABEL].to_numpy()
    label, proba = ort_predict(sess, holdout)
    p1 = proba[:, 1].astype(np.float64)
    skl_label = pipe.predict(holdout[FEATURE_NAMES].to_numpy(np.float64))

    expected = {
        "generated_by": "deploy/examples/pdm/make_example.py",
        "versions": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "pandas": pd.__version__,
            "scikit-learn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        "model": {
            "file": "model.onnx",
            "type": "Pipeline(StandardScaler, GradientBoostingClassifier)",
            "params": MODEL_PARAMS,
            "input": {"name": "X", "type": "float", "shape": [None, len(FEATURE_NAMES)]},
            "outputs": {"label": "int64 [N]", "probabilities": "float [N, 2]"},
            "feature_names": FEATURE_NAMES,
            "ops": sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in onx.graph.node}),
            "train_rows": N_TRAIN,
            "train_failure_rate": float(train_df[LABEL].mean()),
        },
        "holdout": {
            "file": "holdout.csv",
            "rows": int(len(holdout)),
            "label_column": LABEL,
            "group_column": GROUP,
            "positives": int(y.sum()),
            "positive_class": 1,
            "predictions_from": "onnxruntime (CPU, 1 thread) on model.onnx",
            "sklearn_label_agreement": float((skl_label == label).mean()),
            "metrics": {
                "accuracy": float(metrics.accuracy_score(y, label)),
                "precision": float(metrics.precision_score(y, label, pos_label=1)),
                "recall": float(metrics.recall_score(y, label, pos_label=1)),
                "f1": float(metrics.f1_score(y, label, pos_label=1)),
                "roc_auc": float(metrics.roc_auc_score(y, p1)),
                "log_loss": float(metrics.log_loss(y, p1)),
            },
            "confusion_matrix": {
                k: int(v)
                for k, v in zip(("tn", "fp", "fn", "tp"), metrics.confusion_matrix(y, label, labels=[0, 1]).ravel())
            },
            "fairness": fairness(y, label, holdout[GROUP].to_numpy().astype(str)),
            "first_rows": [
                {"label": int(label[i]), "probabilities": [f32(p) for p in proba[i]]} for i in range(5)
            ],
        },
        "reference": {
            "file": "reference.csv",
            "rows": int(len(reference)),
            "stats_note": "float64 over the CSV values, missing cells excluded; std is the population std (ddof=0)",
            "features": profile(reference),
        },
    }
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")

    m = expected["holdout"]["metrics"]
    fair = expected["holdout"]["fairness"]
    log(f"train: {N_TRAIN} rows, failure rate {expected['model']['train_failure_rate']:.4f}")
    log("failure modes (all rows): " + ", ".join(f"{k} {v.mean():.4f}" for k, v in modes.items()))
    log(f"holdout: {len(holdout)} rows, {int(y.sum())} failures; " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    log(
        "fairness by line (reference %s): " % fair["reference_group"]
        + ", ".join(f"{k} {fair[k]:+.4f} ({fair['worst_group'][k]})" for k in fair["worst_group"])
    )
    log(f"model.onnx: {len(model_bytes)} bytes")

    if args.check_engine:
        if not check_engine(args.check_engine, model_path, sess):
            sys.exit(1)


if __name__ == "__main__":
    main()
