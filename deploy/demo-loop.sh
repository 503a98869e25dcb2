#!/usr/bin/env bash
# Closing the loop on the demo, after `make demo`: serve version 1 with capture on, send
# production traffic, label what the model was unsure about (from the demo's ground truth, as a
# person would in a labelling tool), ingest it, fine-tune from the last model, export version
# 2, and watch the server roll it out (golden set and rollout gate) while it keeps serving.
# Before/after figures are measured on production images that were never captured or trained
# on. Run it with `make demo-loop`. DEMO_DIR must hold `make demo`'s outputs.
set -euo pipefail

DEMO_DIR=${DEMO_DIR:-demo-output}
DATA=$DEMO_DIR/data
TARGET_RUN=$DEMO_DIR/target-run
REPOSITORY=$DEMO_DIR/model_repository
LOOP=$DEMO_DIR/loop
PRODUCTION=$LOOP/production          # new images of the target task: "what production sees"
TRAFFIC=$LOOP/traffic                # half of them: sent, captured, labelled, ingested
HELD_OUT=$LOOP/held-out              # the other half: only measured, before and after
CAPTURES=$LOOP/captures
LOOP_DATA=$LOOP/data                 # a copy of the target task that the captures join
SERVER_LOG=$LOOP/server.log
COMMON=(--arch resnet18 --image-size 64 --batch-size 32 --device cpu --seed 0 --resume never)

for needed in "$TARGET_RUN/checkpoints/best.pt" "$REPOSITORY/classifier/1" "$DATA/target"; do
  [[ -e $needed ]] || { echo "demo-loop: $needed is missing; run 'make demo' first" >&2; exit 2; }
done
[[ ! -e $REPOSITORY/classifier/2 ]] || rm -rf "$REPOSITORY/classifier/2"

loop_start=$SECONDS
step() { printf '\n==> [%s/7] %s   (%ds so far)\n' "$1" "$2" $((SECONDS - loop_start)); }
# old_val VERSION: top-1 accuracy of a repository version on version 1's val split (what the
# retrain must not forget), through onnxruntime as the server feeds it.
old_val() {
  trainer evaluate --model-repository "$REPOSITORY" --model classifier --version "$1" \
    --data "$DATA/target/val" --output "$LOOP/old-val-$1" >/dev/null
  python -c 'import json, sys; print("%.3f" % json.load(open(sys.argv[1]))["top1_accuracy"])' \
    "$LOOP/old-val-$1/evaluation.json"
}
free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
server_pid=
cleanup() {
  if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then kill -TERM "$server_pid"; fi
}
trap cleanup EXIT

# measure DIR: "ACCURACY ABSTAINED" of the served model on every image under DIR/<class>/.
measure() {
  client classify --target "127.0.0.1:$grpc_port" --json "$1" | python -c '
import json, sys
from pathlib import Path
results = json.load(sys.stdin)["results"]
right = sum(r["predictions"][0]["label"] == Path(r["path"]).parent.name for r in results)
abstained = sum(r["abstained"] for r in results)
print(f"{right / len(results):.3f} {abstained / len(results):.3f} {len(results)}")'
}

step 1 "production traffic: new images of the target task, split into traffic and held-out"
rm -rf "$LOOP"
trainer make-demo-data "$PRODUCTION" --seed 7 --source-train-per-class 1 \
  --target-train-per-class 60 --val-per-class 1 >/dev/null
python - "$PRODUCTION/target/train" "$TRAFFIC" "$HELD_OUT" <<'PY'
import shutil, sys
from pathlib import Path
source, traffic, held_out = (Path(p) for p in sys.argv[1:])
for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
    for i, image in enumerate(sorted(class_dir.iterdir())):
        target = (traffic if i % 2 == 0 else held_out) / class_dir.name / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
PY
cp -r "$DATA/target" "$LOOP_DATA"

step 2 "serve version 1 with capture for review on"
grpc_port=$(free_port)
server --model-repository "$REPOSITORY" --model-name classifier --grpc-port "$grpc_port" \
  --http-port -1 --metrics-port -1 --poll-interval-s 1 --capture-dir "$CAPTURES" --capture-random-share 0 \
  --capture-per-second 1000 >"$SERVER_LOG" 2>&1 &
server_pid=$!
for _ in $(seq 1 120); do
  if client health --target "127.0.0.1:$grpc_port" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then cat "$SERVER_LOG"; exit 1; fi
  sleep 0.5
