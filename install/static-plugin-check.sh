#!/usr/bin/env bash
# Builds the CNI plugin with the image's build step (install/build-image.sh plugin: static
# glibc, since it runs on the HOST, whose libc may be older than the image's) and proves it
# needs nothing from the filesystem: CNI VERSION answered inside an empty chroot. Run from
# anywhere, as root (chroot).
set -euo pipefail
cd "$(dirname "$0")/.."
case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) echo "static-plugin-check.sh: unsupported machine $(uname -m)" >&2; exit 1 ;;
esac
bin=$(install/build-image.sh plugin "$arch")
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
