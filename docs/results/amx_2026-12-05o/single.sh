#!/bin/bash
# One client, both sides with their defaults on llama.cpp built without AMX (repacking on): llama-server
# serving the GGUF our cloud's auto choice keeps ($GGUF, the start log of cells.sh), our cloud and
# llama-server on CPU 1, our edge on CPU 0; 8 code + 8 prose prompts x 64 tokens, T = 0 and 1.
set -u
cd /work/main
O=docs/results/amx_2026-12-05o/single; mkdir -p $O
GGUF=${GGUF:?the GGUF our cloud kept}
{ lscpu | grep -o 'avx512_bf16\|amx_bf16\|amx_tile\|avx2' | sort -u | tr '\n' ' '; echo; git rev-parse HEAD; } > $O/run.log
.venv/bin/sqs-bench llama-server --server-cpus 1 --edge-cpus 0 --threads 1 --engine auto --temperatures 0 1 \
  --prompts 8 --prose-prompts 8 --max-new-tokens 64 --rows llama-ar sqs-cloud sqs-sd \
  --llama-server-model $GGUF --out $O --no-progress 2>&1 | grep -v "^llama_\|^load:\|^print_info\|^llm_load" >> $O/run.log
