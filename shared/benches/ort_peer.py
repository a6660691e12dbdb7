#!/usr/bin/env python3
"""Peer benchmark: onnxruntime latency on the bench models of the corpus.

For every model in the corpus set whose meta.json has "bench": true, measure
onnxruntime through its Python API, single-threaded
(intra_op_num_threads=1, inter_op_num_threads=1, sequential execution):

  batch1_us     one sess.run per row, looping over the corpus rows; median over
                --reps repetitions of (loop time / rows), in microseconds
  batch1000_us  one sess.run on 1000 rows sampled (with a fixed seed) from the
                corpus rows; median over --reps runs of (run time / 1000)

Prints {"<model_id>": {"batch1_us": x, "batch1000_us": y}, ...} on stdout
(progress and environment go to stderr).

    python3 shared/benches/ort_peer.py [--corpus shared/tests/corpus/dev] [--reps N]

Both timings include onnxruntime's Python binding overhead and fetch every
graph output, ZipMap included, as a Python caller would.
"""

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CORPUS = os.path.normpath(os.path.join(HERE, "..", "tests", "corpus", "dev"))

NP_TYPES = {"float": np.float32, "double": np.float64, "int64": np.int64, "int32": np.int32,
            "string": object, "bool": np.bool_}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def parse_col(cells, np_type):
    if np_type is object:
        return np.array(cells, dtype=object)
    if np_type in (np.float32, np.float64):
        return np.array([float(c) if c != "" else np.nan for c in cells], dtype=np_type)
    return np.array([int(c) for c in cells], dtype=np_type)


def load_inputs(model_dir, meta):
    """Feeds {input name: array with N rows} built from input.csv, following
    the corpus rules (see shared/tests/corpus/README.md).  None if the model
    takes a map (input.jsonl)."""
    path = os.path.join(model_dir, "input.csv")
    if not os.path.exists(path):
        return None
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    cols = list(zip(*body))
    ins = meta["inputs"]
    if len(ins) == 1 and ins[0]["shape"] is not None and len(ins[0]["shape"]) == 2:
        t = NP_TYPES[ins[0]["elem_type"]]
        mat = np.stack([parse_col(c, t) for c in cols], axis=1)
        return {ins[0]["name"]: mat}
    feeds = {}
    for i in ins:
        c = cols[header.index(i["name"])]
        arr = parse_col(c, NP_TYPES[i["elem_type"]])
        if i["shape"] is not None and len(i["shape"]) == 2:
            arr = arr.reshape(-1, 1)
        feeds[i["name"]] = arr
    return feeds


def take(feeds, idx):
    return {k: v[idx] for k, v in feeds.items()}


def bench_model(model_dir, meta, reps, rng):
    feeds = load_inputs(model_dir, meta)
    if feeds is None:
        return None
    sess = session(os.path.join(model_dir, "model.onnx"))
    n = len(next(iter(feeds.values())))

    # batch 1: one run per row (row feeds prepared up front)
    row_feeds = [take(feeds, slice(i, i + 1)) for i in range(n)]
    for rf in row_feeds[:20]:  # warm-up
        sess.run(None, rf)
    per_row = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        for rf in row_feeds:
            sess.run(None, rf)
        per_row.append((time.perf_counter_ns() - t0) / n / 1e3)

    # batch 1000: rows sampled from the corpus rows
    idx = rng.randint(0, n, 1000)
    big = take(feeds, idx)
    sess.run(None, big)  # warm-up
    per_row_big = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        sess.run(None, big)
        per_row_big.append((time.perf_counter_ns() - t0) / 1000 / 1e3)
    return {"batch1_us": round(statistics.median(per_row), 3),
            "batch1000_us": round(statistics.median(per_row_big), 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=DEFAULT_CORPUS, help="corpus set folder (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=15, help="repetitions per measurement (default: %(default)s)")
    ap.add_argument("--models", nargs="*", help="only these model ids")
    args = ap.parse_args()

    with open(os.path.join(args.corpus, "index.json")) as f:
        ids = json.load(f)["models"]
    log("onnxruntime %s, python %s, %s, reps=%d" % (ort.__version__, platform.python_version(),
                                                    platform.machine(), args.reps))
    rng = np.random.RandomState(0)
    results = {}
    t_start = time.time()
    for mid in ids:
        d = os.path.join(args.corpus, mid)
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
        if not meta.get("bench") or (args.models and mid not in args.models):
            continue
        t0 = time.time()
        r = bench_model(d, meta, args.reps, rng)
        if r is None:
            log("  %-26s skipped (map input)" % mid)
            continue
        results[mid] = r
        log("  %-26s %-9s batch1 %9.2f us/row   batch1000 %8.3f us/row   (%.1fs)" % (
            mid, meta.get("bench_group") or "", r["batch1_us"], r["batch1000_us"], time.time() - t0))
    log("total %.1fs" % (time.time() - t_start))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
