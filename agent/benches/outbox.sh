#!/usr/bin/env bash
# The durable outbox: append (200-byte records, batches of 1000, one flush per batch), ack and
# replay (read_after) throughput, and memory with a large backlog; the peer, measured in the
# same run on the same file system, is fio's rate of write+fsync of 200 KiB (one sled batch of
# 1000 records is ~220 KiB), which bounds the batch rate.
# One command: `bash agent/benches/outbox.sh [RECORDS]`. Installs fio (apt-get) if missing.
# OUTBOX_BENCH_DIR: where to measure (default: $TMPDIR or /tmp);
# OUTBOX_BENCH_BACKLOG_MB: backlog test size in MiB (default 1024; 0 skips it, ~2 GB of disk).
set -euo pipefail
cd "$(dirname "$0")/../.."
records=${1:-200000}
backlog_mb=${OUTBOX_BENCH_BACKLOG_MB:-1024}
command -v fio >/dev/null || { apt-get update -qq && apt-get install -y -qq fio; }
work=$(mktemp -d "${OUTBOX_BENCH_DIR:-${TMPDIR:-/tmp}}/outbox-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
cargo build --release --quiet -p edge-agent --example outbox_bench
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "file system: $(df -hT "$work" | awk 'NR==2 {print $1, $2, $3}')"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
mkdir "$work/fio"
fio --name=fsync --rw=write --bs=200k --size=64m --fsync=1 --directory="$work/fio" \
  --output-format=json >"$work/fio.json"
python3 - "$work/fio.json" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
w = job["write"]
print(f"peer fio: write 200 KiB + fsync: {w['iops']:.0f} fsyncs/s "
      f"(x1000 records = {w['iops'] * 1000:.0f} records/s if each batch costs one fsync), "
      f"{w['bw'] / 1024:.1f} MiB/s")
PY
rm -rf "$work/fio"
./target/release/examples/outbox_bench "$work/db" "$records" 0
# The backlog in a process of its own, so that its memory is not mixed with the runs above.
if [ "$backlog_mb" -gt 0 ]; then
  ./target/release/examples/outbox_bench "$work/backlog" 0 "$backlog_mb"
fi
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