done
read -r before_accuracy before_abstained held_count < <(measure "$HELD_OUT")
echo "version 1 on $held_count held-out production images: accuracy $before_accuracy," \
  "abstained $before_abstained"

step 3 "production traffic through version 1; what it was unsure about is captured"
read -r traffic_accuracy traffic_abstained traffic_count < <(measure "$TRAFFIC")
sleep 1  # the capture thread writes behind the requests
captured=$(find "$CAPTURES/unlabeled" -type f ! -name '*.json' | wc -l)
echo "$traffic_count images sent (accuracy $traffic_accuracy, abstained $traffic_abstained);" \
  "$captured captured for review under $CAPTURES/unlabeled/"

step 4 "label the captures (here from the demo's ground truth) and ingest them"
python - "$CAPTURES" "$TRAFFIC" "$LOOP/labels.csv" <<'PY'
import csv, hashlib, sys
from pathlib import Path
captures, traffic, labels_csv = (Path(p) for p in sys.argv[1:])
truth = {hashlib.sha256(p.read_bytes()).hexdigest(): p.parent.name
         for p in traffic.rglob("*") if p.is_file()}
with labels_csv.open("w", newline="") as handle:
    rows = csv.writer(handle)
    rows.writerow(["path", "label"])
    held_out = 0
    for image in sorted((captures / "unlabeled").rglob("*")):
        if image.is_file() and image.suffix != ".json":
            label = truth.get(hashlib.sha256(image.read_bytes()).hexdigest())
            if label is None:
                # Captured while measuring the held-out half: it must stay out of training.
                image.unlink()
                image.with_suffix(image.suffix + ".json").unlink(missing_ok=True)
                held_out += 1
                continue
            rows.writerow([image.relative_to(captures).as_posix(), label])
    print(f"{held_out} captures of held-out images discarded (never trained on)")
PY
# A third of the reviewed images become the holdout set the rollout gate judges version 2 on.
trainer ingest --captures "$CAPTURES" --labels "$LOOP/labels.csv" --data "$LOOP_DATA" \
  --holdout-share 0.3

step 5 "fine-tune from the last model on the grown training set, export version 2"
trainer train --data "$LOOP_DATA" --output "$LOOP/run" \
  --weights "$TARGET_RUN/checkpoints/best.pt" --finetune-epochs 8 --patience 8 \
  --no-export "${COMMON[@]}"
trainer export --checkpoint "$LOOP/run/checkpoints/best.pt" --output-repository "$REPOSITORY" \
  --model-name classifier --data "$LOOP_DATA"

step 6 "the server checks version 2 (golden sets, rollout gate) and rolls it out"
rolled_out=no
for _ in $(seq 1 120); do
  if grep -q "model classifier version 2 ready" "$SERVER_LOG"; then rolled_out=yes; break; fi
  if grep -q "model classifier version 2 rejected" "$SERVER_LOG"; then break; fi
  sleep 0.5
done
grep -E "version 2(:| ready| rejected| warmed)|against 1" "$SERVER_LOG" | sed 's/^/    /' || true
if [[ $rolled_out == yes ]]; then
  sleep 2  # the retired version finishes what it holds
fi

step 7 "held-out production images, before and after"
read -r after_accuracy after_abstained _ < <(measure "$HELD_OUT")
before_old_val=$(old_val 1)
after_old_val=$([[ -d $REPOSITORY/classifier/2 ]] && old_val 2 || echo "-")
kill -TERM "$server_pid"
wait "$server_pid" && status=0 || status=$?
server_pid=
printf '\n%-34s %-10s %-10s\n' "" "version 1" "version 2"
printf '%-34s %-10s %-10s\n' "accuracy on held-out production" "$before_accuracy" "$after_accuracy"
printf '%-34s %-10s %-10s\n' "abstention rate on held-out" "$before_abstained" "$after_abstained"
printf '%-34s %-10s %-10s\n' "accuracy on version 1's val split" "$before_old_val" "$after_old_val"
ingested=$(grep -c '"sha256"' "$LOOP_DATA/ingested.jsonl" || true)
printf '\nVersion 2 rolled out: %s; %s images captured, %s of the traffic half labelled and' \
  "$rolled_out" "$captured" "$ingested"
printf ' ingested; loop wall time %ds;' $((SECONDS - loop_start))
printf ' server exit status %s\n' "$status"
exit "$status"
