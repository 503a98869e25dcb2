#!/usr/bin/env bash
# Builds the serve image, then the train image (make images). Settings: deploy/engine.sh.
#   deploy/build-images.sh            # both
#   deploy/build-images.sh serve      # only Dockerfile.serve (train: only Dockerfile.train)
# TORCHVISION_WEIGHTS="ResNet50_Weights.IMAGENET1K_V2 ..." bakes weights into the train image.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/engine.sh

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(serve train)

# The secret is always passed (empty when the host has no bundle) so every engine version
# finds it; the Dockerfiles use it only when it is non-empty.
ca_file="$CA_BUNDLE"
if [[ ! -s "$ca_file" ]]; then
    ca_file="$(mktemp)"
    trap 'rm -f "$ca_file"' EXIT
fi
build_args=(--secret "id=ca,src=$ca_file")
[[ -n "${BASE_IMAGE:-}" ]] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
# Podman writes OCI images by default, and the OCI format has no HEALTHCHECK.
[[ "$ENGINE" == podman ]] && build_args+=(--format docker)

for target in "${targets[@]}"; do
    case "$target" in
        serve) image="$SERVE_IMAGE"; extra=() ;;
        train) image="$TRAIN_IMAGE"; extra=(--build-arg "TORCHVISION_WEIGHTS=${TORCHVISION_WEIGHTS:-}") ;;
        *) echo "error: unknown image '$target' (serve or train)" >&2; exit 2 ;;
    esac
    echo "== building $image from Dockerfile.$target with $ENGINE"
    start=$SECONDS
    engine build --file "Dockerfile.$target" "${build_args[@]}" "${extra[@]}" \
        "${build_flags[@]}" --tag "$image" .
    echo "built $image in $((SECONDS - start)) s: $(image_size_mb "$image") MB"
done
