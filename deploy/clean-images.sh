#!/usr/bin/env bash
# Frees the disk the container builds took. Settings: deploy/engine.sh.
#   deploy/clean-images.sh          # make clean-images: both images, then everything below
#   deploy/clean-images.sh cache    # only dangling images and the build cache (the smoke test's
#                                   # cleanup unless KEEP_IMAGES=1)
# Dangling images are what a rebuild leaves behind: the previous build of a tag, several GB for
# the train image. The build cache is the engine's: `docker builder prune`, or for podman the
# directory buildah keeps RUN --mount=type=cache in (it survives `podman rmi` and
# `podman image prune`). Both are the engine's, not only this project's. The base image
# (BASE_IMAGE, e.g. localhost/bookworm-python:3.11) is kept: remove it with `rmi` when done.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/engine.sh

scope="${1:-all}"
case "$scope" in
    all)
        for image in "$SERVE_IMAGE" "$TRAIN_IMAGE"; do
            if engine image inspect --format '{{.Id}}' "$image" >/dev/null 2>&1; then
                engine rmi "$image" >/dev/null
                echo "removed $image"
            fi
        done
        ;;
    cache) ;;
    *) echo "error: unknown scope '$scope' (all or cache)" >&2; exit 2 ;;
esac

engine image prune --force >/dev/null
echo "pruned dangling images"
if [[ "$ENGINE" == docker ]]; then
    engine builder prune --force >/dev/null
else
    # buildah's cache-mount directory, in the temporary directory it uses (TMPDIR, else /var/tmp).
    for cache_dir in "${TMPDIR:-/var/tmp}/buildah-cache" "${TMPDIR:-/var/tmp}/buildah-cache-$(id -u)"; do
        [[ ! -d "$cache_dir" ]] || rm -rf "$cache_dir"
    done
fi
echo "pruned the build cache"
