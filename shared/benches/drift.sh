#!/usr/bin/env bash
# Drift update cost: ns per feature per row of DriftState::observe_row (histogram over 10
# reference bins + missing count + Welford mean/std + min/max), 6 and 20 features, 1e7 rows,
# vs numpy on the same arrays in the same run (np.searchsorted + np.bincount per feature,
# and that plus the moments). One command:
#   bash shared/benches/drift.sh [ROWS]
# Builds shared/examples/drift_bench.rs in release; the peer is shared/benches/drift_numpy.py.
# Scratch files (the 1e6-row blocks, up to 160 MB): target/bench-drift/.
# Target: <= 50 ns per feature per row.
set -euo pipefail
cd "$(dirname "$0")/../.."
rows=${1:-1e7}
python3 -c "import numpy" 2>/dev/null || python3 -m pip install --quiet numpy
dir=target/bench-drift
mkdir -p "$dir"
cargo build --release --quiet -p shared --example drift_bench
bench=./target/release/examples/drift_bench
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-9s %-14s %-14s %-22s %-10s\n' features rust_ns numpy_hist_ns numpy_hist+moments_ns rust/numpy_hist
for f in 6 20; do
  "$bench" --features "$f" --rows "$rows" --block 1e6 --reps 3 --dump "$dir/f$f" >"$dir/rust-$f.json"
  python3 shared/benches/drift_numpy.py "$dir/f$f" "$f" "$rows" 3 >"$dir/numpy-$f.json"
  python3 - "$dir/rust-$f.json" "$dir/numpy-$f.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); n = json.load(open(sys.argv[2]))
rb, nh, nf = r["ns_per_feature_row_best"], n["hist_ns_per_feature_row_best"], n["full_ns_per_feature_row_best"]
print(f'{r["features"]:<9} {rb:<14.2f} {nh:<14.2f} {nf:<22.2f} {rb / nh:<10.2f}')
PY
done
echo "(best of 3 runs; medians in $dir/*.json)"
rm -f "$dir"/f*/block.f64
