#!/usr/bin/env bash
# Exact server CPU per answer at a fixed rate, from the scheduler's task clock (perf stat),
# next to utime+stime sampled in /proc clock ticks (10 ms each, what the earlier external harness used).
#
#   [THREADS=2] resolver-daemon/bench/cpu-taskclock.sh [ROUNDS] [QPS] [WORKLOAD]
#
# Needs bench/run.sh set up and run once (its data dir holds the query files and the
# rendered knotd config), perf, and the release binary in target/release. Same placement as
# the driver: generator and upstream on CPU 0, server on CPU 1. Peers: unbound, ours.
# THREADS=2 is the driver's 2t placement: the server on CPUs 0,1 (shared with the
# generator), unbound with 2 threads, ours with --threads auto (one pinned thread per CPU).
# WITH_KNOTD=1 adds authoritative knotd-auth (docs/design-facts.md §6's floor; run bench/run.sh with it
# once). Each line also gives the machine's function-call IPIs a second (cross-CPU wake-ups
# of an idle CPU), from /proc/interrupts, and the time the hypervisor stole from both vCPUs
# (task clock counts it as run time, ticks mostly do not: discard a round with much steal).
set -euo pipefail
ROUNDS=${1:-3}; QPS=${2:-20000}; WL=${3:-hot}; SECS=${SECS:-4}
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${NLD_BIN:-$HERE/../../target/release/node-local-dns-resolver}
DATA=${BENCH_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/node-local-dns-bench}
Q=$DATA/queries/$WL.txt
THREADS=${THREADS:-1}
case $THREADS in
  1) SRV_CPUS=1; OURS_THREADS=1 ;;
  2) SRV_CPUS=0,1; OURS_THREADS=auto ;;
  *) echo "THREADS is 1 or 2" >&2; exit 1 ;;
esac
UNBOUND_CONF=$DATA/run/unbound-${THREADS}t/unbound.conf
[[ -f $Q && -f $DATA/run/upstream/knot.conf && -f $UNBOUND_CONF ]] ||
  { echo "run bench/run.sh -p unbound-${THREADS}t -w $WL -r 1 first (it renders the configs this script reuses)" >&2; exit 1; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

taskset -c 0 knotd -c "$DATA/run/upstream/knot.conf" >/dev/null 2>&1 &
pids+=($!)
sleep 0.5

measure() { # NAME ADDR COMMAND...
  local name=$1 addr=$2; shift 2
  taskset -c "$SRV_CPUS" "$@" >/dev/null 2>&1 &
  local srv=$!
  pids+=("$srv")
  sleep 0.7
  taskset -c 0 dnsperf -s "$addr" -d "$Q" -n 3 -Q 5000 -c 20 >/dev/null 2>&1
  taskset -c 0 dnsperf -s "$addr" -d "$Q" -l $((SECS + 1)) -Q "$QPS" -c 20 >/dev/null 2>&1 &
  local gen=$!
  sleep 0.5
  local t0 t1 i0 i1 st0 st1
  t0=$(awk '{print $14 + $15}' "/proc/$srv/stat")
  i0=$(function_call_ipis); st0=$(steal_ticks)
  perf stat -x, -e task-clock,context-switches -p "$srv" -o "$SHM_OUT" -- sleep "$SECS"
  i1=$(function_call_ipis); st1=$(steal_ticks)
  t1=$(awk '{print $14 + $15}' "/proc/$srv/stat")
  wait "$gen"
  kill "$srv"; wait "$srv" 2>/dev/null || true
  awk -F, -v n="$name" -v q="$QPS" -v s="$SECS" -v ticks=$((t1 - t0)) -v ipis=$((i1 - i0)) -v steal=$((st1 - st0)) '
    $3 == "task-clock" { ms = $1 } $3 == "context-switches" { cs = $1 }
    END { printf "%-16s task-clock %5.1f %% of a core (%.2f us/answer), ticks %5.1f %%, %6.0f wake-ups/s, %6.0f IPIs/s, steal %4.1f %%\n",
                 n, ms / s / 10, ms * 1000 / (q * s), ticks / s, cs / s, ipis / s, steal / s }' "$SHM_OUT"
}

steal_ticks() { awk '$1 == "cpu" { print $9 }' /proc/stat; }

function_call_ipis() { awk '$1 == "CAL:" { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n }' /proc/interrupts; }

SHM_OUT=$(mktemp)
for _ in $(seq "$ROUNDS"); do
  measure unbound 127.0.0.10 unbound -d -c "$UNBOUND_CONF"
  if [[ ${WITH_KNOTD:-0} = 1 ]]; then
    measure knotd-auth 127.0.0.3 knotd -c "$DATA/run/knotd-auth/knot.conf"
  fi
  measure node-local-dns 127.0.0.15 "$BIN" --listen 127.0.0.15:53 --upstream 127.0.0.2:53 \
    --threads "$OURS_THREADS" --no-node-setup --metrics-listen 127.0.0.15:9253 --health-listen 127.0.0.15:8080
done
rm -f "$SHM_OUT"
