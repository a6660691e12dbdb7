#!/usr/bin/env bash
# Bundle verification vs `zstd -dc FILE | sha256sum` on the same ~50 MB-model bundle, and the
# peak memory of rejecting signed zstd bombs. One command:
#   bash shared/benches/bundle.sh [--phases]
# Builds shared/examples/bundle_bench.rs in release, makes the model (scikit-learn forest,
# shared/benches/bundle/make_model.py) if missing, the bundle and the bombs, then runs
# hyperfine (--warmup 2 --runs 10) and /usr/bin/time -v. Scratch files: target/bench-bundle/.
# With --phases, also prints where the time of one verification goes.
# Targets: verification < 1.5x the peer; max RSS while rejecting a bomb < 64 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
phases=0
for a in "$@"; do
  case "$a" in
    --phases) phases=1 ;;
    *) echo "unknown argument $a" >&2; exit 2 ;;
  esac
done

for tool in hyperfine zstd sha256sum; do
  command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done
[ -x /usr/bin/time ] || apt-get install -y -qq time >/dev/null
python3 -c "import sklearn, skl2onnx" 2>/dev/null \
  || python3 -m pip install --quiet scikit-learn skl2onnx

dir=target/bench-bundle
mkdir -p "$dir"
cargo build --release --quiet -p shared --example bundle_bench
bench=./target/release/examples/bundle_bench
model=$dir/forest.onnx
bundle=$dir/forest.bundle
[ -f "$model" ] || python3 shared/benches/bundle/make_model.py "$model"
"$bench" make --model "$model" --out "$bundle"
for kind in zeros oversize window; do
  [ -f "$dir/bomb-$kind.bundle" ] || "$bench" bomb --kind "$kind" --out "$dir/bomb-$kind.bundle"
done
staging=$dir/staging
rm -rf "$staging"
mkdir -p "$staging"

cpu=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
echo "machine: $cpu, $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB;" \
  "$(rustc --version | cut -d' ' -f1-2); $(zstd --version | grep -o 'v[0-9.]*' | head -1);" \
  "$(sha256sum --version | head -1)"
echo "model: $(stat -c %s "$model") bytes; bundle: $(stat -c %s "$bundle") bytes;" \
  "decompressed archive: $(zstd -dc "$bundle" | wc -c) bytes"
echo

peer="sh -c 'zstd -dc $bundle | sha256sum'"
refs=()
command -v openssl >/dev/null && refs+=(--command-name "zstd -dc | openssl dgst -sha256 (reference)"
  "sh -c 'zstd -dc $bundle | openssl dgst -sha256'")
hyperfine -N --warmup 2 --runs 10 --export-json "$dir/hyperfine.json" \
  --command-name "verify (no staging)" "$bench verify-once $bundle" \
  --command-name "verify (staging to disk, fsync)" "$bench verify-once $bundle --staging $staging" \
  --command-name "zstd -dc | sha256sum (peer)" "$peer" \
  "${refs[@]}" \
  --command-name "zstd -d to /dev/null (reference)" "zstd -dqf $bundle -o /dev/null"

echo
python3 - "$dir/hyperfine.json" <<'PY'
import json, statistics, sys
res = {r["command"]: r for r in json.load(open(sys.argv[1]))["results"]}
def med(name):
    return statistics.median(res[name]["times"]) * 1e3
peer = med("zstd -dc | sha256sum (peer)")
print("| command | median ms | mean ms | min ms | / peer (median) |")
print("|---|---|---|---|---|")
for name, r in res.items():
    m = med(name)
    print(f"| {name} | {m:.1f} | {r['mean'] * 1e3:.1f} | {r['min'] * 1e3:.1f} | {m / peer:.2f}x |")
for name in ("verify (no staging)", "verify (staging to disk, fsync)"):
    ratio = med(name) / peer
    print(f"{name}: {ratio:.2f}x the peer (target < 1.5x): {'met' if ratio < 1.5 else 'NOT MET'}")
PY

echo
echo "max RSS (/usr/bin/time -v), target for bombs < 64 MB:"
rss() {
  local what=$1
  shift
  local kb
  kb=$( { /usr/bin/time -v "$@" 2>&1 >/dev/null; } | tee "$dir/last.log" \
    | awk -F': ' '/Maximum resident set size/ {print $2}')
  printf '  %-52s %6d KB  (%s)\n' "$what" "$kb" \
    "$(grep -m1 -E 'rejected as expected|verified in' "$dir/last.log" | cut -c1-110)"
  if [[ "$what" == bomb* && "$kb" -ge 65536 ]]; then
    echo "  ^ over the 64 MB target" >&2
  fi
}
rss "bomb zeros: 4 GiB of zeros after the archive" \
  "$bench" verify-once "$dir/bomb-zeros.bundle" --staging "$staging" --expect-reject
rss "bomb oversize: entry header claims 4 GiB" \
  "$bench" verify-once "$dir/bomb-oversize.bundle" --staging "$staging" --expect-reject
rss "bomb window: 128 MiB zstd window" \
  "$bench" verify-once "$dir/bomb-window.bundle" --staging "$staging" --expect-reject
rss "verify the 50 MB-model bundle, no staging" "$bench" verify-once "$bundle"
rss "verify the 50 MB-model bundle, staging" "$bench" verify-once "$bundle" --staging "$staging"
rm -f "$dir/last.log"

if [ "$phases" = 1 ]; then
  echo
  "$bench" phases "$bundle" --reps 10
  "$bench" verify "$bundle" --reps 10
fi
