#!/usr/bin/env bash
# Container smoke test (make smoke-containers): builds both images, makes the demo data and
# trains a tiny model in the train container, serves it from the serve container with a
# read-only root filesystem, classifies through the published port with the host's `client`,
# checks the HEALTHCHECK and /metrics, stops the server with SIGTERM (it must exit 0) and
# removes everything it made: its containers and files, then the dangling images a rebuild
# leaves and the build cache (deploy/clean-images.sh cache). The tagged images stay.
#   ENGINE, ENGINE_FLAGS, BUILD_FLAGS, RUN_FLAGS, BASE_IMAGE...: deploy/engine.sh, the same as
#                 for make images (the build below runs deploy/build-images.sh with them)
#   SKIP_BUILD=1  reuses the built images
#   KEEP_IMAGES=1 keeps the dangling images and the build cache (faster rebuilds)
#   CLIENT        the host-side client executable (default: .venv-client/bin/client, the light
#                 environment `make smoke-containers` installs; else .venv/bin/client; else
#                 `client` on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/engine.sh

if [[ -z "${CLIENT:-}" ]]; then
    CLIENT=client
    for candidate in .venv-client/bin/client .venv/bin/client; do
        if [[ -x "$candidate" ]]; then CLIENT="$candidate"; break; fi
    done
fi
command -v "$CLIENT" >/dev/null || {
    echo "error: no client executable ($CLIENT); run 'make smoke-containers' or set CLIENT" >&2
    exit 2
}
run_id="smoke-$$"
server_name="finetune-$run_id-server"
work="$(mktemp -d "${TMPDIR:-/tmp}/finetune-$run_id.XXXXXX")"
started=$SECONDS

log() { printf '[smoke %4ds] %s\n' $((SECONDS - started)) "$*"; }

cleanup() {
    local rc=$?
    engine rm -f "$server_name" >/dev/null 2>&1 || true
    # The containers wrote as uid 10001: remove their files from inside an image.
    engine run --rm "${run_flags[@]}" --user 0 -v "$work:/work" --entrypoint /bin/rm \
        "$SERVE_IMAGE" -rf /work/data /work/outputs >/dev/null 2>&1 || true
    rm -rf "$work"
    if [[ "${KEEP_IMAGES:-0}" == 1 ]]; then
        log "kept dangling images and the build cache (KEEP_IMAGES=1)"
    elif deploy/clean-images.sh cache >/dev/null; then
        log "pruned dangling images and the build cache (KEEP_IMAGES=1 keeps them)"
    else
        log "warning: pruning dangling images and the build cache failed"
    fi
    if [[ $rc -eq 0 ]]; then log "PASSED"; else log "FAILED (exit $rc)"; fi
}
trap cleanup EXIT

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    deploy/build-images.sh serve train
fi
log "engine: $ENGINE; images: $TRAIN_IMAGE ($(image_size_mb "$TRAIN_IMAGE") MB)," \
    "$SERVE_IMAGE ($(image_size_mb "$SERVE_IMAGE") MB)"
if engine run --rm "${run_flags[@]}" --entrypoint python "$SERVE_IMAGE" \
    -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is not None)'; then
    log "serve image carries no torch"
else
    echo "error: torch is importable in $SERVE_IMAGE" >&2
    exit 1
fi

mkdir -p "$work/data" "$work/outputs"
chmod 0777 "$work/data" "$work/outputs"
hardened=(--read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges)

# One container for both steps: on copy-based storage (vfs) every container start copies the
# multi-GB train image. make-demo-data stages next to its target, so it writes /data/demo.
log "demo data + training (train container, CPU, read-only root)"
engine run --rm "${run_flags[@]}" "${hardened[@]}" --shm-size 256m \
    -v "$work/data:/data" -v "$work/outputs:/outputs" --entrypoint /bin/sh "$TRAIN_IMAGE" -c '
        set -e
        trainer make-demo-data /data/demo --source-train-per-class 4 \
            --target-train-per-class 16 --val-per-class 8
        exec trainer train --data /data/demo/target --output /outputs --weights none \
            --arch resnet18 --image-size 64 --batch-size 16 --finetune-epochs 1 \
            --device cpu --num-workers 0'
