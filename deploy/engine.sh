# Sourced by build-images.sh and smoke-containers.sh: picks the container engine and reads the
# settings every container script shares. All of them come from the environment:
#   ENGINE        docker or podman (default: docker when its daemon answers, else podman)
#   ENGINE_FLAGS  global engine flags, e.g. "--storage-driver=vfs --runtime=runc" for podman
#   BUILD_FLAGS   extra build flags, e.g. "--ulimit nofile=4096:4096 --ulimit nproc=4096:4096"
#   RUN_FLAGS     extra run flags, e.g. the same ulimits
#   BASE_IMAGE    overrides both Dockerfiles' base (e.g. localhost/bookworm-python:3.11)
#   CA_BUNDLE     CA bundle handed to the build as secret "ca" (default: the host's bundle)
#   TAG           image tag (default 0.1.0); TRAIN_IMAGE / SERVE_IMAGE override whole names
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
read -r -a ENGINE_FLAGS <<<"${ENGINE_FLAGS:-}"
read -r -a BUILD_FLAGS <<<"${BUILD_FLAGS:-}"
read -r -a RUN_FLAGS <<<"${RUN_FLAGS:-}"
TAG="${TAG:-0.1.0}"
TRAIN_IMAGE="${TRAIN_IMAGE:-finetune-trainer:${TAG}}"
SERVE_IMAGE="${SERVE_IMAGE:-finetune-server:${TAG}}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

engine() {
    "$ENGINE" "${ENGINE_FLAGS[@]}" "$@"
}

# Prints an image's size in MB as the engine reports it (uncompressed, all layers).
image_size_mb() {
    engine image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f", $1 / 1000000}'
}
