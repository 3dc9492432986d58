#!/bin/bash
set -u
cd /work/main
D=docs/results/amx_2026-12-05h/n16_T1; mkdir -p $D
for R in 1 0; do
taskset -c 1 .venv/bin/sqs-cloud --model qwen2.5-coder-1.5b --torch-threads 1 --port 50999 --metrics-port 50998 --host 127.0.0.1 --batch-rejoin $R > $D/cloud$R.log 2>&1 &
for i in $(seq 1 90); do curl -s 127.0.0.1:50998/metrics >/dev/null 2>&1 && break; sleep 2; done
LS=""; [ $R = 0 ] && LS="--llama-server --llama-server-cpus 1 --llama-server-threads 1"
echo "== rejoin $R" >> $D/out.log
curl -s 127.0.0.1:50998/metrics | grep -E "^sqs_pass_(rows|sessions)_(sum|count)" >> $D/out.log
taskset -c 0 .venv/bin/sqs-loadtest --cloud 127.0.0.1:50999 --cloud-metrics 127.0.0.1:50998 \
    --target-model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b --clients 16 --requests 32 \
    --duration-s 300 --warmup 1 --max-new-tokens 32 --temperature 1 --torch-threads 1 --edge-batch-window-ms 5 $LS \
    --json-out $D/r$R.json --no-progress 2>&1 | grep -A2 "^clients" >> $D/out.log
curl -s 127.0.0.1:50998/metrics | grep -E "^sqs_pass_(rows|sessions)_(sum|count)" >> $D/out.log
pkill -f "port 50999"; sleep 3
done
