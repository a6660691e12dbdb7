#!/usr/bin/env bash
# `edge-agent predict` vs the Python job a data scientist would write (pandas + onnxruntime,
# single thread, batches of 1000, JSON lines out), on 200,000 rows of the 100-tree forest.
# One command: `bash agent/benches/predict.sh [ROWS]`. Needs hyperfine (apt-get) and
# Python 3 with onnxruntime, numpy, pandas (pip); installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
rows=${1:-200000}
model=shared/tests/corpus/dev/rf_clf_100x10_bench/model.onnx
command -v hyperfine >/dev/null || { apt-get update -qq && apt-get install -y -qq hyperfine; }
python3 -c "import onnxruntime, numpy, pandas" 2>/dev/null \
  || python3 -m pip install --quiet -r shared/benches/requirements.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 agent/benches/make_rows.py --from shared/tests/corpus/dev/rf_clf_100x10_bench/input.csv \
  --rows "$rows" --out "$work/rows.csv"
cargo build --release --quiet -p edge-agent
hyperfine --warmup 1 --runs 5 --export-markdown "$work/table.md" \
  -n edge-agent "./target/release/edge-agent predict --model $model --input $work/rows.csv --output $work/agent.jsonl" \
  -n python "python3 agent/benches/predict_peer.py --model $model --input $work/rows.csv --output $work/python.jsonl"
# Same rows, same answers: labels must agree everywhere.
python3 - "$work/agent.jsonl" "$work/python.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert len(a) == len(b), (len(a), len(b))
diff = sum(x["output_label"] != y["output_label"] for x, y in zip(a, b))
print(f"{len(a)} rows each, label disagreements: {diff}")
PY
cat "$work/table.md"
