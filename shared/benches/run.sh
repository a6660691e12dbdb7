#!/usr/bin/env bash
# Engine vs onnxruntime, per-row latency, single thread, batch 1 and batch 1000, on the
# corpus' benchmark models. One command: `bash shared/benches/run.sh [--reps N]`.
# Needs Python 3 with onnxruntime, numpy and pandas (installed with pip if missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -c "import onnxruntime, numpy, pandas" 2>/dev/null \
  || python3 -m pip install --quiet -r shared/benches/requirements.txt
out=$(mktemp -d)
cargo build --release --quiet -p shared --example engine_bench
./target/release/examples/engine_bench shared/tests/corpus/dev "$@" > "$out/engine.json"
python3 shared/benches/ort_peer.py --corpus shared/tests/corpus/dev > "$out/ort.json"
python3 - "$out/engine.json" "$out/ort.json" <<'PY'
import json, sys, platform, os
eng = json.load(open(sys.argv[1])); ort = json.load(open(sys.argv[2]))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"machine: {cpu}, {os.cpu_count()} cores; both single-threaded")
print("| model | engine b1 us/row | ORT(Python) b1 us/row | ratio b1 | engine b1000 us/row | ORT b1000 us/row | ratio b1000 |")
print("|---|---|---|---|---|---|---|")
for k in sorted(eng):
    e, o = eng[k], ort.get(k)
    if not o:
        continue
    print(f"| {k} | {e['batch1_us']:.2f} | {o['batch1_us']:.2f} | {e['batch1_us']/o['batch1_us']:.2f}x "
          f"| {e['batch1000_us']:.3f} | {o['batch1000_us']:.3f} | {e['batch1000_us']/o['batch1000_us']:.2f}x |")
PY
