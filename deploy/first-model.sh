#!/usr/bin/env bash
# Runs the README's "Your first model, offline" block exactly as written (`make first-model`):
# the bash block between the first-model markers, from the repository root, stopping at the
# first failing command. A server it started in the background is stopped on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."

block=$(awk '/<!-- first-model:begin -->/ {inside = 1; next}
             /<!-- first-model:end -->/ {inside = 0}
             inside && !/^```/' README.md)
if [[ -z $block ]]; then
  echo "first-model: README.md has no first-model block" >&2
  exit 1
fi
printf '%s\n' "$block"
exec bash -euo pipefail -c "trap 'kill \$(jobs -p) 2>/dev/null || true' EXIT
$block"
