#!/usr/bin/env python3
"""Times a server from process start to ready, and its idle memory.

Starts COMMAND (with `{port}` replaced by a free loopback port) --runs times. Each run binds
a UNIX datagram socket, passes it as NOTIFY_SOCKET (as systemd does for a Type=notify unit)
and takes the time from just before the process is spawned until `READY=1` arrives; a
thread polls `GET http://127.0.0.1:{port}/v2/health/ready` every 2 ms from the same start
and takes the time of the first 200. With --idle S, the last run then stays idle S seconds
and the process's VmRSS / VmHWM (from /proc/PID/status) are read. The process is stopped
with SIGTERM after each run. Prints one JSON object.

    python3 agent/benches/ready_timer.py --runs 10 --idle 5 -- \
        ./target/release/edge-agent run --state-dir S --trust-root root.pub \
        --http-listen 127.0.0.1:{port}
"""

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll_ready(port, t0, result, stop):
    while not stop.is_set():
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/v2/health/ready")
            status = c.getresponse().status
            c.close()
            if status == 200:
                result.append(time.perf_counter() - t0)
                return
        except OSError:
            pass
        time.sleep(0.002)


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    return out


def one_run(cmd, idle, log):
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in cmd]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=path)
        http_t, stop = [], threading.Event()
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
        poller = threading.Thread(target=poll_ready, args=(port, t0, http_t, stop), daemon=True)
        poller.start()
        notify_t = None
        try:
            while notify_t is None:
                msg = sock.recv(4096).decode(errors="replace")
                if "READY=1" in msg.split("\n"):
                    notify_t = time.perf_counter() - t0
            poller.join(10)
            mem = None
            if idle:
                time.sleep(idle)
                mem = proc_status(proc.pid)
        finally:
            stop.set()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            sock.close()
        if proc.returncode not in (0, -signal.SIGTERM):
            sys.exit(f"ready_timer: {argv[0]} exited with {proc.returncode}")
        return notify_t, (http_t[0] if http_t else None), mem


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--idle", type=float, default=0, help="seconds idle before reading RSS")
    ap.add_argument("--log", default=os.devnull, help="append the server's stderr here")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    notify, httpr, mem = [], [], None
    with open(args.log, "ab") as log:
        for i in range(args.runs):
            last = i == args.runs - 1
            n, h, m = one_run(cmd, args.idle if last else 0, log)
            notify.append(n)
            if h is not None:
                httpr.append(h)
            if m:
                mem = m
    ms = lambda xs: [round(x * 1000, 1) for x in xs]  # noqa: E731
    out = {
        "runs": args.runs,
        "notify_ms": ms(notify),
        "notify_median_ms": round(statistics.median(notify) * 1000, 1),
        "notify_max_ms": round(max(notify) * 1000, 1),
        "http_ready_ms": ms(httpr),
        "http_ready_median_ms": round(statistics.median(httpr) * 1000, 1) if httpr else None,
        "http_ready_max_ms": round(max(httpr) * 1000, 1) if httpr else None,
    }
    if mem:
        out.update(idle_s=args.idle, rss_kb=mem["VmRSS"], hwm_kb=mem["VmHWM"],
                   threads=mem["Threads"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
