#!/usr/bin/env bash
# `edge-agent run` vs the Flask + onnxruntime server a data scientist would write, serving
# the predictive-maintenance example (deploy/examples/pdm) on this machine:
#   1. single-row POST /v1/models/pdm-failure:predict, 16 concurrent connections (wrk, 2
#      threads, 5 s warm-up then DURATION s per run, ROUNDS rounds, medians): requests/s,
#      p50, p99 for edge-agent and for the peer (agent/benches/flask_peer.py; onnxruntime
#      with 1 intra-op thread per worker process) under gunicorn with 2 workers (= cores) in
#      three worker setups (gthread 8 threads, gthread 2 threads, sync), and once under
#      Flask's development server for reference; targets are judged against the strongest
#      gunicorn setup on each metric;
#   2. idle RSS of `edge-agent run` with the example model loaded: 5 s after READY=1, and
#      15 s after each load run;
#   3. process start -> READY=1 (NOTIFY_SOCKET) and -> first 200 on /v2/health/ready, 10
#      runs, with a ~1 MB RandomForest bundle (agent/benches/make_big_model.py).
# The load generator shares the 2 cores with the server under test.
# One command: `bash agent/benches/serve.sh`. Environment: DURATION (20), ROUNDS (3),
# CONNECTIONS (16), MAX_LOAD (0.7: first wait until the 1-minute load average is below it,
# at most LOAD_WAIT=600 s), FLASK_DEV (1: also measure Flask's development server, round 1),
# SKIP_BUILD (0; 1 uses the binaries already in target/release). Needs wrk (apt-get) and
# Python 3 with onnxruntime, numpy, scikit-learn, skl2onnx, flask, gunicorn (pip); installs
# what is missing. Takes about 8 minutes after the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
duration=${DURATION:-20}
conns=${CONNECTIONS:-16}
max_load=${MAX_LOAD:-0.7}
load_wait=${LOAD_WAIT:-600}
flask_dev=${FLASK_DEV:-1}
rounds=${ROUNDS:-3}
pdm=deploy/examples/pdm
benches=agent/benches
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
python3 -c "import onnxruntime, numpy, sklearn, skl2onnx, flask, gunicorn" 2>/dev/null \
  || python3 -m pip install --quiet onnxruntime numpy scikit-learn skl2onnx flask gunicorn
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --quiet -p edge-agent -p fleet-server
agent=$PWD/target/release/edge-agent
fleetctl=$PWD/target/release/fleetctl

