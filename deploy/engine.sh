# Sourced by every container script (build-images.sh, smoke-containers.sh, clean-images.sh,
# base-image/build.sh): picks the container engine and reads the settings they all share.
# All of them come from the environment:
#   ENGINE        docker or podman (default: docker when its daemon answers, else podman)
#   ENGINE_FLAGS  global engine flags, e.g. "--storage-driver=overlay --runtime=runc" for podman
#   BUILD_FLAGS   extra build flags, e.g. "--ulimit nofile=4096:4096 --ulimit nproc=4096:4096"
#   RUN_FLAGS     extra run flags, e.g. the same ulimits
#   BASE_IMAGE    overrides both Dockerfiles' base (e.g. localhost/bookworm-python:3.11)
#   CA_BUNDLE     CA bundle handed to the build as secret "ca" (default: the host's bundle)
#   TAG           image tag (default 0.1.0); TRAIN_IMAGE / SERVE_IMAGE override whole names
#
# The settings stay exported strings, so a script that runs another one (the smoke test runs
# build-images.sh) hands them on unchanged. The word lists built from them have lowercase names
# of their own: bash cannot export an array, and turning ENGINE_FLAGS itself into one silently
# drops it from every child's environment (the child then runs a plain engine and, on podman,
# trips over a storage driver other than the one the images were built with).
if [[ -z "${ENGINE:-}" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        ENGINE=docker
    elif command -v podman >/dev/null; then
        ENGINE=podman
    else
        echo "error: no container engine: install docker or podman, or set ENGINE" >&2
        exit 2
    fi
fi
ENGINE_FLAGS="${ENGINE_FLAGS:-}"
BUILD_FLAGS="${BUILD_FLAGS:-}"
RUN_FLAGS="${RUN_FLAGS:-}"
TAG="${TAG:-0.1.0}"
TRAIN_IMAGE="${TRAIN_IMAGE:-finetune-trainer:${TAG}}"
SERVE_IMAGE="${SERVE_IMAGE:-finetune-server:${TAG}}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
export ENGINE ENGINE_FLAGS BUILD_FLAGS RUN_FLAGS TAG TRAIN_IMAGE SERVE_IMAGE CA_BUNDLE
[[ -z "${BASE_IMAGE:-}" ]] || export BASE_IMAGE

read -r -a engine_flags <<<"$ENGINE_FLAGS"
read -r -a build_flags <<<"$BUILD_FLAGS"
read -r -a run_flags <<<"$RUN_FLAGS"

engine() {
    "$ENGINE" "${engine_flags[@]}" "$@"
}

# Prints an image's size in MB as the engine reports it (uncompressed, all layers).
image_size_mb() {
    engine image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f", $1 / 1000000}'
}
