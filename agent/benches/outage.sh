#!/usr/bin/env bash
# Long outage run (issue 5, "Done when"): the agent predicts continuously (one request every
# ~10 ms from a client loop) while the fleet broker is down for OUTAGE_SECS (default 600),
# then comes back; then kill -9 of the agent and a restart; then a broker restart mid-stream.
# At the end it waits until the agent's outbox is drained and checks the fleet's store:
# every record exactly once, in order (seqs 1..=last with no duplicates), and, per class,
# produced == acknowledged + dropped. Uses Mosquitto and the reference ingest
# (fleet-server/examples/ingest.rs).
#
# One command: `bash agent/benches/outage.sh` (about OUTAGE_SECS + 2 minutes; SKIP_BUILD=1
# uses the binaries already in target/release).
set -euo pipefail
cd "$(dirname "$0")/../.."
outage=${OUTAGE_SECS:-600}
command -v mosquitto >/dev/null || { apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null; }
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --quiet -p edge-agent -p fleet-server --bins --example ingest
agent=$PWD/target/release/edge-agent
fleetctl=$PWD/target/release/fleetctl
ingest=$PWD/target/release/examples/ingest
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
bport=$(port); hport=$(port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$bport" > "$work/mosq.conf"
start_broker() { mosquitto -c "$work/mosq.conf" >"$work/mosq.log" 2>&1 & broker=$!; pids+=("$broker"); sleep 0.5; }
start_broker
"$ingest" serve "mqtt://127.0.0.1:$bport" "$work/fleet" >"$work/ingest.log" 2>&1 & pids+=($!)

"$fleetctl" keygen --out "$work/root" >/dev/null
"$fleetctl" bundle build --model deploy/examples/pdm/model.onnx --name pdm-failure --version 1.0.0 \
  --release 1 --key "$work/root.key" --reference deploy/examples/pdm/reference.csv \
  --out "$work/pdm.bundle" >/dev/null
cat > "$work/agent.toml" <<TOML
device_id = "press-07"
state_dir = "$work/state"
trust_root = "$work/root.pub"
[http]
listen = "127.0.0.1:$hport"
[telemetry]
window_secs = 5
health_secs = 2
[sync]
urls = ["mqtt://127.0.0.1:$bport"]
backoff_max_ms = 5000
TOML
"$agent" bundle install "$work/pdm.bundle" --config "$work/agent.toml" >/dev/null
start_agent() {
  "$agent" run --config "$work/agent.toml" >>"$work/agent.log" 2>&1 & agent_pid=$!; pids+=("$agent_pid")
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$hport/v2/health/ready" >/dev/null && return; sleep 0.05; done
  echo "agent did not start" >&2; exit 1
}
start_agent
body='{"instances":[{"air_temperature_k":300.1,"process_temperature_k":310.2,"rotational_speed_rpm":1500,"torque_nm":40,"tool_wear_min":100,"vibration_rms_mm_s":2.5}]}'
load() { # requests until the file $work/stop exists; prints ok/failed counts
  local ok=0 bad=0
  while [ ! -e "$work/stop" ]; do
    if curl -sf -o /dev/null -H 'Content-Type: application/json' -d "$body" \
        "http://127.0.0.1:$hport/v1/models/pdm-failure:predict"; then ok=$((ok+1)); else bad=$((bad+1)); fi
    sleep 0.01
  done
  echo "$ok $bad"
}
status() { "$agent" status --json --config "$work/agent.toml"; }
load > "$work/load1" & loader=$!
sleep 10
echo "$(date -u +%T) broker down for $outage s (kill -9), predictions continue"
kill -9 "$broker"; wait "$broker" 2>/dev/null || true
sleep "$outage"
status | python3 -c 'import json,sys; t=json.load(sys.stdin)["telemetry"]["outbox"]; print("  outbox while down: last_seq", t["last_seq"], "acked_through", t["acked_through"], "pending bytes", t["stored_bytes"])'
start_broker
echo "$(date -u +%T) broker back"
sleep 20
touch "$work/stop"; wait "$loader"; rm "$work/stop"
echo "$(date -u +%T) kill -9 of the agent, restart"
kill -9 "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
start_agent
load > "$work/load2" & loader=$!
sleep 10
echo "$(date -u +%T) broker restart mid-stream"
kill -9 "$broker"; wait "$broker" 2>/dev/null || true; sleep 1; start_broker
sleep 15
touch "$work/stop"; wait "$loader"
for _ in $(seq 120); do
  s=$(status)
  done_=$(python3 -c 'import json,sys; t=json.loads(sys.argv[1])["telemetry"]["outbox"]; print(int(t["acked_through"]==t["last_seq"]))' "$s")
  [ "$done_" = 1 ] && break; sleep 1
done
"$ingest" check "$work/fleet" press-07 > "$work/check.json"
python3 - "$s" "$work/check.json" "$work/load1" "$work/load2" <<'PY'
import json, sys
st = json.loads(sys.argv[1])["telemetry"]["outbox"]
chk = json.load(open(sys.argv[2]))
l1 = open(sys.argv[3]).read().split(); l2 = open(sys.argv[4]).read().split()
print(f"predictions: {int(l1[0])+int(l2[0])} ok, {int(l1[1])+int(l2[1])} failed (while the agent ran)")
produced = sum(c["produced"] for c in st["classes"].values())
acked = sum(c["acknowledged"] for c in st["classes"].values())
dropped = sum(sum(c["dropped"].values()) for c in st["classes"].values())
print(f"agent outbox: last_seq {st['last_seq']}, produced {produced}, acknowledged {acked}, dropped {dropped}, pending {sum(c['pending'] for c in st['classes'].values())}")
print(f"fleet store: {chk['stored']} records, seqs {chk['first_seq']}..{chk['last_seq']}, strictly increasing: {chk['strictly_increasing']}")
ok = (chk["stored"] == acked and chk["strictly_increasing"] and chk["last_seq"] == st["last_seq"]
      and produced == acked + dropped and (dropped > 0 or chk["stored"] == st["last_seq"]))
print("exactly once, in order, produced = delivered + dropped:", "YES" if ok else "NO")
sys.exit(0 if ok else 1)
PY
