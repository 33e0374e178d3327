#!/usr/bin/env bash
# Latency of cache hits when the daemon shares its CPU with a busy workload (a node full of
# pods): a nice-0 busy loop pinned to the daemon's CPU, dnsperf at a fixed rate on the other.
# Compares `--udp-slice 0` (the kernel's default slice) with the daemon's default (100us).
#
#   resolver-daemon/bench/busy-cpu-latency.sh [ROUNDS] [QPS] [WORKLOAD]
#
# Needs bench/run.sh set up and run once (its data dir holds the query files and the
# rendered knotd config) and the release binary. Placement as the driver: generator and
# upstream on CPU 0, server (and the busy loop) on CPU 1. Only processes it started are ended.
set -euo pipefail
ROUNDS=${1:-5}; QPS=${2:-5000}; WL=${3:-hot}; SECS=${SECS:-5}
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${NLD_BIN:-$HERE/../../target/release/node-local-dns-resolver}
DATA=${BENCH_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/node-local-dns-bench}
Q=$DATA/queries/$WL.txt
[[ -f $Q && -f $DATA/run/upstream/knot.conf ]] ||
  { echo "run bench/run.sh -p unbound-1t -w $WL -r 1 first (it renders the configs this script reuses)" >&2; exit 1; }
OUT=$(mktemp)

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -f "$OUT"; }
trap cleanup EXIT

taskset -c 0 knotd -c "$DATA/run/upstream/knot.conf" >/dev/null 2>&1 &
pids+=($!)
sleep 0.5

measure() { # SLICE
  taskset -c 1 "$BIN" --listen 127.0.0.15:53 --upstream 127.0.0.2:53 --no-node-setup \
    --metrics-listen 127.0.0.15:9253 --health-listen 127.0.0.15:8080 --udp-slice "$1" >/dev/null 2>&1 &
  local srv=$!
  pids+=("$srv")
  sleep 0.7
  taskset -c 0 dnsperf -s 127.0.0.15 -d "$Q" -n 2 -Q 5000 -c 20 >/dev/null 2>&1
  taskset -c 1 sh -c 'while :; do :; done' &
  local hog=$!
  pids+=("$hog")
  sleep 0.3
  taskset -c 0 dnsperf -s 127.0.0.15 -d "$Q" -l "$SECS" -Q "$QPS" -c 20 -v >"$OUT" 2>&1
  kill "$hog" "$srv"; wait "$hog" "$srv" 2>/dev/null || true
  python3 - "$1" "$OUT" <<'PY'
import sys
lat = sorted(float(l.split()[-1]) * 1000 for l in open(sys.argv[2]) if l.startswith('> '))
n = len(lat)
slow = sum(1 for x in lat if x > 0.5)
print(f"--udp-slice {sys.argv[1]:6s} answers {n}  > 0.5 ms {slow:5d}  p50 {lat[n // 2]:.3f}  "
      f"p90 {lat[int(n * .9)]:.3f}  p99 {lat[int(n * .99)]:.3f}  max {lat[-1]:.3f} ms")
PY
}

for _ in $(seq "$ROUNDS"); do
  measure 0
  measure 100us
done
