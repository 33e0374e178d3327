#!/usr/bin/env bash
# The project's benchmark driver: caching DNS servers side by side on one machine, in one run,
# on workloads shaped like a Kubernetes node-local cache (see bench/README.md).
#
#   bench/run.sh setup                      install dnsperf, knot, unbound, dnsmasq, kresd, pdns-recursor
#   bench/run.sh list                       the peers in the peers file
#   bench/run.sh check [-p PEERS]           start each peer, show its answers, stop it
#   bench/run.sh [run] [-p PEERS] [-w WORKLOADS] [-r ROUNDS] [-o OUTDIR]
#
#   -p  comma-separated peers (default unbound-1t,node-local-dns-1t); the first is the
#       reference for ratios in summary.md
#   -w  hot,search,miss (default all three)   -r  interleaved rounds (default 3)
#
# Environment (defaults in brackets):
#   SRV_QUOTA [unset]   cap each server at this % of one core (cgroup cpu.max, or the v1
#                       cpu controller's CFS quota; 10 ms period), e.g. 50
#   GEN_CPU [0] UP_CPU [0] SRV_CPUS_1T [1] SRV_CPUS_2T [0,1]   pinning (taskset)
#   CLIENTS [20] OUTSTANDING [100] SAT_SECS [10] FIXED_SECS [5]
#   FIXED_QPS_hot [20000] FIXED_QPS_search [20000] FIXED_QPS_miss [5000]
#   NLD_BIN [target/release/node-local-dns-resolver]   PEERS_FILE [bench/peers.conf]
#   BENCH_DATA [~/.cache/node-local-dns-bench]: zones, queries, run dirs, results
#
# Traffic stays on 127.0.0.0/8. Every process it starts runs in a cgroup of its own, and
# only those cgroups' processes are stopped (by PID), also on Ctrl-C and SIGTERM.
set -uo pipefail

BENCH=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$BENCH")
DATA=${BENCH_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/node-local-dns-bench}
PEERS_FILE=${PEERS_FILE:-$BENCH/peers.conf}
NLD_BIN=${NLD_BIN:-$REPO/target/release/node-local-dns-resolver}
UPSTREAM=127.0.0.2
GEN_CPU=${GEN_CPU:-0}; UP_CPU=${UP_CPU:-0}; SRV_CPUS_1T=${SRV_CPUS_1T:-1}; SRV_CPUS_2T=${SRV_CPUS_2T:-0,1}
CLIENTS=${CLIENTS:-20}; OUTSTANDING=${OUTSTANDING:-100}
SAT_SECS=${SAT_SECS:-10}; FIXED_SECS=${FIXED_SECS:-5}
FIXED_QPS_hot=${FIXED_QPS_hot:-20000}; FIXED_QPS_search=${FIXED_QPS_search:-20000}; FIXED_QPS_miss=${FIXED_QPS_miss:-5000}
HZ=$(getconf CLK_TCK)

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------- cgroups: one per process tree the driver starts ----------
CG_BASE=nld-bench-$$
CREATED_CGROUPS=()
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
  CG_VERSION=2
else
  CG_VERSION=1
fi

cg_dirs() { # NAME -> the directories the group has (v1: cpu and cpuacct hierarchies)
  if [[ $CG_VERSION == 2 ]]; then
    echo "/sys/fs/cgroup/$CG_BASE/$1"
  else
    echo "/sys/fs/cgroup/cpu/$CG_BASE/$1 /sys/fs/cgroup/cpuacct/$CG_BASE/$1"
  fi
}
cg_cpu_dir() { local d; read -r d _ <<<"$(cg_dirs "$1")"; echo "$d"; }

cg_create() { # NAME
  local d
  if [[ $CG_VERSION == 2 && ! -d /sys/fs/cgroup/$CG_BASE ]]; then
    grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control || echo +cpu >/sys/fs/cgroup/cgroup.subtree_control ||
      die "cannot enable the cpu controller in /sys/fs/cgroup"
    mkdir "/sys/fs/cgroup/$CG_BASE" && echo +cpu >"/sys/fs/cgroup/$CG_BASE/cgroup.subtree_control" ||
      die "cannot create /sys/fs/cgroup/$CG_BASE"
  fi
  for d in $(cg_dirs "$1"); do mkdir -p "$d" || die "cannot create cgroup $d"; done
  CREATED_CGROUPS+=("$1")
}

