"""Writes a deterministic ~50 MB ONNX model for the bundle verification benchmark: a
scikit-learn RandomForestRegressor (256 fully grown trees, ~1.3 M nodes, 20 float features)
exported with skl2onnx as one ai.onnx.ml TreeEnsembleRegressor.

Usage: python3 shared/benches/bundle/make_model.py OUT.onnx [--trees N] [--rows N]
(`shared/benches/bundle.sh` runs it once into target/bench-bundle/).
"""

import argparse
import os

import numpy as np
from sklearn.datasets import make_regression
from sklearn.ensemble import RandomForestRegressor
from skl2onnx import to_onnx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--trees", type=int, default=256)
    ap.add_argument("--rows", type=int, default=4000)
    args = ap.parse_args()

    x, y = make_regression(
        n_samples=args.rows, n_features=20, n_informative=12, noise=5.0, random_state=0
    )
    x = x.astype(np.float32)
    forest = RandomForestRegressor(n_estimators=args.trees, random_state=0, n_jobs=1)
    forest.fit(x, y)
    onx = to_onnx(forest, x[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    onx.producer_name = "bundle-bench"
    data = onx.SerializeToString()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, args.out)
    nodes = sum(e.tree_.node_count for e in forest.estimators_)
    print(f"{args.out}: {len(data)} bytes, {args.trees} trees, {nodes} nodes")


if __name__ == "__main__":
    main()
