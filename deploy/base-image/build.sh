#!/usr/bin/env bash
# Builds a Debian bookworm base image with Python 3.11 from Debian's own packages, for hosts
# that reach a Debian mirror but no container registry. The result is imported as
# ${BASE_TAG} and can be passed to both Dockerfiles as --build-arg BASE_IMAGE=${BASE_TAG}.
#
#   deploy/base-image/build.sh                      # as root; tag localhost/bookworm-python:3.11
#   ENGINE=docker BASE_TAG=bookworm-python:3.11 sudo -E deploy/base-image/build.sh
#
# Needs root (debootstrap creates device nodes and chroots) and the debootstrap package. The
# engine and its global flags come from deploy/engine.sh (ENGINE, ENGINE_FLAGS), exactly as for
# the image builds: on podman the first command fixes the storage driver for good, so this
# import must already run with the ENGINE_FLAGS every later command uses.
set -euo pipefail
source "$(dirname "$0")/../engine.sh"

BASE_TAG="${BASE_TAG:-localhost/bookworm-python:3.11}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
PACKAGES="python3,python3-venv,ca-certificates,tzdata"

if [[ $(id -u) -ne 0 ]]; then
    echo "error: debootstrap needs root; run this script as root or with sudo" >&2
    exit 2
fi
command -v debootstrap >/dev/null || {
    echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2
    exit 2
}

rootfs="$(mktemp -d "${TMPDIR:-/var/tmp}/base-rootfs.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT
# mktemp makes the directory 0700; it becomes the image's / and must be traversable by non-root users.
chmod 0755 "$rootfs"

echo "debootstrap ${SUITE} (minbase + ${PACKAGES}) from ${MIRROR}"
debootstrap --variant=minbase --include="${PACKAGES}" "${SUITE}" "$rootfs" "${MIRROR}" >/dev/null

# Keep the image small and reproducible-ish: no package lists, caches, docs or man pages.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/var/log/*.log "$rootfs"/tmp/*
# A sources list the image's own apt can use later (debootstrap leaves the mirror in place).
echo "deb ${MIRROR} ${SUITE} main" >"$rootfs/etc/apt/sources.list"

echo "importing as ${BASE_TAG} with ${ENGINE} ${ENGINE_FLAGS}"
tar --numeric-owner -C "$rootfs" -c . | engine import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    - "${BASE_TAG}" >/dev/null
engine image ls "${BASE_TAG}"
