#!/bin/bash
# docs/results/amx_2026-12-05o/hold_experiment (run from /tmp/r/exp with the patch applied in a worktree at /tmp/wt).
# Experiment (not landed): the batcher waits for the last pass's sessions whenever merging their rows
# costs at most half their own pass, on the pass table as measured. N = 8, T = 0, with llama-server.
set -u
O=/tmp/r/exp; L=$O/run.log
GGUF=$HOME/.cache/sqs-sd/models/qwen2.5-coder-1.5b/model.Q4_0.gguf
(cd /tmp/wt && git diff) > $O/patch.diff
cd /tmp/wt
PYTHONPATH=/tmp/wt taskset -c 1 /work/main/.venv/bin/python -m cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999 --metrics-port 50998 --host 127.0.0.1 > $O/cloud.log 2>&1 &
for k in $(seq 1 300); do curl -s 127.0.0.1:50998/metrics >/dev/null 2>&1 && break; sleep 2; done
cd /work/main
echo "== N=8 T=0 $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" > $L
taskset -c 0 .venv/bin/sqs-loadtest --cloud 127.0.0.1:50999 --cloud-metrics 127.0.0.1:50998 \
  --target-model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b --clients 8 --requests 64 \
  --duration-s 600 --warmup 1 --max-new-tokens 32 --temperature 0 --torch-threads 1 --edge-batch-window-ms 5 \
  --llama-server --llama-server-cpus 1 --llama-server-threads 1 --llama-server-model $GGUF \
  --json-out $O/N8_T0.json --no-progress 2>&1 | grep -v "^llama_\|^load:\|^print_info\|^llm_load" >> $L
curl -s 127.0.0.1:50998/metrics | grep -E "^sqs_pass_(rows|sessions)_(sum|count)|^sqs_pass_rows_dropped_total" >> $L
pkill -f "cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999"
