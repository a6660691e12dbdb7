#!/usr/bin/env bash
# Replay benchmark: a backlog of RECORDS records (default 200000) of RECORD_BYTES bytes
# (default 200) in the sled outbox, synced to Mosquitto on loopback until the in-process
# fleet ingest stored and acknowledged all of them; peer in the same run: a plain rumqttc
# QoS 1 publisher of the same number of messages (one per publish) to the same broker.
#
# Usage: bash agent/benches/replay.sh [RECORDS] [RECORD_BYTES]
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v mosquitto >/dev/null || { echo "mosquitto is required (apt-get install mosquitto)" >&2; exit 1; }
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "mosquitto: $(mosquitto -h 2>/dev/null | head -1)"
exec cargo bench -q -p edge-agent --bench replay -- "${1:-200000}" "${2:-200}"
