#!/bin/sh
# node-local-dns demo on a fresh Debian 12 machine, as root:
#   sh tests/demo.sh [--legacy|--nft] [--podman|--containerd]
# Installs the system packages the simulated node needs, a stable Rust toolchain when cargo is
# missing (Debian 12's rustc is too old for edition 2024), builds the workspace and runs the
# demo. Everything it creates (network namespaces, processes, mounts) is removed at the end,
# also when it is interrupted with Ctrl-C or SIGTERM.
set -eu
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "run as root: the demo creates network namespaces and iptables rules inside them" >&2
    exit 1
fi

PACKAGES="build-essential ca-certificates curl pkg-config iptables nftables iproute2 conntrack dnsutils \
knot knot-dnsutils podman containerd runc containernetworking-plugins busybox-static \
dnsmasq-base util-linux"
if command -v apt-get >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $PACKAGES
fi

if ! command -v cargo >/dev/null; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        PATH="$HOME/.cargo/bin:$PATH"
    else
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
        PATH="$HOME/.cargo/bin:$PATH"
    fi
fi

cargo build --workspace --bins
exec target/debug/node-local-dns-demo "$@"
