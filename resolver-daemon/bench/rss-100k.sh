#!/usr/bin/env bash
# RSS of the daemon idle and after caching 100k distinct positive answers (wildcard zone).
set -euo pipefail
D=$(mktemp -d); trap 'kill $KP $DP 2>/dev/null; wait 2>/dev/null; rm -rf $D' EXIT
cat > $D/wild.zone <<Z
\$TTL 300
@ IN SOA ns hostmaster 1 3600 600 86400 60
@ IN NS ns
ns IN A 127.0.50.1
* IN A 10.1.2.3
Z
cat > $D/knot.conf <<K
server:
  listen: 127.0.50.1@53
  rundir: $D
database:
  storage: $D
zone:
  - domain: wild.test
    file: $D/wild.zone
K
knotd -c $D/knot.conf >/dev/null 2>&1 & KP=$!
BIN=${1:-target/release/node-local-dns-resolver}
$BIN --listen 127.0.50.2:53 --upstream 127.0.50.1:53 --no-node-setup --metrics-listen 127.0.50.2:9253 --health-listen 127.0.50.2:8080 >/dev/null 2>&1 & DP=$!
sleep 1.5
echo "idle RSS: $(awk '/VmRSS/{print $2/1024 " MiB"}' /proc/$DP/status)"
python3 -c "
for i in range(100000): print(f'n{i}.wild.test A')" > $D/q.txt
dnsperf -s 127.0.50.2 -d $D/q.txt -Q 20000 -c 10 -n 1 -t 2 | grep -E 'Queries (sent|completed)'
curl -s 127.0.50.2:9253/metrics | grep -E '^coredns_cache_entries' || true
echo "RSS with the entries: $(awk '/VmRSS/{print $2/1024 " MiB"}' /proc/$DP/status)"
