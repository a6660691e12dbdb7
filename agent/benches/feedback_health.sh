#!/usr/bin/env bash
# Feedback log and health sampler: record/apply cost per row against a plain
# Mutex<HashMap<String, _>> insert (the peer), summary time, RSS of a full 100,000-entry log,
# SystemSampler::sample against reading /proc directly, EwmaChart::observe.
# One command: `bash agent/benches/feedback_health.sh` (release build, about 10 s after it).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo run --release -q -p edge-agent --example feedback_health_bench
