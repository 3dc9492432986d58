#!/bin/bash
# A/B of one client at T = 0: B = commit 1830bbb (a worktree at /tmp/old put first on PYTHONPATH,
# so the bench and the clouds and edges it starts import it), then A = 8980ea3; one after the other.
# Outputs copied here: A in this folder, B in old_1830bbb/.
cd /work/main
for V in B A; do
  if [ $V = B ]; then export PYTHONPATH=/tmp/old; else unset PYTHONPATH; fi
  .venv/bin/sqs-bench llama-server --server-cpus 1 --edge-cpus 0 --threads 1 --engine auto --temperatures 0 \
    --prompts 8 --prose-prompts 8 --max-new-tokens 64 --rows llama-ar sqs-sd --out /tmp/cap/ab$V > /tmp/cap/ab$V.out 2>&1
done
