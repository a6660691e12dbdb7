#!/usr/bin/env bash
# Builds the host (x86_64) agent and fleet binaries with the size-optimised profile
# `release-small`, strips them and prints their sizes (bytes and MiB), plus the machine and date
# so the numbers can go into BENCHMARKS.md as they are.
#
#   cross/size.sh                 # release-small: edge-agent, fleet-server, fleetctl
#   cross/size.sh --with-release  # also the default `--release` edge-agent, stripped, to compare
#
# A size build runs fat LTO with one codegen unit over tract: expect several minutes on 2 cores.
# The binaries are copied to a temporary directory before stripping; target/ is left as built.
set -euo pipefail

cd "$(dirname "$0")/.."

with_release=0
for arg in "$@"; do
    case "$arg" in
        --with-release) with_release=1 ;;
        -h | --help)
            sed -n '2,9p' "$0"
            exit 0
            ;;
        *)
            echo "size.sh: unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

for tool in cargo strip stat; do
    command -v "$tool" >/dev/null || {
        echo "size.sh: $tool not found on PATH" >&2
        exit 1
    }
done

target_dir=${CARGO_TARGET_DIR:-target}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# report PROFILE BIN: strips a copy of target/PROFILE/BIN and prints one table row.
report() {
    local profile=$1 bin=$2
    local src="$target_dir/$profile/$bin"
    [[ -f "$src" ]] || {
        echo "size.sh: $src was not built" >&2
        exit 1
    }
    local raw stripped
    raw=$(stat -c %s "$src")
    cp "$src" "$work/$bin.$profile"
    strip --strip-all "$work/$bin.$profile"
    stripped=$(stat -c %s "$work/$bin.$profile")
    awk -v p="$profile" -v b="$bin" -v r="$raw" -v s="$stripped" 'BEGIN {
        printf "%-14s %-13s %12d %10.2f %12d\n", p, b, s, s / 1048576, r
    }'
}

echo "== building (profile release-small) =="
cargo build --locked --profile release-small -p edge-agent --bin edge-agent
cargo build --locked --profile release-small -p fleet-server --bin fleet-server --bin fleetctl
if [[ $with_release == 1 ]]; then
    echo "== building (profile release) =="
    cargo build --locked --release -p edge-agent --bin edge-agent
fi

echo
echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine: $(nproc) cores, $(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(uname -m)"
echo "rustc:   $(rustc --version)"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
echo
printf "%-14s %-13s %12s %10s %12s\n" profile binary "stripped B" "MiB" "as built B"
report release-small edge-agent
report release-small fleet-server
report release-small fleetctl
if [[ $with_release == 1 ]]; then
    report release edge-agent
fi
