#!/bin/bash
# The two cells issue 20 still misses, paired with llama-server and repeated: N = 8 at T = 0 and
# N = 16 at T = 1, 64 requests x 32 tokens per side. Our cloud (defaults, this commit) on CPU 1 for
# the whole run; each sqs-loadtest runs our edges (CPU 0) against it, then llama-server --parallel N
# on CPU 1. Two repetitions, cells interleaved. One run.
set -u
cd /work/main
O=docs/results/amx_2026-12-05n/cells; mkdir -p $O
L=$O/run.log
lscpu | grep -o 'avx512_bf16\|amx_bf16\|amx_tile\|avx2' | sort -u | tr '\n' ' ' > $L; echo >> $L
git rev-parse HEAD >> $L
taskset -c 1 .venv/bin/sqs-cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999 --metrics-port 50998 --host 127.0.0.1 > $O/cloud.log 2>&1 &
for k in $(seq 1 90); do curl -s 127.0.0.1:50998/metrics >/dev/null 2>&1 && break; sleep 2; done
for rep in 1 2; do
  for cell in "8 0" "16 1"; do
    set -- $cell
    echo "== rep $rep N=$1 T=$2 $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >> $L
    taskset -c 0 .venv/bin/sqs-loadtest --cloud 127.0.0.1:50999 --cloud-metrics 127.0.0.1:50998 \
      --target-model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b --clients $1 --requests 64 \
      --duration-s 600 --warmup 1 --max-new-tokens 32 --temperature $2 --torch-threads 1 --edge-batch-window-ms 5 \
      --llama-server --llama-server-cpus 1 --llama-server-threads 1 \
      --json-out $O/r${rep}_N$1_T$2.json --no-progress 2>&1 | grep -v "^llama_\|^load:\|^print_info\|^llm_load" >> $L
  done
done
curl -s 127.0.0.1:50998/metrics | grep -E "^sqs_pass_(rows|sessions)_(sum|count)" >> $L
pkill -f "sqs-cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999"
