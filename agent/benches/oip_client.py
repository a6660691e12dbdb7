#!/usr/bin/env python3
"""Talk to a running edge-agent with the stock Triton HTTP client (Open Inference Protocol v2).

    pip install 'tritonclient[http]' numpy
    edge-agent run --state-dir state --trust-root root.pub --http-listen 127.0.0.1:8080 &
    python3 agent/benches/oip_client.py --url 127.0.0.1:8080 [--model pdm-failure] [--token T]

The agent must have the predictive-maintenance example (deploy/examples/pdm) installed under
--model. Checks health, server and model metadata, then scores the first holdout rows three
ways (binary tensors both ways, which is tritonclient's default; JSON both ways; by version)
and compares the scores with onnxruntime's (deploy/examples/pdm/expected.json). Also shows
the errors for an unknown model and a wrong shape. Exits 1 on any mismatch.
"""

import argparse
import csv
import json
import pathlib
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

PDM = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "examples" / "pdm"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="127.0.0.1:8080")
    ap.add_argument("--model", default="pdm-failure")
    ap.add_argument("--token", help="bearer token (when the agent has http.tokens)")
    ap.add_argument("--rows", type=int, default=5)
    args = ap.parse_args()
    auth = {"Authorization": f"Bearer {args.token}"} if args.token else {}

    def hdrs():
        # a fresh dict per call: tritonclient adds Inference-Header-Content-Length to the
        # dict it is given, which would go stale on the next call
        return dict(auth)

    with open(PDM / "holdout.csv") as f:
        reader = csv.reader(f)
        next(reader)
        rows = [[float(c) for c in r[:6]] for _, r in zip(range(args.rows), reader)]
    x = np.array(rows, dtype=np.float32)
    expected = json.loads((PDM / "expected.json").read_text())["holdout"]["first_rows"]

    client = httpclient.InferenceServerClient(url=args.url)
    print("server live:", client.is_server_live(headers=hdrs()))
    print("server ready:", client.is_server_ready(headers=hdrs()))
    print("server metadata:", client.get_server_metadata(headers=hdrs()))
    print("model ready:", client.is_model_ready(args.model, headers=hdrs()))
    meta = client.get_model_metadata(args.model, headers=hdrs())
    print("model metadata:", json.dumps(meta))
    version = meta["versions"][0]

    failures = 0

    def run(binary, model_version=""):
        inp = httpclient.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outs = [
            httpclient.InferRequestedOutput("label", binary_data=binary),
            httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        ]
        res = client.infer(
            args.model,
            [inp],
            model_version=model_version,
            outputs=outs,
            request_id="oip-client",
            headers=hdrs(),
        )
        return res.as_numpy("label"), res.as_numpy("probabilities"), res.get_response()

    results = {}
    for name, binary, mv in [
        ("binary", True, ""),
        ("json", False, ""),
        (f"version {version}", True, version),
    ]:
        label, probs, resp = run(binary, mv)
        results[name] = (label, probs)
        print(
            f"infer ({name}): label {label.dtype}{list(label.shape)} = {label.tolist()}, "
            f"probabilities {probs.dtype}{list(probs.shape)}, id {resp.get('id')!r}"
        )
        for i, want in enumerate(expected[: len(rows)]):
            ok = int(label[i]) == want["label"] and np.allclose(
                probs[i], want["probabilities"], rtol=0, atol=1e-6
            )
            if not ok:
                failures += 1
                print(f"  row {i}: got {label[i]} {probs[i]}, onnxruntime {want}")
    # no outputs named: tritonclient asks for every output as binary data
    inp = httpclient.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer(args.model, [inp], headers=hdrs())
    same = np.array_equal(res.as_numpy("label"), results["binary"][0]) and np.array_equal(
        res.as_numpy("probabilities"), results["binary"][1]
    )
    print("infer (all outputs, default binary):", "same" if same else "DIFFERENT")
    failures += not same
    same = np.array_equal(results["binary"][1], results["json"][1])
    print("binary and JSON probabilities identical:", same)
    failures += not same

    for what, model, arr in [
        ("unknown model", "no-such-model", x),
        ("wrong shape", args.model, x[:, :5].copy()),
    ]:
        inp = httpclient.InferInput("X", list(arr.shape), "FP32")
        inp.set_data_from_numpy(arr)
        try:
            client.infer(model, [inp], headers=hdrs())
            print(f"{what}: accepted?!")
            failures += 1
        except InferenceServerException as e:
            print(f"{what}: refused: status {e.status()}: {e.message()}")

    print("OK: every score matches onnxruntime" if failures == 0 else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
