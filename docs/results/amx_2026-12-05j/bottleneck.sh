#!/bin/bash
# N = 8, T = 0: which side limits, and what the plan changes. Our cloud (defaults) on CPU 1, the
# edges on CPU 0; variants of the edges one after the other against the same cloud, then
# llama-server --parallel 8 on CPU 1 (its levels run after the first variant's).
set -u
cd /work/main
D=docs/results/amx_2026-12-05j
lscpu | grep -o 'avx512_bf16\|amx_bf16\|amx_tile\|avx2' | sort -u | tr '\n' ' ' > $D/bottleneck.log; echo >> $D/bottleneck.log
taskset -c 1 .venv/bin/sqs-cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999 --metrics-port 50998 --host 127.0.0.1 > $D/bottleneck_cloud.log 2>&1 &
for i in $(seq 1 90); do curl -s 127.0.0.1:50998/metrics >/dev/null 2>&1 && break; sleep 2; done
i=0
for V in "--llama-server --llama-server-cpus 1 --llama-server-threads 1" "--draft-len 2" "--engine torch --dtype bfloat16" \
         "--edge-batch-window-ms 20" "" "--draft-len 2"; do
  i=$((i+1))
  echo "== variant $i: [$V]" >> $D/bottleneck.log; date >> $D/bottleneck.log; uptime >> $D/bottleneck.log
  taskset -c 0 .venv/bin/sqs-loadtest --cloud 127.0.0.1:50999 --cloud-metrics 127.0.0.1:50998 \
    --target-model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b --clients 8 --requests 16 \
    --duration-s 300 --warmup 1 --max-new-tokens 32 --temperature 0 --torch-threads 1 --edge-batch-window-ms 5 \
    $V --json-out $D/v$i.json --no-progress 2>&1 | grep -v "^llama_\|^load:\|^print_info\|^llm_load" >> $D/bottleneck.log
done
pkill -f "sqs-cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999"
for i in $(seq 1 30); do pgrep -f "port 50999" >/dev/null || break; sleep 1; done
