#!/usr/bin/env bash
# Build the aemon container image with buildah, without a registry and without a daemon.
#
#   deploy/build-image.sh [TAG]          (default TAG: localhost/aemon:test; run as root)
#
# 1. Tools: buildah, debootstrap (and podman, runc, uidmap, fuse-overlayfs, to run the image) are
#    installed with apt-get when missing.
# 2. Base image: no registry is needed. A Debian bookworm root filesystem with python3 and
#    python3-venv (and ca-certificates) is made with debootstrap (minbase), kept as a tarball in the cache folder, and
#    imported as localhost/aemon-base:bookworm. Reruns reuse the image, or the tarball.
# 3. The Dockerfile is built from that base in Docker format (the OCI format has no HEALTHCHECK), with chroot
#    isolation: RUN steps need no OCI runtime and no cgroups (crun refuses hybrid cgroup v1/v2 hosts). The
#    host's CA bundle is mounted over the build's (RUN steps only, never in a layer), so that pip also works
#    behind a TLS-inspecting proxy whose CA only the host trusts.
#
# Environment:
#   AEMON_IMAGE_CACHE    folder for the base tarball (default /var/tmp/aemon-image)
#   AEMON_BASE_IMAGE     tag of the local base image (default localhost/aemon-base:bookworm)
#   AEMON_DEBIAN_MIRROR  Debian mirror for debootstrap (default: the one apt uses, else deb.debian.org)
#   AEMON_REBUILD_BASE=1 make the base again from scratch
set -euo pipefail

TAG=${1:-localhost/aemon:test}
BASE=${AEMON_BASE_IMAGE:-localhost/aemon-base:bookworm}
CACHE=${AEMON_IMAGE_CACHE:-/var/tmp/aemon-image}
SUITE=bookworm
BASE_TAR=$CACHE/$SUITE-python3-rootfs.tar
REPO=$(cd "$(dirname "$0")/.." && pwd)

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { log "$*"; exit 2; }

# -- 1. tools ----------------------------------------------------------------------------------------------------
need=()
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
command -v newuidmap >/dev/null 2>&1 || need+=(uidmap)
command -v fuse-overlayfs >/dev/null 2>&1 || need+=(fuse-overlayfs)
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing ${need[*]}: install them (apt-get install ${need[*]}) or run as root"
    command -v apt-get >/dev/null 2>&1 || die "missing ${need[*]} and no apt-get to install them"
    log "installing ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ "$(id -u)" = 0 ] || die "run as root: debootstrap and the import of the base need it"
export PATH=$PATH:/usr/sbin:/sbin

# -- 2. base image -----------------------------------------------------------------------------------------------
mirror() {
    # The Debian mirror apt already uses (deb822 .sources first, then one-line sources.list).
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
    [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' | grep -v security | head -n1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

make_rootfs_tar() {
    local dir mirror_url
    mirror_url=${AEMON_DEBIAN_MIRROR:-$(mirror)}
    mkdir -p "$CACHE"
    dir=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    log "debootstrap $SUITE from $mirror_url into $dir"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$dir" "$mirror_url" >"$CACHE/debootstrap.log"
    chroot "$dir" apt-get clean
    # What a container never reads: package lists, documentation (copyright files kept), manual pages.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/log/* "$dir"/usr/share/man/* \
        "$dir"/usr/share/info/* "$dir"/usr/share/lintian
    find "$dir"/usr/share/doc -type f ! -name copyright -delete
    tar --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -C "$dir" -cf "$BASE_TAR.part" .
    mv "$BASE_TAR.part" "$BASE_TAR"
    rm -rf "$dir"
}

if [ "${AEMON_REBUILD_BASE:-0}" = 1 ]; then
    rm -f "$BASE_TAR"
    buildah rmi "$BASE" >/dev/null 2>&1 || true
fi
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    [ -s "$BASE_TAR" ] || make_rootfs_tar
    log "importing $BASE_TAR as $BASE"
    ctr=$(buildah from scratch)
    trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
    buildah add --quiet "$ctr" "$BASE_TAR" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
        --cmd '["python3"]' --label org.opencontainers.image.description="Debian $SUITE minbase with python3" "$ctr"
    buildah commit --quiet --format docker --rm "$ctr" "$BASE" >/dev/null
    trap - EXIT
fi

# -- 3. the image ------------------------------------------------------------------------------------------------
log "building $TAG from $BASE"
cd "$REPO"
ca=()
[ -s /etc/ssl/certs/ca-certificates.crt ] && ca=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
buildah build --isolation chroot --format docker --layers --pull=never "${ca[@]}" \
    --build-arg PYTHON_IMAGE="$BASE" -t "$TAG" -f Dockerfile .
log "$TAG: $(buildah images --format '{{.Size}}' "$TAG")"
