#!/bin/bash
# llama.cpp's own llama-bench (built with llama-server, without AMX: scripts/llama_build_flags.sh,
# target llama-bench added by hand to that build) on the PyPI 1.5B Q4_K_M, one thread on CPU 1:
# a pass of n prompt rows with the weight repacking off (--repack 0) and on (--repack 1), 5
# repetitions each, twice with the order reversed. ms/pass = 1000 n / (tokens/s).
M=$HOME/.cache/sqs-sd/models/qwen2.5-coder-1.5b/model.gguf
for ord in 1,0 0,1; do
  taskset -c 1 ${LLAMA_BENCH:-/tmp/lcb/build/bin/llama-bench} -m $M -t 1 -p 1,4,8,16,32 -n 0 -r 5 --repack $ord -o csv 2>/dev/null |
  python3 -c "
import csv,sys
for r in csv.DictReader(sys.stdin):
    n=int(r['n_prompt']); ts=float(r['avg_ts']); sd=float(r['stddev_ts'])
    print('repack', r['repack'], 'rows', n, f'{ts:.1f}+-{sd:.1f} tok/s', f'{1000*n/ts:.0f} ms/pass')"
done
