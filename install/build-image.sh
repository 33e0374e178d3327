#!/usr/bin/env bash
# Builds the node-local-dns image on this machine with podman (or buildah) and no registry:
# the runtime base is made from Debian's packages with mmdebstrap and imported with
# `podman import`; the binaries are built by the `binaries` step below, the same step
# install/Dockerfile runs; a generated Containerfile `FROM` the imported base adds them.
# The image is tagged exactly as `kubectl kustomize install/` names it in the DaemonSet.
#
# Usage (from anywhere, as root):
#   install/build-image.sh [image]          build the image for this machine's architecture
#   install/build-image.sh tag              print the tag the DaemonSet names
#   install/build-image.sh triple ARCH      print the Rust target triple of a Docker ARCH
#   install/build-image.sh binaries ARCH DEST
#                                           build the three binaries for a Docker ARCH
#                                           (amd64, arm64) and lay them out under DEST as
#                                           the image holds them (install/Dockerfile runs this)
#   install/build-image.sh plugin ARCH      build only the CNI plugin; prints its path
# Environment:
#   NLD_DEBIAN_MIRROR    Debian mirror (default http://deb.debian.org/debian)
#   NLD_DEBIAN_SECURITY  Debian security mirror (default http://deb.debian.org/debian-security)
#   NLD_REBUILD_BASE=1   rebuild the base even when an image of the same recipe exists
set -euo pipefail
cd "$(dirname "$0")/.."

# The runtime packages (both iptables backends and nft): node setup programs whichever
# kube-proxy uses. install/Dockerfile installs the same list (install/tests/manifests.rs
# checks that the two agree).
RUNTIME_PACKAGES="iptables nftables"
SUITE=bookworm
BASE_REPO=localhost/node-local-dns-base
# Image default PATH, as Debian's official images set it (an imported rootfs has no config).
IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

die() {
  echo "build-image.sh: $*" >&2
  exit 1
}

# Rust target triple for a Docker architecture name.
triple_for() {
  case "$1" in
    amd64) echo x86_64-unknown-linux-gnu ;;
    arm64) echo aarch64-unknown-linux-gnu ;;
    *) die "unsupported ARCH '$1' (amd64 or arm64)" ;;
  esac
}

# Docker architecture name of this machine.
host_arch() {
  case "$(uname -m)" in
    x86_64) echo amd64 ;;
    aarch64) echo arm64 ;;
    *) die "unsupported machine $(uname -m) (x86_64 or aarch64)" ;;
  esac
}

# Cross builds link with Debian's cross gcc (gcc-<gnu-triple>); native builds need nothing.
use_cross_linker() {
  local triple=$1
  [ "$(triple_for "$(host_arch)")" = "$triple" ] && return 0
  local gnu=${triple/-unknown-/-}
  local var
  var=$(echo "$triple" | tr 'a-z-' 'A-Z_')
  export "CARGO_TARGET_${var}_LINKER=${gnu}-gcc"
  export "CC_${triple//-/_}=${gnu}-gcc"
}

# The plugin runs on the HOST, whose glibc may be older than the image's: link it
# statically (--target keeps crt-static away from build scripts and proc-macros). Without
# line tables: the copy on every node is 5.3 MB instead of 18; symbol names stay.
build_plugin() {
  local triple
  triple=$(triple_for "$1")
  use_cross_linker "$triple"
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    cargo build --release --locked -p node-local-dns-cni --target "$triple" >&2
  echo "target/$triple/release/node-local-dns"
}

# The resolver and the installer run in the image (Debian 12 glibc); the plugin is copied
# to where the installer's default --plugin-binary points.
build_binaries() {
  local arch=$1 dest=$2 triple plugin
  triple=$(triple_for "$arch")
  use_cross_linker "$triple"
  cargo build --release --locked --target "$triple" \
    -p node-local-dns-resolver -p node-local-dns-install
  plugin=$(build_plugin "$arch")
  install -D -m 0755 -t "$dest/usr/local/bin" \
    "target/$triple/release/node-local-dns-resolver" "target/$triple/release/node-local-dns-install"
  install -D -m 0755 "$plugin" "$dest/usr/local/lib/node-local-dns/node-local-dns"
}

