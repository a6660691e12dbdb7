#!/usr/bin/env python3
"""Writes a ~1 MB ONNX model for the start-to-READY benchmark (agent/benches/serve.sh).

A scikit-learn RandomForestClassifier trained on the predictive-maintenance example's
holdout rows (deploy/examples/pdm/holdout.csv: the same 6 float features, label `failure`),
exported with skl2onnx like the example model: input `X` float [N, 6], outputs `label`
(int64 [N]) and `probabilities` (float [N, 2]), no ZipMap. Fixed seed: the same package
versions give the same file.

    python3 agent/benches/make_big_model.py --out big.onnx [--trees 180] [--max-depth 14]
"""

import argparse
import csv
import pathlib

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

PDM = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "examples" / "pdm"
FEATURES = ["air_temperature_k", "process_temperature_k", "rotational_speed_rpm",
            "torque_nm", "tool_wear_min", "vibration_rms_mm_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--trees", type=int, default=180)
    ap.add_argument("--max-depth", type=int, default=14)
    args = ap.parse_args()
    with open(PDM / "holdout.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    x = np.array([[float(r[c]) for c in FEATURES] for r in rows], dtype=np.float32)
    y = np.array([int(r["failure"]) for r in rows])
    rf = RandomForestClassifier(n_estimators=args.trees, max_depth=args.max_depth,
                                random_state=7, n_jobs=1).fit(x, y)
    onx = convert_sklearn(rf, initial_types=[("X", FloatTensorType([None, len(FEATURES)]))],
                          options={id(rf): {"zipmap": False}},
                          target_opset={"": 17, "ai.onnx.ml": 3}, name="pdm_big_rf")
    # skl2onnx may list the default domain twice; keep one entry per domain
    seen = {}
    for o in onx.opset_import:
        seen[o.domain] = max(seen.get(o.domain, 0), o.version)
    del onx.opset_import[:]
    for domain, version in seen.items():
        onx.opset_import.add(domain=domain, version=version)
    data = onx.SerializeToString()
    pathlib.Path(args.out).write_bytes(data)
    nodes = sum(t.tree_.node_count for t in rf.estimators_)
    print(f"{args.out}: {len(data)} bytes, {args.trees} trees, {nodes} nodes")


if __name__ == "__main__":
    main()
