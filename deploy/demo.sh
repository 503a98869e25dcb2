#!/usr/bin/env bash
# The whole pair end to end on the embedded demo data, CPU only, no network:
# demo data -> source model from scratch -> two-phase fine-tune on the target task -> ONNX export
# -> gRPC server on localhost -> predictions through the client -> metrics -> clean stop.
# Run it with `make demo` (which installs what it needs first). DEMO_DIR sets where outputs go.
set -euo pipefail

DEMO_DIR=${DEMO_DIR:-demo-output}
DATA=$DEMO_DIR/data
SOURCE_RUN=$DEMO_DIR/source-run
TARGET_RUN=$DEMO_DIR/target-run
REPOSITORY=$DEMO_DIR/model_repository
SERVER_LOG=$DEMO_DIR/server.log
COMMON=(--arch resnet18 --image-size 64 --batch-size 32 --device cpu --seed 0 --resume never)
# The source model stands in for ImageNet weights and keeps its own short from-scratch recipe
# (light augmentation converges within 18 epochs). The target fine-tune uses the defaults:
# --augment auto (crops keep >= 60% of a 64 px image; each flip/rotation tested on the frozen
# features), the head phase as a converged linear probe, --lr auto and --unfreeze auto (an LR
# range test and short policy trials from that head), calibrated probabilities.
SOURCE_RECIPE=(--augment fixed --no-random-resized-crop --label-smoothing 0)

demo_start=$SECONDS
step_start=$SECONDS
step() {  # step NUMBER TITLE: closes the previous step's timer and announces the next
  if [[ -n ${current_step:-} ]]; then
    printf '    (%s took %ds)\n' "$current_step" $((SECONDS - step_start))
  fi
  current_step=$2
  step_start=$SECONDS
  printf '\n==> [%s/8] %s\n' "$1" "$2"
}

free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

server_pid=
cleanup() {
  if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then kill -TERM "$server_pid"; fi
}
trap cleanup EXIT

rm -rf "$SOURCE_RUN" "$TARGET_RUN" "$REPOSITORY"
mkdir -p "$DEMO_DIR"

step 1 "make the demo data"
trainer make-demo-data "$DATA"

step 2 "train a source model from scratch on the source task (stands in for ImageNet weights)"
trainer train --data "$DATA/source" --output "$SOURCE_RUN" --weights none \
  --finetune-epochs 18 --head-lr 2e-3 --patience 18 --no-export "${SOURCE_RECIPE[@]}" "${COMMON[@]}"

step 3 "two-phase fine-tune on the target task, starting from the source checkpoint"
trainer train --data "$DATA/target" --output "$TARGET_RUN" \
  --weights "$SOURCE_RUN/checkpoints/best.pt" --finetune-epochs 15 --patience 15 \
  --no-export "${COMMON[@]}"

step 4 "export a verified ONNX model into the model repository"
trainer export --checkpoint "$TARGET_RUN/checkpoints/best.pt" --output-repository "$REPOSITORY" \
  --model-name classifier --data "$DATA/target"

step 5 "start the server on localhost"
grpc_port=$(free_port)
metrics_port=$(free_port)
server --model-repository "$REPOSITORY" --model-name classifier \
  --grpc-port "$grpc_port" --http-port -1 --metrics-port "$metrics_port" >"$SERVER_LOG" 2>&1 &
server_pid=$!
for _ in $(seq 1 120); do
  if client health --target "127.0.0.1:$grpc_port" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then cat "$SERVER_LOG"; exit 1; fi
  sleep 0.5
done
client health --target "127.0.0.1:$grpc_port"

step 6 "classify val images over gRPC"
mapfile -t images < <(find "$DATA/target/val" -type f -name '*-000[0-2].*' | sort)
printf '%-44s %-10s %-6s %s\n' IMAGE PREDICTED SCORE TRUE
client classify --target "127.0.0.1:$grpc_port" "${images[@]}" |
  while IFS=$'\t' read -r path label score _; do
    true_label=$(basename "$(dirname "$path")")
    mark=$([[ $label == "$true_label" ]] && echo ok || echo MISS)
    printf '%-44s %-10s %-6.3f %-10s %s\n' "${path#"$DATA"/}" "$label" "$score" "$true_label" "$mark"
  done

step 7 "Prometheus metrics excerpt"
python - "$metrics_port" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
wanted = ("_requests_total{", "_request_duration_seconds_count", "_batch_size_count", "model_info{")
print("\n".join(line for line in text.splitlines() if any(w in line for w in wanted))[:3000])
PY

step 8 "stop the server cleanly (SIGTERM, drain, exit 0)"
kill -TERM "$server_pid"
wait "$server_pid" && status=0 || status=$?
server_pid=
echo "server exited with status $status"
step_end=$SECONDS
printf '    (%s took %ds)\n' "$current_step" $((step_end - step_start))

read -r head_accuracy accuracy chance policy lr < <(python - "$TARGET_RUN/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
head = s.get("head_phase_val_accuracy")
choice = s.get("finetune_choice") or {}
print(format(head, ".1%") if head is not None else "n/a", format(s["best_val_accuracy"], ".1%"),
      format(1 / len(s["classes"]), ".1%"), choice.get("unfreeze", "n/a"),
      format(choice["lr"], ".1e") if choice.get("lr") else "n/a")
PY
)
printf '\nTarget-task val accuracy: head phase %s, final %s (chance %s); phase 2 chose %s at lr %s\n' \
  "$head_accuracy" "$accuracy" "$chance" "$policy" "$lr"
printf 'Demo wall time: %ds\n' $((SECONDS - demo_start))
exit "$status"
