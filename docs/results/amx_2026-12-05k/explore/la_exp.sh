#!/bin/bash
# N=8 T=0: lookahead 0 vs 2 vs 3 against one cloud (defaults)
set -u
cd /work/main
O=/tmp/x/la_exp; mkdir -p $O
taskset -c 1 .venv/bin/sqs-cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999 --metrics-port 50998 --host 127.0.0.1 > $O/cloud.log 2>&1 &
for i in $(seq 1 90); do curl -s 127.0.0.1:50998/metrics >/dev/null 2>&1 && break; sleep 2; done
for A in "$@"; do
taskset -c 0 .venv/bin/sqs-loadtest --cloud 127.0.0.1:50999 --cloud-metrics 127.0.0.1:50998 \
    --target-model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b --clients ${N:-8} --requests 16 \
    --duration-s 300 --warmup 1 --max-new-tokens 32 --temperature ${T:-0} --torch-threads 1 --edge-batch-window-ms 5 \
    $A --no-progress 2>&1 | grep -A1 "^clients\|drafts sent ahead" | grep -v "^clients\|^--" | sed "s/^/[$A] /"
done
pkill -f "port 50999"
