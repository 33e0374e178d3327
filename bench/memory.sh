#!/usr/bin/env bash
# Memory per cached record: ours against unbound, in the same run.
#
# A knotd on 127.0.60.1 serves a wildcard zone; each server caches N distinct names asked once
# (dnsperf, paced), and the script reports RSS idle, RSS with the entries, and the bytes each
# cached record costs above idle, beside the size of the answer itself (what any cache has to
# keep). Runs each server in turn on loopback only; stops what it started, by PID, also on
# Ctrl-C.
#
#   bash bench/memory.sh [N] [a|txt]      # default 100000 names, A answers
#     a:   one A record per answer (~50-byte answers, the common case)
#     txt: one ~1 KiB TXT record per answer (the large-answer case the memory limit is sized for)
#   NLD_BIN=path/to/node-local-dns-resolver (default target/release/node-local-dns-resolver)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
KIND=${2:-a}
NLD_BIN=${NLD_BIN:-target/release/node-local-dns-resolver}
for tool in knotd dnsperf unbound dig; do
    command -v "$tool" >/dev/null || { echo "bench/memory.sh: $tool missing (bash bench/run.sh setup)" >&2; exit 1; }
done
[ -x "$NLD_BIN" ] || { echo "bench/memory.sh: $NLD_BIN missing (cargo build --release -p node-local-dns-resolver)" >&2; exit 1; }

D=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

AUTH=127.0.60.1
case $KIND in
    a) RECORD='* IN A 10.1.2.3' ;;
    txt) RECORD="* IN TXT $(python3 -c 'print(" ".join(["\"" + "x" * 200 + "\""] * 5))')" ;;
    *) echo "bench/memory.sh: answer kind '$KIND': use a or txt" >&2; exit 2 ;;
esac
cat > "$D/wild.zone" <<Z
\$TTL 3600
@ IN SOA ns hostmaster 1 3600 600 86400 60
@ IN NS ns
ns IN A $AUTH
$RECORD
Z
cat > "$D/knot.conf" <<K
server:
  listen: $AUTH@53
  rundir: $D
database:
  storage: $D
zone:
  - domain: wild.example
    file: $D/wild.zone
K
knotd -c "$D/knot.conf" >/dev/null 2>&1 &
PIDS+=($!)
qtype=A; [ "$KIND" = txt ] && qtype=TXT
python3 -c "
for i in range($N): print(f'n{i}.wild.example $qtype')" > "$D/q.txt"
sleep 1
answer_size=$(dig +noedns +tries=1 +time=2 @"$AUTH" n0.wild.example "$qtype" | awk '/MSG SIZE/{print $NF}')

rss_kib() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }

# measure NAME ADDR COMMAND...: idle RSS, fill, RSS with entries; prints one table row.
measure() {
    local name=$1 addr=$2
    shift 2
    "$@" >"$D/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 50); do
        dig +short +tries=1 +time=1 @"$addr" ns.wild.example A >/dev/null 2>&1 && break
        sleep 0.1
    done
    sleep 1
    local idle; idle=$(rss_kib "$pid")
    local out; out=$(dnsperf -s "$addr" -d "$D/q.txt" -Q 20000 -c 10 -n 1 -t 5 2>&1)
    local completed; completed=$(awk '/Queries completed/{print $3}' <<<"$out")
    grep -q "NOERROR $N " <<<"$out" || { echo "bench/memory.sh: $name did not answer all $N with NOERROR:" >&2; grep -E 'Response codes' <<<"$out" >&2; exit 1; }
    sleep 2
    local full; full=$(rss_kib "$pid")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    local per=$(( (full - idle) * 1024 / N ))
    awk -v n="$name" -v c="$completed" -v i="$idle" -v f="$full" -v p="$per" -v a="$answer_size" \
        'BEGIN { printf "| %s | %d | %.1f MiB | %.1f MiB | %d B | %d B |\n", n, c, i / 1024, f / 1024, p, p - a }'
}

cat > "$D/unbound.conf" <<U
server:
    interface: 127.0.60.2@53
    num-threads: 1
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "$D"
    pidfile: "$D/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 0
    do-ip6: no
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    module-config: "iterator"
    qname-minimisation: no
    minimal-responses: yes
    msg-cache-size: 1g
    rrset-cache-size: 1g
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: $AUTH@53
U

echo "$N distinct $qtype names, answers of $answer_size bytes (dig +noedns)"
echo
echo "| server | answered | RSS idle | RSS with entries | per record | beyond the answer |"
echo "|---|---|---|---|---|---|"
measure node-local-dns 127.0.60.3 "$NLD_BIN" --listen 127.0.60.3:53 --upstream "$AUTH:53" \
    --no-node-setup --cache-max-bytes 1GiB \
    --metrics-listen 127.0.60.3:9253 --health-listen 127.0.60.3:8080
measure unbound 127.0.60.2 unbound -d -c "$D/unbound.conf"
