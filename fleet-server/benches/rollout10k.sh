#!/usr/bin/env bash
# Fleet benchmark: N simulated devices (default 10,000; `fleet_sim`, lightweight MQTT
# clients) on loopback against a real `fleet-server run`; a 3-wave rollout (1%, 10%, 100%)
# of the example bundle, delivered in 16 KiB chunks. Prints the time from `rollout create`
# to 100% committed, the server's CPU seconds and peak RSS (and the broker's), as one JSON
# line. The broker is Mosquitto (BROKER=mosquitto, the default; production fleets use an
# external broker) or the embedded rumqttd (BROKER=embedded).
#   bash fleet-server/benches/rollout10k.sh [DEVICES]
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-10000}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release -q -p fleet-server --bins
cargo build --release -q -p fleet-server --bench fleet_sim
SIM=$(ls -t target/release/deps/fleet_sim-* | grep -v '\.d$' | head -1)
BIN=target/release
W=$(mktemp -d /tmp/rollout10k.XXXXXX)
cleanup() { kill "${SIM_PID:-}" "${SRV_PID:-}" "${MQ_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

# keys and the example bundle, signed
"$BIN/fleetctl" keygen --out "$W/root" >/dev/null
"$BIN/fleetctl" bundle build --model deploy/examples/pdm/model.onnx --name pdm-failure \
  --version 2.0.0 --release 2 --key "$W/root.key" \
  --reference deploy/examples/pdm/reference.csv --out "$W/b2.bundle" >/dev/null
HTTP=$((20000 + RANDOM % 10000)); MQTT=$((HTTP + 1))
BROKER=${BROKER:-mosquitto}
EXTERNAL=""
if [ "$BROKER" = mosquitto ]; then
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_connections -1\npersistence false\nmax_queued_messages 10000\n' "$MQTT" > "$W/mosquitto.conf"
  mosquitto -c "$W/mosquitto.conf" >"$W/mosquitto.log" 2>&1 &
  MQ_PID=$!
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$MQTT") 2>/dev/null && break; sleep 0.1; done
  EXTERNAL=$(printf '[mqtt]\nurl = "mqtt://127.0.0.1:%s"\n' "$MQTT")
fi
cat > "$W/fleet.toml" <<CONF
state_dir = "$W/state"
$EXTERNAL
[http]
listen = "127.0.0.1:$HTTP"
[broker]
listen = "127.0.0.1:$MQTT"
max_connections = $((N + 100))
[bundles]
trust_root = "$W/root.pub"
chunk_bytes = 16384
[rollouts]
tick_ms = 200
CONF
"$BIN/fleet-server" run --config "$W/fleet.toml" >"$W/server.log" 2>&1 &
SRV_PID=$!
for _ in $(seq 100); do [ -f "$W/state/admin-token" ] && [ -f "$W/state/directive.pub" ] && break; sleep 0.1; done
export FLEET_SERVER="http://127.0.0.1:$HTTP" FLEET_TOKEN="$(cat "$W/state/admin-token")"

"$SIM" --mqtt "127.0.0.1:$MQTT" --devices "$N" --directive-pub "$W/state/directive.pub" \
  --tags site=bench --ramp-per-sec 2000 --report-every 5 >"$W/sim.log" 2>&1 &
SIM_PID=$!
t0=$(date +%s.%N)
until [ "$("$BIN/fleetctl" devices list --selector site=bench --online --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["devices"]))')" -ge "$N" ]; do
  sleep 1
  if [ "$(echo "$(date +%s.%N) - $t0 > 300" | bc)" = 1 ]; then echo "devices did not all come online" >&2; tail -3 "$W/sim.log" >&2; exit 1; fi
done
online_s=$(echo "$(date +%s.%N) - $t0" | bc)

"$BIN/fleetctl" bundle push "$W/b2.bundle" >/dev/null
t1=$(date +%s.%N)
ID=$("$BIN/fleetctl" rollout create --bundle pdm-failure@2.0.0 --target site=bench \
  --waves 1%,10%,100% --success-threshold 99% --failure-threshold 1% --wave-timeout 10m --json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
while :; do
  state=$("$BIN/fleetctl" rollout status "$ID" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
  [ "$state" = completed ] && break
  if [ "$state" != running ]; then echo "rollout ended $state" >&2; "$BIN/fleetctl" rollout status "$ID" >&2; exit 1; fi
  sleep 0.2
done
t2=$(date +%s.%N)
ticks=$(getconf CLK_TCK)
cpu=$(awk -v t="$ticks" '{ printf "%.1f", ($14 + $15) / t }' "/proc/$SRV_PID/stat")
hwm=$(awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$SRV_PID/status")
mq_cpu=null; mq_hwm=null
if [ -n "${MQ_PID:-}" ]; then
  mq_cpu=$(awk -v t="$ticks" '{ printf "%.1f", ($14 + $15) / t }' "/proc/$MQ_PID/stat")
  mq_hwm=$(awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$MQ_PID/status")
fi
sleep 5   # one more simulator report
committed=$(tail -1 "$W/sim.log")
printf '{"devices": %s, "broker": "%s", "online_after_s": %.1f, "rollout_create_to_100pct_committed_s": %.1f, "server_cpu_s": %s, "server_peak_rss_mb": %s, "broker_cpu_s": %s, "broker_peak_rss_mb": %s, "sim": %s}\n' \
  "$N" "$BROKER" "$online_s" "$(echo "$t2 - $t1" | bc)" "$cpu" "$hwm" "$mq_cpu" "$mq_hwm" "$committed"
