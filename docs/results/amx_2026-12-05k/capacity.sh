#!/bin/bash
# Capacity: our cloud (defaults) vs llama-server --parallel N on CPU 1; edges on CPU 0.
set -u
cd /work/main
D=docs/results/amx_2026-12-05k
lscpu | grep -o 'avx512_bf16\|amx_bf16\|amx_tile\|avx2' | sort -u | tr '\n' ' ' > $D/capacity.log; echo >> $D/capacity.log
taskset -c 1 .venv/bin/sqs-cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999 --metrics-port 50998 --host 127.0.0.1 > $D/capacity_cloud.log 2>&1 &
for i in $(seq 1 90); do curl -s 127.0.0.1:50998/metrics >/dev/null 2>&1 && break; sleep 2; done
for T in 0 1; do
  date >> $D/capacity.log; uptime >> $D/capacity.log
  taskset -c 0 .venv/bin/sqs-loadtest --cloud 127.0.0.1:50999 --cloud-metrics 127.0.0.1:50998 \
    --target-model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b --clients 1 4 8 16 --requests 16 \
    --duration-s 300 --warmup 1 --max-new-tokens 32 --temperature $T --torch-threads 1 --edge-batch-window-ms 5 \
    --llama-server --llama-server-cpus 1 --llama-server-threads 1 \
    --json-out $D/capacity_T$T.json --csv-out $D/capacity_T$T.csv --no-progress 2>&1 | grep -v "^llama_\|^load:\|^print_info\|^llm_load" >> $D/capacity.log
done
curl -s 127.0.0.1:50998/metrics | grep -E "^sqs_pass_(rows|sessions)_(sum|count)|^sqs_cloud_info" >> $D/capacity.log
pkill -f "sqs-cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999"
for i in $(seq 1 30); do pgrep -f "port 50999" >/dev/null || break; sleep 1; done