work=$(mktemp -d)
pids=()
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    for f in "$work"/*.log; do [ -s "$f" ] && { echo "== $f" >&2; tail -n 20 "$f" >&2; }; done
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# --- bundles: the example model and a ~1 MB forest, signed and installed -------------------
"$fleetctl" keygen --out "$work/root" >/dev/null
"$fleetctl" bundle build --model $pdm/model.onnx --name pdm-failure --version 1.0.0 \
  --release 1 --key "$work/root.key" --reference $pdm/reference.csv --out "$work/pdm.bundle" >/dev/null
"$agent" bundle install "$work/pdm.bundle" --state-dir "$work/pdm-state" \
  --trust-root "$work/root.pub" >/dev/null
python3 $benches/make_big_model.py --out "$work/big.onnx"
"$fleetctl" bundle build --model "$work/big.onnx" --name pdm-big-rf --version 1.0.0 \
  --release 1 --key "$work/root.key" --reference $pdm/reference.csv --out "$work/big.bundle" >/dev/null
"$agent" bundle install "$work/big.bundle" --state-dir "$work/big-state" \
  --trust-root "$work/root.pub" >/dev/null
ls -l "$work/pdm.bundle" "$work/big.bundle" | awk '{print $5, $NF}'

# --- request bodies: single rows from the holdout set ------------------------------------
python3 - "$pdm/holdout.csv" "$work/bodies.jsonl" <<'PY'
import csv, json, sys
feats = ["air_temperature_k", "process_temperature_k", "rotational_speed_rpm",
         "torque_nm", "tool_wear_min", "vibration_rms_mm_s"]
with open(sys.argv[1], newline="") as f, open(sys.argv[2], "w") as out:
    for i, r in enumerate(csv.DictReader(f)):
        if i == 200:
            break
        out.write(json.dumps({"instances": [{k: float(r[k]) for k in feats}]}) + "\n")
PY

# --- a quiet machine ----------------------------------------------------------------------
load1() { cut -d' ' -f1 /proc/loadavg; }
waited=0
while awk -v l="$(load1)" -v m="$max_load" 'BEGIN { exit !(l >= m) }'; do
  if [ "$waited" -ge "$load_wait" ]; then
    echo "load average still $(load1) after ${load_wait}s; measuring anyway" >&2
    break
  fi
  [ "$waited" -eq 0 ] && echo "waiting for the 1-minute load average ($(load1)) to drop below $max_load" >&2
  sleep 10
  waited=$((waited + 10))
done
echo "load before measuring: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$(cut -d' ' -f1-3 /proc/loadavg)" >"$work/load_start"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { # url pid
  for _ in $(seq 1 300); do
    kill -0 "$2" 2>/dev/null || { echo "server for $1 exited" >&2; return 1; }
    curl -fsS -o /dev/null "$1/v2/health/ready" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "server at $1 never became ready" >&2
  return 1
}

# --- 2 and 3: idle RSS (example model), start -> READY (example model and ~1 MB model) ----
python3 $benches/ready_timer.py --runs 3 --idle 5 --log "$work/agent-pdm.log" -- \
  "$agent" run --state-dir "$work/pdm-state" --trust-root "$work/root.pub" \
  --http-listen '127.0.0.1:{port}' >"$work/pdm_ready.json"
python3 $benches/ready_timer.py --runs 10 --log "$work/agent-big.log" -- \
  "$agent" run --state-dir "$work/big-state" --trust-root "$work/root.pub" \
  --http-listen '127.0.0.1:{port}' >"$work/big_ready.json"

# --- 1: throughput and latency under 16 connections ---------------------------------------
# Each server is started fresh for each round; rounds interleave the servers so that a
# disturbance on the shared VM hits one round, not one server; the table shows medians.
gunicorn_app="flask_peer:create_app(model='$root/$pdm/model.onnx', name='pdm-failure', features='$root/$pdm/reference.csv')"
start_server() { # label port -> pid in $server_pid
  local label=$1 port=$2
  case $label in
    agent)
      "$agent" run --state-dir "$work/pdm-state" --trust-root "$work/root.pub" \
        --http-listen "127.0.0.1:$port" 2>>"$work/agent-serve.log" & ;;
    gthread8) # one thread per client connection
      (cd $benches && exec gunicorn -w 2 -k gthread --threads 8 -b "127.0.0.1:$port" \
        --log-level warning "$gunicorn_app") 2>>"$work/gunicorn.log" & ;;
    gthread2)
      (cd $benches && exec gunicorn -w 2 -k gthread --threads 2 -b "127.0.0.1:$port" \
        --log-level warning "$gunicorn_app") 2>>"$work/gunicorn.log" & ;;
    sync) # one request at a time per worker, no keep-alive
      (cd $benches && exec gunicorn -w 2 -k sync -b "127.0.0.1:$port" \
        --log-level warning "$gunicorn_app") 2>>"$work/gunicorn.log" & ;;
    flask-dev)
      python3 $benches/flask_peer.py --model $pdm/model.onnx --name pdm-failure \
        --features $pdm/reference.csv --listen "127.0.0.1:$port" >/dev/null 2>>"$work/flask-dev.log" & ;;
  esac
  server_pid=$!
  pids+=("$server_pid")
  wait_ready "http://127.0.0.1:$port" "$server_pid"
}
run_wrk() { # label round url
  local out="$work/$1.$2"
  BODIES="$work/bodies.jsonl" PREDICT_PATH=/v1/models/pdm-failure:predict \
    wrk -t2 -c"$conns" -d5s --timeout 10s -s $benches/predict.lua "$3" >/dev/null
  cut -d' ' -f1 /proc/loadavg >"$out.load"
  BODIES="$work/bodies.jsonl" PREDICT_PATH=/v1/models/pdm-failure:predict \
    wrk -t2 -c"$conns" -d"${duration}s" --timeout 10s --latency -s $benches/predict.lua "$3" \
    >"$out.wrk"
  grep '^WRK_JSON ' "$out.wrk" | cut -d' ' -f2- >"$out.json"
}
check_same() { # url label: the first rows score as onnxruntime did (expected.json)
  python3 - "$1" "$2" "$work/bodies.jsonl" "$pdm/expected.json" <<'PY'
import json, sys, urllib.request
url, label, bodies, expected = sys.argv[1:]
first = json.load(open(expected))["holdout"]["first_rows"]
lines = open(bodies).read().splitlines()[:len(first)]
for i, line in enumerate(lines):
    req = urllib.request.Request(url + "/v1/models/pdm-failure:predict", data=line.encode(),
                                 headers={"Content-Type": "application/json"})
    p = json.load(urllib.request.urlopen(req))["predictions"][0]
    assert p["label"] == first[i]["label"], (label, i, p, first[i])
    assert all(abs(a - b) <= 1e-5 for a, b in zip(p["probabilities"], first[i]["probabilities"])), (label, i, p)
print(f"{label}: the first {len(lines)} rows agree with onnxruntime's expected.json")
PY
}
servers="agent gthread8 gthread2 sync"
for round in $(seq 1 "$rounds"); do
  for label in $servers $([ "$flask_dev" = 1 ] && [ "$round" = 1 ] && echo flask-dev); do
    port=$(free_port)
    start_server "$label" "$port"
    [ "$round" = 1 ] && check_same "http://127.0.0.1:$port" "$label"
    run_wrk "$label" "$round" "http://127.0.0.1:$port"
    if [ "$label" = agent ]; then
      sleep 15 # idle again: tokio's idle blocking threads exit after 10 s
      awk '/^(VmRSS|VmHWM|Threads):/ {printf "%s %s ", $1, $2} END {print ""}' \
        "/proc/$server_pid/status" >"$work/agent.$round.mem"
    fi
    kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
    echo "round $round: $label: $(grep -E '^Requests/sec' "$work/$label.$round.wrk" | tr -s ' '), p99 $(grep -E '^ +99%' "$work/$label.$round.wrk" | tr -s ' ' | cut -d' ' -f3)" >&2
  done
done
echo "$(cut -d' ' -f1-3 /proc/loadavg)" >"$work/load_end"

# --- the table ----------------------------------------------------------------------------
python3 - "$work" "$conns" "$duration" "$rounds" <<'PY'
import glob, json, os, statistics, sys
work, conns, duration, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rd = lambda f: open(os.path.join(work, f)).read().strip()  # noqa: E731
names = {
    "agent": "edge-agent run",
    "gthread8": "Flask+ORT, gunicorn -w 2 -k gthread --threads 8",
    "gthread2": "Flask+ORT, gunicorn -w 2 -k gthread --threads 2",
    "sync": "Flask+ORT, gunicorn -w 2 -k sync",
    "flask-dev": "Flask+ORT, Flask dev server (threaded, 1 process)",
}
res = {}
for label in names:
    rs = [json.loads(rd(f"{label}.{r}.json")) for r in range(1, rounds + 1)
          if os.path.exists(os.path.join(work, f"{label}.{r}.json"))]
    if not rs:
        continue
    for r in rs:
        bad = r["non2xx"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
        if bad:
            print(f"WARNING: {label}: {bad} failed requests: {r}")
    med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
    loads = [rd(f"{label}.{r}.load") for r in range(1, len(rs) + 1)]
    res[label] = dict(n=len(rs), rps=med("rps"), p50=med("p50_us") / 1000, p90=med("p90_us") / 1000,
                      p99=med("p99_us") / 1000, rps_all=[round(r["rps"]) for r in rs],
                      p99_all=[round(r["p99_us"] / 1000, 2) for r in rs], loads=loads)
print(f"\n## 1. single-row POST /v1/models/pdm-failure:predict, {conns} connections, "
      f"{duration} s per run (wrk -t2), median of rounds\n")
print("| server | rounds | requests/s | p50 ms | p90 ms | p99 ms | requests/s per round | p99 ms per round | 1-min load before each |")
print("|---|---:|---:|---:|---:|---:|---|---|---|")
for label, r in res.items():
    print(f"| {names[label]} | {r['n']} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p90']:.2f} | {r['p99']:.2f} | "
          f"{', '.join(map(str, r['rps_all']))} | {', '.join(map(str, r['p99_all']))} | {', '.join(r['loads'])} |")
a = res["agent"]
peers = [l for l in ("gthread8", "gthread2", "sync") if l in res]
print("\n| edge-agent vs | throughput ratio (target >= 10) | p99 ratio (target <= 0.1) |")
print("|---|---:|---:|")
for l in peers + (["flask-dev"] if "flask-dev" in res else []):
    print(f"| {names[l]} | {a['rps'] / res[l]['rps']:.1f}x | {a['p99'] / res[l]['p99']:.3f} |")
best_rps = max(peers, key=lambda l: res[l]["rps"])
best_p99 = min(peers, key=lambda l: res[l]["p99"])
t = a["rps"] / res[best_rps]["rps"]
q = a["p99"] / res[best_p99]["p99"]
print(f"\nagainst the strongest gunicorn peer on each metric:")
print(f"- throughput {t:.1f}x the best peer ({names[best_rps]}): {'met' if t >= 10 else 'NOT met'}")
print(f"- p99 {q:.3f} of the best peer's ({names[best_p99]}): {'met' if q <= 0.1 else 'NOT met'}")
pdm, big = json.loads(rd("pdm_ready.json")), json.loads(rd("big_ready.json"))
print(f"\n## 2. idle RSS, example model loaded\n")
print(f"{pdm['idle_s']:.0f} s after READY=1: VmRSS {pdm['rss_kb']} kB = {pdm['rss_kb'] * 1024 / 1e6:.1f} MB "
      f"(peak VmHWM {pdm['hwm_kb']} kB, {pdm['threads']} threads); target <= 24 MB: "
      f"{'met' if pdm['rss_kb'] * 1024 <= 24e6 else 'NOT met'}")
mems = []
for f in sorted(glob.glob(os.path.join(work, "agent.*.mem"))):
    m = dict(zip(*[iter(rd(f).replace(":", "").split())] * 2))
    mems.append((int(m["VmRSS"]), int(m["VmHWM"]), int(m["Threads"])))
if mems:
    worst = max(m[0] for m in mems)
    print("idle again 15 s after each load run: " + "; ".join(
        f"VmRSS {r} kB = {r * 1024 / 1e6:.1f} MB (VmHWM {h} kB, {t} threads)" for r, h, t in mems)
        + f"; target <= 24 MB: {'met' if worst * 1024 <= 24e6 else 'NOT met'}")
print("\n## 3. process start -> ready\n")
print("| model | runs | READY=1 median ms | max ms | /v2/health/ready 200 median ms | max ms |")
print("|---|---:|---:|---:|---:|---:|")
size = os.path.getsize(os.path.join(work, "big.onnx"))
for name, r in [("example pdm-failure (107 KB)", pdm),
                (f"RandomForest 180 trees ({size / 1e6:.2f} MB)", big)]:
    print(f"| {name} | {r['runs']} | {r['notify_median_ms']} | {r['notify_max_ms']} | "
          f"{r['http_ready_median_ms']} | {r['http_ready_max_ms']} |")
print(f"\n~1 MB model, every run (READY=1, ms): {big['notify_ms']}")
ok = big["notify_max_ms"] <= 1000 and big["http_ready_max_ms"] <= 1000
print(f"target <= 1 s: {'met' if ok else 'NOT met'}")
print(f"\nload average (1/5/15 min): before measuring {rd('load_start')}, after {rd('load_end')}; "
      f"wrk shares the {os.cpu_count()} cores with the server under test")
PY