# The image the DaemonSet names: kustomization.yaml's `images:` entry for node-local-dns.
image_tag() {
  awk '
    /^images:/ { in_images = 1; next }
    in_images && /^[^ #-]/ { in_images = 0 }
    in_images && /newName:/ { name = $2 }
    in_images && /newTag:/ { tag = $2; gsub(/"/, "", tag) }
    END { if (name == "" || tag == "") exit 1; print name ":" tag }
  ' install/kustomization.yaml || die "no images: newName/newTag in install/kustomization.yaml"
}

builder() {
  if command -v podman >/dev/null; then
    echo podman
  elif command -v buildah >/dev/null; then
    echo buildah
  else
    die "neither podman nor buildah is installed (apt-get install podman)"
  fi
}

image_exists() {
  case "$(builder)" in
    podman) podman image exists "$1" 2>/dev/null ;;
    buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
  esac
}

# A root filesystem tarball as an image (buildah has no `import`: an empty container plus it).
import_base() {
  local tar=$1 tag=$2 ctr
  case "$(builder)" in
    podman) podman import --quiet --change "ENV=PATH=$IMAGE_PATH" "$tar" "$tag" >/dev/null ;;
    buildah)
      ctr=$(buildah from scratch)
      buildah add --quiet "$ctr" "$tar" / >/dev/null
      buildah config --env "PATH=$IMAGE_PATH" "$ctr"
      buildah commit --quiet "$ctr" "$tag" >/dev/null
      buildah rm "$ctr" >/dev/null
      ;;
  esac
}

# Tag of the base built from this exact recipe, so a changed recipe builds a new base.
base_tag() {
  local recipe
  recipe="$SUITE $RUNTIME_PACKAGES $(host_arch) $(declare -f make_base_tar)"
  echo "$BASE_REPO:$(echo "$recipe" | sha256sum | cut -c1-16)"
}

make_base_tar() {
  local out=$1 log=$2 mirror=$3 security=$4
  # essential + the runtime packages: no apt, no docs/man/locales (as debian:12-slim).
  mmdebstrap --quiet --variant=essential --arch="$(host_arch)" \
    --include="${RUNTIME_PACKAGES// /,},usr-is-merged" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    "$SUITE" "$out" \
    "deb $mirror $SUITE main" "deb $mirror $SUITE-updates main" \
    "deb $security $SUITE-security main" >"$log" 2>&1
}

# Imports the runtime base once per recipe; prints its tag.
ensure_base() {
  local tag work mirror security
  tag=$(base_tag)
  if [ "${NLD_REBUILD_BASE:-0}" != 1 ] && image_exists "$tag"; then
    echo "$tag"
    return
  fi
  command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (apt-get install mmdebstrap)"
  mirror=${NLD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
  security=${NLD_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
  work=$(mktemp -d)
  if ! make_base_tar "$work/base.tar" "$work/mmdebstrap.log" "$mirror" "$security"; then
    # apt-get update is the first step that needs the mirrors.
    if grep -qiE "apt-get update.* failed|failed to fetch|could not resolve|temporary failure|unable to connect" "$work/mmdebstrap.log"; then
      die "cannot reach Debian's packages at NLD_DEBIAN_MIRROR=$mirror / NLD_DEBIAN_SECURITY=$security (log: $work/mmdebstrap.log)"
    fi
    die "mmdebstrap failed building the $SUITE base (log: $work/mmdebstrap.log)"
  fi
  import_base "$work/base.tar" "$tag"
  rm -rf "$work"
  echo "$tag"
}

build_image() {
  local tag base tool ctx start
  start=$(date +%s)
  tag=$(image_tag)
  tool=$(builder)
  base=$(ensure_base)
  ctx=$(mktemp -d)
  # shellcheck disable=SC2064 # expand now: $ctx is local to this function
  trap "rm -rf '$ctx'" EXIT
  build_binaries "$(host_arch)" "$ctx/root"
  cat >"$ctx/Containerfile" <<EOF
FROM $base
COPY root/ /
# No ENTRYPOINT: each DaemonSet container names its binary.
EOF
  if [ "$tool" = podman ]; then
    podman build --pull=never --quiet -t "$tag" -f "$ctx/Containerfile" "$ctx" >/dev/null
  else
    buildah bud --pull-never --quiet -t "$tag" -f "$ctx/Containerfile" "$ctx" >/dev/null
  fi
  echo "built $tag ($("$tool" inspect --type image --format '{{.Size}}' "$tag" | numfmt --to=iec) from $base) in $(($(date +%s) - start)) s"
}

case "${1:-image}" in
  image) build_image ;;
  tag) image_tag ;;
  triple)
    [ $# -eq 2 ] || die "usage: build-image.sh triple ARCH"
    triple_for "$2"
    ;;
  binaries)
    [ $# -eq 3 ] || die "usage: build-image.sh binaries ARCH DEST"
    build_binaries "$2" "$3"
    ;;
  plugin)
    [ $# -eq 2 ] || die "usage: build-image.sh plugin ARCH"
    build_plugin "$2"
    ;;
  *) die "unknown command '$1' (image, tag, triple, binaries, plugin)" ;;
esac
