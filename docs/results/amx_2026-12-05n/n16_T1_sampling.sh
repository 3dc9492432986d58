#!/bin/bash
# N = 16, T = 1 (32 requests x 32 tokens), paired: our cloud at the new code (lazy Gumbel noise,
# target_probs without the T = 1 division) and at 1e83058 (a worktree in /tmp/old), alternating
# new / old / new / old on CPU 1 with the edges (defaults) on CPU 0; then llama-server
# --parallel 16 on CPU 1. One run.
set -u
cd /work/main
O=docs/results/amx_2026-12-05n/n16_T1_sampling; mkdir -p $O
L=$O/run.log
lscpu | grep -o 'avx512_bf16\|amx_bf16\|amx_tile\|avx2' | sort -u | tr '\n' ' ' > $L; echo >> $L
git rev-parse HEAD >> $L
i=0
for V in new old new old last; do
  i=$((i+1))
  if [ $V = old ]; then CODE=/tmp/old; else CODE=/work/main; fi
  (cd $CODE && PYTHONPATH=$CODE taskset -c 1 /work/main/.venv/bin/python -m cloud --model qwen2.5-coder-1.5b --torch-threads 1 \
     --port 50999 --metrics-port 50998 --host 127.0.0.1 > /work/main/$O/cloud$i.log 2>&1 &)
  for k in $(seq 1 90); do curl -s 127.0.0.1:50998/metrics >/dev/null 2>&1 && break; sleep 2; done
  A=""; [ $V = last ] && A="--llama-server --llama-server-cpus 1 --llama-server-threads 1"
  echo "== $i $V $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg) $A" >> $L
  taskset -c 0 .venv/bin/sqs-loadtest --cloud 127.0.0.1:50999 --cloud-metrics 127.0.0.1:50998 \
    --target-model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b --clients 16 --requests 32 \
    --duration-s 400 --warmup 1 --max-new-tokens 32 --temperature 1 --torch-threads 1 --edge-batch-window-ms 5 \
    $A --json-out $O/v$i.json --no-progress 2>&1 | grep -v "^llama_\|^load:\|^print_info\|^llm_load" >> $L
  pkill -f "cloud --model qwen2.5-coder-1.5b --torch-threads 1"
  for k in $(seq 1 30); do pgrep -f "port 50999" >/dev/null || break; sleep 1; done
done
