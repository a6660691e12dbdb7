#!/usr/bin/env python3
"""The numpy peer of shared/examples/drift_bench.rs, on the same arrays.

    python3 shared/benches/drift_numpy.py DIR FEATURES ROWS [REPS]

Reads DIR/block.f64 (row-major f64, written by `drift_bench --dump DIR`) and
DIR/reference.json, and times, per feature column, over ROWS rows (cycling the block):
  hist: np.searchsorted(inner_edges, col, side="right") + np.bincount  (histogram only)
  full: hist + missing count + mean, std, min, max of the non-missing values
        (what DriftState::observe_row maintains)
Columns are made contiguous before timing (numpy's best case). Prints JSON with ns per
feature per row (best and median of REPS).
"""
import json
import sys
import time

import numpy as np


def main():
    d, features, rows = sys.argv[1], int(sys.argv[2]), int(float(sys.argv[3]))
    reps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    block = np.fromfile(f"{d}/block.f64", dtype="<f8").reshape(-1, features)
    ref = json.load(open(f"{d}/reference.json"))
    cols = [np.ascontiguousarray(block[:, j]) for j in range(features)]
    inner = [np.array(f["bin_edges"][1:-1]) for f in ref["features"]]
    bins = [len(f["bin_edges"]) - 1 for f in ref["features"]]
    n = len(block)
    passes = []
    done = 0
    while done < rows:
        passes.append(min(n, rows - done))
        done += passes[-1]

    def hist():
        for m in passes:
            for j in range(features):
                c = cols[j][:m]
                np.bincount(np.searchsorted(inner[j], c, side="right"), minlength=bins[j])

    def full():
        for m in passes:
            for j in range(features):
                c = cols[j][:m]
                np.bincount(np.searchsorted(inner[j], c, side="right"), minlength=bins[j])
                ok = ~np.isnan(c)
                v = c[ok]
                _ = (len(c) - len(v), v.mean(), v.std(), v.min(), v.max())

    out = {"features": features, "rows": rows, "reps": reps, "numpy": np.__version__}
    for name, fn in (("hist", hist), ("full", full)):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e9 / (rows * features))
        ts.sort()
        out[f"{name}_ns_per_feature_row_best"] = ts[0]
        out[f"{name}_ns_per_feature_row_median"] = ts[len(ts) // 2]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
