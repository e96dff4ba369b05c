#!/usr/bin/env bash
# Makes the base images that docker/Dockerfile starts FROM when no registry can be reached, so the image can still be
# built and smoke-tested offline (only a Debian apt mirror is needed). Used by docker/smoke-test.sh with buildah/podman;
# with a normal registry you never need this.
#
#   docker.io/library/debian:bookworm-slim        debootstrap --variant=minbase bookworm, docs and apt lists dropped
#   docker.io/library/rust:<ver>-slim-bookworm    that image + gcc, libc6-dev, ca-certificates, THIS machine's Rust
#                                                 toolchain <ver> (it must match the tag: rustc --version) and
#                                                 its extra CAs from /usr/local/share/ca-certificates
#
# Usage: docker/build-base-images.sh [Dockerfile]   (default docker/Dockerfile; images already present are kept)
# Env:   STORAGE_DRIVER (vfs), DEBIAN_MIRROR (http://deb.debian.org/debian), BASE_CACHE (~/.cache/amlserve-base)
# Needs root, buildah, podman, debootstrap (apt-get install -y buildah podman debootstrap).
set -euo pipefail

dockerfile=${1:-"$(dirname "$0")/Dockerfile"}
driver=${STORAGE_DRIVER:-vfs}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${BASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/amlserve-base}
bah() { buildah --storage-driver "$driver" "$@"; }
pod() { podman --storage-driver "$driver" "$@"; }
log() { echo "base-images: $*" >&2; }

work_ctr=""
trap '[ -z "$work_ctr" ] || bah rm "$work_ctr" >/dev/null 2>&1 || true' EXIT

have_image() { pod image exists "$1" 2>/dev/null; }

# Every FROM image of the Dockerfile, ARG defaults substituted, stage names left out.
from_images() {
  python3 - "$dockerfile" <<'PY'
import re, sys
args, stages, out = {}, set(), []
for line in open(sys.argv[1]):
    line = line.strip()
    m = re.match(r'ARG\s+(\w+)=(\S+)', line)
    if m:
        args.setdefault(m.group(1), m.group(2).strip('"'))
    m = re.match(r'FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?', line, re.I)
    if m:
        img = re.sub(r'\$\{?(\w+)\}?', lambda v: args.get(v.group(1), ''), m.group(1))
        if img not in stages and img not in out and '$' not in img:
            out.append(img)
        if m.group(2):
            stages.add(m.group(2))
for img in out:
    if img not in stages:
        print(img)
PY
}

make_debian_slim() { # image name
  local rootfs="$cache/bookworm-minbase"
  if [ ! -x "$rootfs/bin/sh" ]; then
    command -v debootstrap >/dev/null || { log "debootstrap is missing: apt-get install -y debootstrap"; exit 1; }
    log "debootstrap bookworm (minbase) from $mirror into $rootfs (a few minutes)"
    rm -rf "$rootfs" && mkdir -p "$cache"
    nice -n 19 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
      || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    # like the official slim image: no docs, man pages, apt lists or caches
    rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
      "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
      "$mirror" "$mirror" >"$rootfs/etc/apt/sources.list"
  fi
  log "importing $rootfs as $1"
  tar -C "$rootfs" --numeric-owner -c . | pod import --change 'CMD ["bash"]' - "$1" >/dev/null
}

make_rust() { # image name, rust version
  local image=$1 version=$2 slim=docker.io/library/debian:bookworm-slim
  have_image "$slim" || make_debian_slim "$slim"
  local host_version
  host_version=$(rustc --version 2>/dev/null | awk '{print $2}')
  if [ "$host_version" != "$version" ]; then
    log "$image needs Rust $version but this machine has '${host_version:-none}': install it (rustup toolchain install $version) or change the tag"
    exit 1
  fi
  local sysroot
  sysroot=$(rustc --print sysroot)
  log "making $image from $slim + gcc + the host's Rust $version ($sysroot)"
  # global, so the EXIT trap can remove the working container when a step fails
  work_ctr=$(bah from --pull=never "$slim")
  local c=$work_ctr
  nice -n 19 buildah --storage-driver "$driver" run --isolation chroot "$c" -- sh -c \
    'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev ca-certificates >/dev/null && rm -rf /var/lib/apt/lists/*'
  # This machine's extra CAs (e.g. a TLS-intercepting egress proxy), so cargo in the builder can reach crates.io.
  # Only the builder base gets them; the runtime image makes no outbound TLS connections.
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    log "adding this machine's extra CA certificates to the builder: $(cd /usr/local/share/ca-certificates && echo *.crt)"
    bah copy "$c" /usr/local/share/ca-certificates /usr/local/share/ca-certificates >/dev/null
    bah run --isolation chroot "$c" -- update-ca-certificates >/dev/null
  fi
  # the toolchain without its docs (share/doc is most of its size)
  local stage="$cache/rust-$version"
  rm -rf "$stage" && mkdir -p "$stage/usr/local/rust" "$stage/usr/local/cargo/bin"
  cp -a "$sysroot"/bin "$sysroot"/lib "$sysroot"/libexec "$stage/usr/local/rust/" 2>/dev/null || cp -a "$sysroot"/bin "$sysroot"/lib "$stage/usr/local/rust/"
  for b in "$stage"/usr/local/rust/bin/*; do ln -s "../../rust/bin/$(basename "$b")" "$stage/usr/local/cargo/bin/"; done
  bah copy "$c" "$stage/usr/local" /usr/local >/dev/null
  bah config --env CARGO_HOME=/usr/local/cargo --env RUSTUP_HOME=/usr/local/rustup \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env RUST_VERSION="$version" --cmd bash "$c"
  bah commit --quiet "$c" "$image" >/dev/null
  bah rm "$c" >/dev/null
  work_ctr=""
  rm -rf "$stage"
}

for image in $(from_images); do
  if have_image "$image"; then
    log "$image: present"
    continue
  fi
  case "$image" in
    docker.io/library/debian:bookworm-slim) make_debian_slim "$image" ;;
    docker.io/library/rust:*-slim-bookworm)
      v=${image#docker.io/library/rust:}
      make_rust "$image" "${v%-slim-bookworm}"
      ;;
    *) log "$image is absent and cannot be made here (only debian:bookworm-slim and rust:<ver>-slim-bookworm can)"; exit 1 ;;
  esac
  log "$image: made"
done
