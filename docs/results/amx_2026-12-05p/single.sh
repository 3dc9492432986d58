#!/bin/bash
# One client, both sides with their defaults (llama.cpp built without AMX, repacking on): llama-server
# serving the GGUF our cloud's auto choice keeps ($GGUF), our cloud and llama-server on CPU 1, our edge
# on CPU 0; 8 code + 8 prose prompts x 64 tokens, T = 0 and 1. Then the same with the code before the
# lumpy-table planning (f9ba7cf, from a git worktree at $OLD), with its own llama-ar row: one run.
# BEFORE_FIRST=1 runs the code before first (the blocks in the other order); O= another output
# folder; ROWS= the head's rows (default llama-ar sqs-cloud sqs-sd).
set -u
cd /work/main
O=${O:-docs/results/amx_2026-12-05p/single}; mkdir -p $O $O/before
GGUF=${GGUF:?the GGUF our cloud kept}
OLD=${OLD:?a git worktree of f9ba7cf}
{ lscpu | grep -o 'avx512_bf16\|amx_bf16\|amx_tile\|avx2' | sort -u | tr '\n' ' '; echo; git rev-parse HEAD; } > $O/run.log
run_head() {
.venv/bin/sqs-bench llama-server --server-cpus 1 --edge-cpus 0 --threads 1 --engine auto --temperatures 0 1 \
  --prompts 8 --prose-prompts 8 --max-new-tokens 64 --rows ${ROWS:-llama-ar sqs-cloud sqs-sd} \
  --llama-server-model $GGUF --out $O --no-progress 2>&1 | grep -v "^llama_\|^load:\|^print_info\|^llm_load" >> $O/run.log
}
run_before() {
{ echo "== before: $(git -C $OLD rev-parse HEAD)"; } >> $O/run.log
(cd $OLD && PYTHONPATH=$OLD /work/main/.venv/bin/python -c "import sys; from bench.cli import main; sys.exit(main())" llama-server --server-cpus 1 --edge-cpus 0 \
  --threads 1 --engine auto --temperatures 0 1 --prompts 8 --prose-prompts 8 --max-new-tokens 64 \
  --rows llama-ar sqs-sd --llama-server-model $GGUF --out /work/main/$O/before --no-progress 2>&1 \
  | grep -v "^llama_\|^load:\|^print_info\|^llm_load") >> $O/run.log
}
if [ "${BEFORE_FIRST:-0}" = 1 ]; then run_before; run_head; else run_head; run_before; fi