cg_quota() { # NAME PERCENT_OF_ONE_CORE
  local d; d=$(cg_cpu_dir "$1")
  if [[ $CG_VERSION == 2 ]]; then
    echo "$(($2 * 100)) 10000" >"$d/cpu.max"
  else
    echo 10000 >"$d/cpu.cfs_period_us" && echo $(($2 * 100)) >"$d/cpu.cfs_quota_us"
  fi
}

cg_usage_us() { # NAME -> CPU time of every task that ran in the group, microseconds
  if [[ $CG_VERSION == 2 ]]; then
    awk '$1 == "usage_usec" { print $2 }' "$(cg_cpu_dir "$1")/cpu.stat"
  else
    local d; read -r _ d <<<"$(cg_dirs "$1")"
    echo $(($(cat "$d/cpuacct.usage") / 1000))
  fi
}

cg_throttled() { awk '$1 == "nr_throttled" { print $2 }' "$(cg_cpu_dir "$1")/cpu.stat"; }

cg_pids() { cat "$(cg_cpu_dir "$1")/cgroup.procs" 2>/dev/null; }

cg_rss_mib() { # NAME -> resident memory of the group's processes
  local kib=0 p r
  for p in $(cg_pids "$1"); do
    [[ $(cat "/proc/$p/comm" 2>/dev/null) == bash ]] && continue   # the launcher, not the server
    r=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$p/status" 2>/dev/null)
    kib=$((kib + ${r:-0}))
  done
  awk -v k="$kib" 'BEGIN { printf "%.1f", k / 1024 }'
}

cg_stop() { # NAME: SIGTERM to the group's processes, SIGKILL after 5 s, remove the group
  local p i d
  for p in $(cg_pids "$1"); do kill -TERM "$p" 2>/dev/null; done
  for i in $(seq 50); do [[ -z $(cg_pids "$1") ]] && break; sleep 0.1; done
  for p in $(cg_pids "$1"); do log "$1: pid $p ignored SIGTERM, SIGKILL"; kill -KILL "$p" 2>/dev/null; done
  for i in $(seq 20); do [[ -z $(cg_pids "$1") ]] && break; sleep 0.1; done
  for d in $(cg_dirs "$1"); do rmdir "$d" 2>/dev/null; done
}

# start_in_cgroup NAME CPUS LOG COMMAND: runs COMMAND in the background, already inside the
# group when it execs, so every process it forks is accounted and stopped with the group.
start_in_cgroup() {
  local name=$1 cpus=$2 logf=$3; shift 3
  local procs=() d
  for d in $(cg_dirs "$name"); do procs+=("$d/cgroup.procs"); done
  bash -c 'for f in "${@:3}"; do echo $$ >"$f" || exit 1; done; exec taskset -c "$1" bash -c "$2"' \
    _ "$cpus" "$*" "${procs[@]}" >>"$logf" 2>&1 </dev/null &
}

GEN_PID=""
cleanup() {
  [[ -n $GEN_PID ]] && kill -TERM "$GEN_PID" 2>/dev/null
  local g
  for g in "${CREATED_CGROUPS[@]}"; do cg_stop "$g"; done
  if [[ $CG_VERSION == 2 ]]; then
    rmdir "/sys/fs/cgroup/$CG_BASE" 2>/dev/null
  else
    rmdir "/sys/fs/cgroup/cpu/$CG_BASE" "/sys/fs/cgroup/cpuacct/$CG_BASE" 2>/dev/null
  fi
  return 0
}

