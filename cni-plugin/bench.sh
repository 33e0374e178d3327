#!/bin/sh
# ADD latency of node-local-dns (fast path, fresh node) vs /usr/lib/cni/portmap's own ADD.
# Root; every case runs in network namespaces the script creates (host untouched).
# usage: cni-plugin/bench.sh [ITERATIONS]   (from the workspace root)
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p node-local-dns-cni
exec python3 cni-plugin/bench/add_latency.py target/release/node-local-dns "${1:-200}"