model="$work/outputs/model_repository/classifier/1/model.onnx"
[[ -s "$model" ]] || { echo "error: training did not export $model" >&2; exit 1; }
log "exported $(du -k "$model" | cut -f1) KiB: outputs/model_repository/classifier/1/model.onnx"

log "serving (serve container, read-only root, ports on 127.0.0.1 chosen by the engine)"
engine run -d "${run_flags[@]}" "${hardened[@]}" --name "$server_name" \
    -p 127.0.0.1::8001 -p 127.0.0.1::8002 \
    -v "$work/outputs/model_repository:/models:ro" "$SERVE_IMAGE" \
    --model-name classifier --providers cpu >/dev/null
grpc_addr="$(engine port "$server_name" 8001/tcp | head -n1)"
metrics_addr="$(engine port "$server_name" 8002/tcp | head -n1)"
grpc_addr="127.0.0.1:${grpc_addr##*:}"
metrics_addr="127.0.0.1:${metrics_addr##*:}"
log "gRPC on $grpc_addr, metrics on $metrics_addr"

deadline=$((SECONDS + ${HEALTH_TIMEOUT_S:-120}))
until "$CLIENT" health --target "$grpc_addr" >/dev/null 2>&1; do
    if ((SECONDS > deadline)) || [[ "$(engine inspect -f '{{.State.Running}}' "$server_name")" != true ]]; then
        engine logs "$server_name" >&2 || true
        echo "error: the server did not become SERVING on $grpc_addr" >&2
        exit 1
    fi
    sleep 1
done
log "grpc.health.v1: SERVING"

# The image's own HEALTHCHECK (client health inside the container).
if [[ "$ENGINE" == podman ]]; then
    engine healthcheck run "$server_name"
else
    health_deadline=$((SECONDS + 60))
    until [[ "$(engine inspect -f '{{.State.Health.Status}}' "$server_name")" == healthy ]]; do
        ((SECONDS < health_deadline)) || { echo "error: HEALTHCHECK never healthy" >&2; exit 1; }
        sleep 2
    done
fi
log "image HEALTHCHECK: healthy"

images=("$work"/data/demo/target/val/*/*)
classified="$("$CLIENT" classify --target "$grpc_addr" "${images[@]}")"
lines="$(wc -l <<<"$classified")"
correct="$(awk -F'\t' '{n = split($1, p, "/"); if (p[n - 1] == $2) c++} END {print c + 0}' <<<"$classified")"
[[ "$lines" -eq ${#images[@]} ]] || { echo "error: $lines results for ${#images[@]} images" >&2; exit 1; }
log "classified ${#images[@]} val images through $grpc_addr: $correct correct (tiny 1-epoch model)"
head -n 3 <<<"$classified" | sed "s|$work/||"

metrics="$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' "http://$metrics_addr/metrics")"
ok_requests="$(awk '/^inference_requests_total\{/ && /outcome="success"/ {s += $NF} END {print s + 0}' <<<"$metrics")"
awk -v n="$ok_requests" 'BEGIN {exit !(n > 0)}' || {
    echo "error: /metrics shows no successful inference requests" >&2
    grep '^inference_requests_total' <<<"$metrics" >&2 || true
    exit 1
}
log "/metrics: inference_requests_total{outcome=success} = $ok_requests"

engine stop -t 30 "$server_name" >/dev/null
exit_code="$(engine inspect -f '{{.State.ExitCode}}' "$server_name")"
[[ "$exit_code" == 0 ]] || { engine logs "$server_name" >&2; echo "error: server exited $exit_code after SIGTERM" >&2; exit 1; }
log "SIGTERM: server drained and exited 0"
