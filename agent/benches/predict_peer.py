#!/usr/bin/env python3
"""Batch-scoring peer: the Python job a data scientist would write.

Reads a CSV with pandas (in chunks), scores it with onnxruntime
(single-threaded) in batches of 1000 rows, and writes one JSON line per row:
{"<output name>": value, ...}. A value is a number or string for outputs with
one element per row, a list for [N,K] outputs, and a dict for ZipMap outputs.
This is the same layout as the corpus expected.jsonl
(shared/tests/corpus/README.md).

    python3 agent/benches/predict_peer.py --model M.onnx --input rows.csv --output out.jsonl

CSV layout, as in the corpus: if the model has a single 2-D input [N, F], the
CSV columns (in order) are its features. Otherwise each column is named after
an ONNX input. Empty cells are missing values (NaN).
"""

import argparse
import json
import math
import sys
import time

import numpy as np
import pandas as pd
import onnxruntime as ort

NP_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32, "tensor(string)": object, "tensor(bool)": np.bool_}


def make_session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def column(series, np_type):
    if np_type is object:
        return series.astype(str).to_numpy(dtype=object)
    return series.to_numpy(dtype=np_type)


def build_feeds(chunk, inputs):
    if len(inputs) == 1 and len(inputs[0].shape) == 2:
        inp = inputs[0]
        t = NP_TYPES[inp.type]
        if t is object:
            return {inp.name: chunk.astype(str).to_numpy(dtype=object)}
        return {inp.name: chunk.to_numpy(dtype=t)}
    feeds = {}
    for inp in inputs:
        v = column(chunk[inp.name], NP_TYPES[inp.type])
        feeds[inp.name] = v.reshape(-1, 1) if len(inp.shape) == 2 else v
    return feeds


def clean(v):
    """JSON-safe float: NaN/inf become strings, as in the corpus."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return v


def per_row(value, n):
    if isinstance(value, list):  # ZipMap -> list of dicts
        return value
    arr = np.asarray(value).reshape(n, -1)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        rows = [[clean(x) for x in r] for r in arr.tolist()]
    else:
        rows = arr.tolist()
    if arr.shape[1] == 1:
        return [r[0] for r in rows]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args()

    t0 = time.perf_counter()
    sess = make_session(args.model)
    inputs = sess.get_inputs()
    for i in inputs:
        if i.type not in NP_TYPES:
            sys.exit("unsupported input %s of type %s (map inputs need one run per row)" % (i.name, i.type))
    out_names = [o.name for o in sess.get_outputs()]

    # string inputs must stay strings ("NA" is a category, not a missing value)
    string_cols = None
    if not (len(inputs) == 1 and len(inputs[0].shape) == 2):
        string_cols = {i.name: str for i in inputs if NP_TYPES[i.type] is object}
    elif NP_TYPES[inputs[0].type] is object:
        string_cols = str

    n_rows = 0
    t_score = 0.0
    with open(args.output, "w") as out:
        reader = pd.read_csv(args.input, chunksize=args.batch_size, dtype=string_cols,
                             keep_default_na=False, na_values=[""])
        for chunk in reader:
            feeds = build_feeds(chunk, inputs)
            ts = time.perf_counter()
            res = sess.run(out_names, feeds)
            t_score += time.perf_counter() - ts
            n = len(chunk)
            cols = [per_row(v, n) for v in res]
            lines = [json.dumps(dict(zip(out_names, vals))) for vals in zip(*cols)]
            out.write("\n".join(lines))
            out.write("\n")
            n_rows += n
    total = time.perf_counter() - t0
    print("scored %d rows in %.3fs (%.0f rows/s; sess.run %.3fs)" % (
        n_rows, total, n_rows / total if total else 0.0, t_score), file=sys.stderr)


if __name__ == "__main__":
    main()
