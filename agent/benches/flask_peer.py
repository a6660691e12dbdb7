#!/usr/bin/env python3
"""Serving peer: the Flask + onnxruntime server a data scientist would write.

Serves one ONNX model with the same request and response shapes as edge-agent's
`POST /v1/models/{name}:predict`:

    request:  {"instances": [{"<feature>": value, ...}, ...]}   (or positional arrays)
    response: {"predictions": [{"<output>": value, ...}, ...], "model": ..., "version": ...,
               "release": ..., "prediction_ids": [...]}

plus `GET /v2/health/ready`. The model must have one float input [N, F]; the feature
order comes from --features (a CSV whose header names the features, e.g. the bundle's
reference.csv). The onnxruntime session uses default settings except
intra_op_num_threads (default 1: one thread per worker process; the benchmark runs one
worker per core).

Production (what agent/benches/serve.sh runs):

    gunicorn -w 2 -k gthread --threads 8 -b 127.0.0.1:9001 \
        'flask_peer:create_app(model="m.onnx", name="pdm-failure", features="reference.csv")'

Flask's development server (for comparison only):

    python3 agent/benches/flask_peer.py --model m.onnx --name pdm-failure \
        --features reference.csv --listen 127.0.0.1:9001
"""

import argparse
import csv
import itertools
import math
import os
import time

import numpy as np
import onnxruntime as ort
from flask import Flask, jsonify, request

USAGE = 'expected {"instances": [{"<feature>": value, ...}, ...]}'


def _error(status, message, row=None, field=None):
    e = {"message": message}
    if row is not None:
        e["row"] = row
    if field is not None:
        e["field"] = field
    return jsonify({"error": e}), status


def _value(v):
    """A JSON-friendly value of one output element (numpy scalars and arrays)."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def create_app(model, name, features, version="1.0.0", release=1, threads=1, device="peer"):
    threads = int(threads)
    with open(features, newline="") as f:
        names = next(csv.reader(f))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if len(sess.get_inputs()) != 1 or len(inp.shape) != 2:
        raise SystemExit(f"{model}: needs one 2-D input, has {[i.name for i in sess.get_inputs()]}")
    if isinstance(inp.shape[1], int) and inp.shape[1] != len(names):
        raise SystemExit(f"{model}: input has {inp.shape[1]} features, {features} names {len(names)}")
    out_names = [o.name for o in sess.get_outputs()]
    counter = itertools.count()
    start_ms = int(time.time() * 1000)

    app = Flask(__name__)

    @app.get("/v2/health/ready")
    def ready():
        return "", 200

    @app.post("/v1/models/<model_name>:predict")
    def predict(model_name):
        if model_name != name:
            return _error(404, f"no model named {model_name!r}")
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or set(body) != {"instances"}:
            return _error(400, USAGE)
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            return _error(400, USAGE)
        x = np.empty((len(instances), len(names)), dtype=np.float32)
        for r, inst in enumerate(instances):
            if isinstance(inst, list):
                vals = inst
                if len(vals) != len(names):
                    return _error(400, f"expected {len(names)} values, got {len(vals)}", row=r)
            elif isinstance(inst, dict):
                try:
                    vals = [inst[n] for n in names]
                except KeyError as k:
                    return _error(400, "missing feature", row=r, field=k.args[0])
            else:
                return _error(400, "an instance must be an object", row=r)
            for c, v in enumerate(vals):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    return _error(400, f"{v!r} is not a finite number", row=r, field=names[c])
            x[r] = vals
        outs = sess.run(None, {inp.name: x})
        preds = [
            {n: _value(o[r]) for n, o in zip(out_names, outs)} for r in range(len(instances))
        ]
        first = next(counter)
        for _ in range(len(instances) - 1):
            next(counter)
        ids = [f"{device}-{release}-{start_ms:x}-{os.getpid():x}{first + k:x}"
               for k in range(len(instances))]
        return jsonify({"predictions": preds, "model": name, "version": version,
                        "release": release, "prediction_ids": ids})

    return app


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--features", required=True, help="CSV whose header names the features")
    ap.add_argument("--listen", default="127.0.0.1:9001")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra_op_num_threads")
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    app = create_app(args.model, args.name, args.features, threads=args.threads)
    # Flask's development server: threaded, one process
    app.run(host=host, port=int(port), threaded=True)


if __name__ == "__main__":
    main()
