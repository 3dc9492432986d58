#!/bin/bash
# N = 16, T = 1, two waves (32 requests x 32 tokens): our cloud (defaults) on CPU 1, the edges on
# CPU 0 with --lookahead 3 (default), 0, 3, 0 one after the other against it; the last variant then
# runs llama-server --parallel 16 on CPU 1. One run.
set -u
cd /work/main
O=docs/results/amx_2026-12-05k/n16_T1; mkdir -p $O
lscpu | grep -o 'avx512_bf16\|amx_bf16\|amx_tile\|avx2' | sort -u | tr '\n' ' ' > $O/n16_T1.log; echo >> $O/n16_T1.log
taskset -c 1 .venv/bin/sqs-cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999 --metrics-port 50998 --host 127.0.0.1 > $O/cloud.log 2>&1 &
for i in $(seq 1 90); do curl -s 127.0.0.1:50998/metrics >/dev/null 2>&1 && break; sleep 2; done
i=0
for A in "--lookahead 3" "--lookahead 0" "--lookahead 3" "--lookahead 0 --llama-server --llama-server-cpus 1 --llama-server-threads 1"; do
  i=$((i+1)); echo "== $i [$A]" >> $O/n16_T1.log
  taskset -c 0 .venv/bin/sqs-loadtest --cloud 127.0.0.1:50999 --cloud-metrics 127.0.0.1:50998 \
    --target-model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b --clients 16 --requests 32 \
    --duration-s 300 --warmup 1 --max-new-tokens 32 --temperature 1 --torch-threads 1 --edge-batch-window-ms 5 \
    $A --json-out $O/v$i.json --no-progress 2>&1 | grep -v "^llama_\|^load:\|^print_info\|^llm_load" >> $O/n16_T1.log
done
pkill -f "sqs-cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999"
for i in $(seq 1 30); do pgrep -f "port 50999" >/dev/null || break; sleep 1; done