# ---------- peers ----------
P_NAME=(); P_ADDR=(); P_THREADS=(); P_CMD=()
load_peers() { # FILTER (comma-separated, empty = all)
  local name addr threads cmd found
  while read -r name addr threads cmd; do
    [[ -z $name || $name == \#* ]] && continue
    [[ -n $1 && ",$1," != *",$name,"* ]] && continue
    P_NAME+=("$name"); P_ADDR+=("$addr"); P_THREADS+=("$threads"); P_CMD+=("$cmd")
  done <"$PEERS_FILE"
  for found in ${1//,/ }; do
    [[ " ${P_NAME[*]} " == *" $found "* ]] || die "peer $found is not in $PEERS_FILE (bench/run.sh list)"
  done
  [[ ${#P_NAME[@]} -gt 0 ]] || die "no peers selected"
}

# Writes RUN/launch.sh: the peer's command with its variables and `render`.
write_launcher() { # RUN ADDR THREADS COMMAND
  local run=$1
  rm -rf "$run" && mkdir -p "$run"
  {
    echo '#!/usr/bin/env bash'
    printf 'export ADDR=%q THREADS=%q UPSTREAM=%q RUN=%q DATA=%q NLD_BIN=%q CONF=%q\n' \
      "$2" "$3" "$UPSTREAM" "$run" "$DATA" "$NLD_BIN" "$BENCH/conf"
    echo 'render() { envsubst <"$CONF/$1.in" >"$RUN/$1" && echo "$RUN/$1"; }'
    echo 'cd "$RUN"'
    echo "$4"
  } >"$run/launch.sh"
}

answers() { # ADDR NAME TYPE
  dig @"$1" +time=1 +tries=1 +short "$2" "$3" 2>/dev/null
}
wait_answering() { # ADDR SECONDS
  local i
  for i in $(seq $(($2 * 5))); do
    answers "$1" web.default.svc.cluster.local A | grep -q '^10\.' && return 0
    sleep 0.2
  done
  return 1
}

start_upstream() {
  cg_create upstream
  write_launcher "$DATA/run/upstream" "$UPSTREAM" 1 'knotd -c $(render knot.conf)'
  start_in_cgroup upstream "$UP_CPU" "$OUT/logs/upstream.log" "$(printf '%q ' bash "$DATA/run/upstream/launch.sh")"
  wait_answering "$UPSTREAM" 10 || die "the upstream knotd did not answer, see $OUT/logs/upstream.log"
  log "upstream knotd on $UPSTREAM:53 (CPU $UP_CPU)"
}

SRV=""   # cgroup name of the running peer
RSS_IDLE=""
start_peer() { # INDEX
  local i=$1 cpus=$SRV_CPUS_1T
  [[ ${P_THREADS[$i]} -ge 2 ]] && cpus=$SRV_CPUS_2T
  SRV=srv-${P_NAME[$i]}
  cg_create "$SRV"
  [[ -n ${SRV_QUOTA:-} ]] && cg_quota "$SRV" "$SRV_QUOTA"
  write_launcher "$DATA/run/${P_NAME[$i]}" "${P_ADDR[$i]}" "${P_THREADS[$i]}" "${P_CMD[$i]}"
  start_in_cgroup "$SRV" "$cpus" "$OUT/logs/${P_NAME[$i]}.log" "$(printf '%q ' bash "$DATA/run/${P_NAME[$i]}/launch.sh")"
  if ! wait_answering "${P_ADDR[$i]}" 20; then
    log "${P_NAME[$i]} did not answer, see $OUT/logs/${P_NAME[$i]}.log"
    stop_peer
    return 1
  fi
  RSS_IDLE=$(cg_rss_mib "$SRV")
}
stop_peer() {
  [[ -n $SRV ]] || return 0
  cg_stop "$SRV"
  local keep=() g
  for g in "${CREATED_CGROUPS[@]}"; do [[ $g != "$SRV" ]] && keep+=("$g"); done
  CREATED_CGROUPS=("${keep[@]}")
  SRV=""
}

# ---------- load ----------
# dnsperf in the generator's cgroup, in the background so that a signal is handled at once.
generate() { # ADDR OUTFILE DNSPERF_ARGS...
  local addr=$1 out=$2; shift 2
  start_in_cgroup gen "$GEN_CPU" "$out" "$(printf '%q ' dnsperf -s "$addr" -c "$CLIENTS" -q "$OUTSTANDING" -t 2 "$@")"
  GEN_PID=$!
  wait "$GEN_PID"
  GEN_PID=""
}

busy_us() { # all CPUs' non-idle time since boot, microseconds
  awk -v hz="$HZ" '$1 == "cpu" { printf "%.0f", ($2 + $3 + $4 + $7 + $8 + $9) * 1000000 / hz }' /proc/stat
}

RUNS=""
measure() { # INDEX WORKLOAD KIND ROUND DNSPERF_ARGS...
  local i=$1 wl=$2 kind=$3 round=$4; shift 4
  local tag=${P_NAME[$i]}.$wl.$kind.$round raw s0 s1 g0 g1 u0 u1 b0 b1 t0 t1 res secs
  raw=$OUT/raw/$tag.txt
  s0=$(cg_usage_us "$SRV"); g0=$(cg_usage_us gen); u0=$(cg_usage_us upstream); b0=$(busy_us); t0=$(cg_throttled "$SRV")
  generate "${P_ADDR[$i]}" "$raw" -d "$DATA/queries/$wl.txt" "$@"
  s1=$(cg_usage_us "$SRV"); g1=$(cg_usage_us gen); u1=$(cg_usage_us upstream); b1=$(busy_us); t1=$(cg_throttled "$SRV")
  res=$(python3 "$BENCH/report.py" parse "$raw")
  grep -v '^> ' "$raw" >"$raw.tmp" && mv "$raw.tmp" "$raw"   # keep the summary, drop per-query lines
  IFS=, read -r _ _ _ _ secs _ <<<"$res"
  local cpu
  cpu=$(awk -v s=$((s1 - s0)) -v g=$((g1 - g0)) -v u=$((u1 - u0)) -v b=$((b1 - b0)) -v t="$secs" 'BEGIN {
      if (t <= 0) t = 1; w = t * 10000; o = (b - s - g - u) / w; if (o < 0) o = 0
      printf "%d,%.1f,%.1f,%.1f,%.1f", s, s / w, g / w, u / w, o }')
  echo "${P_NAME[$i]},${P_THREADS[$i]},$wl,$kind,$round,$res,$cpu,$((t1 - t0)),$RSS_IDLE,$(cg_rss_mib "$SRV")" >>"$RUNS"
  IFS=, read -r q _ _ lost _ _ p50 p99 _ <<<"$res"
  log "  $tag: $q q/s, lost $lost %, p50/p99 $p50/$p99 ms, CPU us,srv,gen,up,other % $cpu, throttled $((t1 - t0))"
}

warm_up() { # INDEX WORKLOAD
  generate "${P_ADDR[$1]}" /dev/null -d "$DATA/queries/$2.txt" -n 2 -Q 5000
  generate "${P_ADDR[$1]}" /dev/null -d "$DATA/queries/$2.txt" -l 3
}

bench_peer() { # INDEX WORKLOAD ROUND
  local i=$1 wl=$2 round=$3 rate=FIXED_QPS_$2
  log "round $round: ${P_NAME[$i]} / $wl"
  case $wl in
    hot|search)
      start_peer "$i" || return 0
      warm_up "$i" "$wl"
      measure "$i" "$wl" sat "$round" -l "$SAT_SECS"
      measure "$i" "$wl" fixed "$round" -l "$FIXED_SECS" -Q "${!rate}" -v
      stop_peer ;;
    miss)   # a cold cache for each run, every line sent once
      start_peer "$i" || return 0
      measure "$i" "$wl" sat "$round" -l "$SAT_SECS" -n 1
      stop_peer
      start_peer "$i" || return 0
      measure "$i" "$wl" fixed "$round" -l "$FIXED_SECS" -n 1 -Q "${!rate}" -v
      stop_peer ;;
    *) die "unknown workload $wl (hot, search, miss)" ;;
  esac
}

prepare_data() {
  mkdir -p "$DATA"
  [[ -f $DATA/zones/example.net.zone ]] || python3 "$BENCH/workload.py" zones "$DATA/zones" || die "generating zones"
  [[ -f $DATA/queries/miss.txt ]] || python3 "$BENCH/workload.py" queries "$DATA/queries" || die "generating queries"
}

check_tools() {
  local t
  for t in dnsperf dig knotd envsubst taskset python3; do
    command -v "$t" >/dev/null || die "$t not found: run bench/run.sh setup"
  done
  [[ $(id -u) == 0 ]] || die "run as root: the driver makes cgroups and binds port 53"
}

# ---------- commands ----------
setup() {
  apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsperf bind9-dnsutils knot unbound \
      dnsmasq-base knot-resolver pdns-recursor gettext-base python3 util-linux procps
}

check_peers() {
  local i q
  for i in "${!P_NAME[@]}"; do
    start_peer "$i" || continue
    log "${P_NAME[$i]} answers; processes: $(for p in $(cg_pids "$SRV"); do printf '%s ' "$(cat /proc/$p/comm 2>/dev/null)"; done)"
    for q in "web.default.svc.cluster.local A" "host7.example.com AAAA" \
             "host7.example.com.default.svc.cluster.local A" "abc.example.net AAAA"; do
      # twice: a miss, then a hit; the two must agree, and agree across peers
      echo "## $q"
      dig @"${P_ADDR[$i]}" +noall +comments +answer +authority $q | grep -E 'status:|[[:space:]]IN[[:space:]]' |
        sed -E 's/id: [0-9]+/id: N/; s/^([^;[:space:]]+)[[:space:]]+[0-9]+[[:space:]]+IN[[:space:]]+/\1 TTL IN /'
      dig @"${P_ADDR[$i]}" +noall +answer $q | sed -E 's/^([^[:space:]]+)[[:space:]]+[0-9]+[[:space:]]+IN[[:space:]]+/\1 TTL IN /'
    done >"$OUT/answers.${P_NAME[$i]}.txt"
    log "answers in $OUT/answers.${P_NAME[$i]}.txt"
    stop_peer
  done
}

run_rounds() { # ROUNDS WORKLOADS
  local n=${#P_NAME[@]} round k i wl
  RUNS=$OUT/runs.csv
  echo "peer,threads,workload,kind,round,qps,sent,completed,lost_pct,seconds,avg_ms,p50_ms,p99_ms,rcodes,srv_cpu_us,srv_cpu_pct,gen_cpu_pct,up_cpu_pct,other_cpu_pct,throttled,rss_idle_mib,rss_mib" >"$RUNS"
  {
    echo "run $(date -u +%Y-%m-%dT%H:%MZ); $(nproc) CPUs, kernel $(uname -r), cgroup v$CG_VERSION"
    echo "peers ${P_NAME[*]}; workloads $2; rounds $1; SRV_QUOTA=${SRV_QUOTA:-none}"
    echo "GEN_CPU=$GEN_CPU UP_CPU=$UP_CPU SRV_CPUS_1T=$SRV_CPUS_1T SRV_CPUS_2T=$SRV_CPUS_2T CLIENTS=$CLIENTS OUTSTANDING=$OUTSTANDING SAT_SECS=$SAT_SECS FIXED_SECS=$FIXED_SECS"
    echo "fixed rates hot/search/miss $FIXED_QPS_hot/$FIXED_QPS_search/$FIXED_QPS_miss; $(dnsperf -h 2>&1 | grep -m1 -i version)"
    echo "repo $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); NLD_BIN=$NLD_BIN"
  } >"$OUT/meta.txt"
  cp "$PEERS_FILE" "$OUT/peers.conf"
  for round in $(seq "$1"); do      # each round visits every peer, starting one further on
    for k in $(seq 0 $((n - 1))); do
      i=$(((k + round - 1) % n))
      for wl in ${2//,/ }; do bench_peer "$i" "$wl" "$round"; done
    done
  done
  { cat "$OUT/meta.txt"; echo; python3 "$BENCH/report.py" summary "$RUNS" "${P_NAME[0]}"; } >"$OUT/summary.md"
  cat "$OUT/summary.md"
  log "results in $OUT"
}

main() {
  local cmd=run peers=unbound-1t,node-local-dns-1t workloads=hot,search,miss rounds=3 o
  OUT=""
  case ${1:-} in setup|list|check|run) cmd=$1; shift ;; esac
  while getopts "p:w:r:o:h" o; do
    case $o in
      p) peers=$OPTARG ;; w) workloads=$OPTARG ;; r) rounds=$OPTARG ;; o) OUT=$OPTARG ;;
      *) sed -n '2,27p' "$0"; exit 0 ;;
    esac
  done
  [[ $rounds =~ ^[1-9][0-9]*$ ]] || die "-r: rounds must be a positive number, got '$rounds'"
  [[ -z ${SRV_QUOTA:-} || $SRV_QUOTA =~ ^[1-9][0-9]*$ ]] || die "SRV_QUOTA: percent of one core expected, got '$SRV_QUOTA'"
  case $cmd in
    setup) setup; return ;;
    list) load_peers ""; for o in "${!P_NAME[@]}"; do printf '%-20s %-12s %s thread(s)\n' "${P_NAME[$o]}" "${P_ADDR[$o]}" "${P_THREADS[$o]}"; done; return ;;
  esac
  [[ $cmd == check && $peers == unbound-1t,node-local-dns-1t ]] && peers=""
  load_peers "$peers"
  check_tools
  if [[ " ${P_CMD[*]} " == *NLD_BIN* && ! -x $NLD_BIN ]]; then
    die "NLD_BIN=$NLD_BIN is not built: cargo build --release -p node-local-dns-resolver"
  fi
  OUT=${OUT:-$DATA/results/$(date -u +%Y%m%d-%H%M%S)}
  mkdir -p "$OUT/raw" "$OUT/logs"
  trap cleanup EXIT
  trap 'log "interrupted: stopping everything this run started"; exit 130' INT TERM
  prepare_data
  cg_create gen
  start_upstream
  if [[ $cmd == check ]]; then check_peers; else run_rounds "$rounds" "$workloads"; fi
}

main "$@"
