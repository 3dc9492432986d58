#!/bin/bash
# cells.sh again with shared passes that drop lookahead draft rows where they cost more than they
# commit (common/pass_shape.py): N = 8 at T = 0 and N = 16 at T = 1, 64 requests x 32 tokens per
# side, our cloud with its defaults on CPU 1, llama-server --parallel N on the same GGUF ($GGUF). One run.
set -u
cd /work/main
O=docs/results/amx_2026-12-05o/cells_shaped; mkdir -p $O
L=$O/run.log
GGUF=${GGUF:?the GGUF our cloud kept}
lscpu | grep -o 'avx512_bf16\|amx_bf16\|amx_tile\|avx2' | sort -u | tr '\n' ' ' > $L; echo >> $L
git rev-parse HEAD >> $L
echo "llama-server and our cloud on $GGUF" >> $L
taskset -c 1 .venv/bin/sqs-cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999 --metrics-port 50998 --host 127.0.0.1 > $O/cloud.log 2>&1 &
for k in $(seq 1 300); do curl -s 127.0.0.1:50998/metrics >/dev/null 2>&1 && break; sleep 2; done
grep "sqs.cloud target" $O/cloud.log | cut -c1-400 >> $L
for cell in "8 0" "16 1"; do
  set -- $cell
  echo "== N=$1 T=$2 $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >> $L
  taskset -c 0 .venv/bin/sqs-loadtest --cloud 127.0.0.1:50999 --cloud-metrics 127.0.0.1:50998 \
    --target-model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b --clients $1 --requests 64 \
    --duration-s 600 --warmup 1 --max-new-tokens 32 --temperature $2 --torch-threads 1 --edge-batch-window-ms 5 \
    --llama-server --llama-server-cpus 1 --llama-server-threads 1 --llama-server-model $GGUF \
    --json-out $O/N$1_T$2.json --no-progress 2>&1 | grep -v "^llama_\|^load:\|^print_info\|^llm_load" >> $L
done
curl -s 127.0.0.1:50998/metrics | grep -E "^sqs_pass_(rows|sessions)_(sum|count)" >> $L
pkill -f "sqs-cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999"
