#!/usr/bin/env bash
# Builds the CNI plugin the way install/Dockerfile does (static glibc: it runs on the HOST,
# whose libc may be older than the image's) and proves it needs nothing from the filesystem:
# CNI VERSION answered inside an empty chroot. Run from the repository root, as root (chroot).
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=debuginfo \
  cargo build --release --locked -p node-local-dns-cni --target "$target"
bin="target/$target/release/node-local-dns"
if ! file "$bin" | grep -q "static"; then
  echo "not statically linked: $(file "$bin")" >&2
  exit 1
fi
if file "$bin" | grep -q "with debug_info"; then
  echo "the node's copy should carry no debug info: $(file "$bin")" >&2
  exit 1
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
cp "$bin" "$root/node-local-dns"
out=$(echo '{"cniVersion":"1.0.0"}' | CNI_COMMAND=VERSION chroot "$root" /node-local-dns)
echo "$out" | grep -q '"supportedVersions"' || { echo "VERSION in an empty root: $out" >&2; exit 1; }
echo "static plugin OK ($(du -h "$bin" | cut -f1)): $out"
