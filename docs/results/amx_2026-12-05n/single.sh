#!/bin/bash
# One client, defaults on both sides; also our plain decoding (sqs-cloud row, --draft-len 0) for the
# "within 5% of llama-server AR" target. One run: llama-ar, then sqs-cloud, then sqs-sd.
set -u
cd /work/main
D=docs/results/amx_2026-12-05n/single; mkdir -p $D
lscpu | grep -o 'avx512_bf16\|amx_bf16\|amx_tile\|avx2' | sort -u | tr '\n' ' ' > $D/single.log; echo >> $D/single.log
date >> $D/single.log; uptime >> $D/single.log
.venv/bin/sqs-bench llama-server --server-cpus 1 --edge-cpus 0 --threads 1 --engine auto --temperatures 0 1 \
  --prompts 8 --prose-prompts 8 --max-new-tokens 64 --rows llama-ar sqs-cloud sqs-sd --out $D 2>&1 \
  | grep -v "^llama_\|^load:\|^print_info\|^llm_load" >> $D/single.log
