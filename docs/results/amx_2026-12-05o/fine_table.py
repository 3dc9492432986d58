"""Pass cost by every row count 1..17 (and 24, 32, 33) of the 1.5B target on repacked llama.cpp, one
thread, Q4_0 and Q4_K_M interleaved row by row (fastest of 5 after a warm-up, 32-token warm cache):
the shape common/pass_shape.py works on. Run pinned: taskset -c 1 .venv/bin/python this file."""
import subprocess

from sqs_models.engines import load_engine, time_passes

ROWS = list(range(1, 18)) + [24, 32, 33]
engines = {name: load_engine("qwen2.5-coder-1.5b", "target", engine="llama", weight_type=w, threads=1)
           for name, w in (("Q4_0", "Q4_0"), ("Q4_K_M", None))}  # None: the model's own file, the PyPI Q4_K_M
lms = {w: e.new_lm() for w, e in engines.items()}
print(subprocess.run("lscpu | grep -o 'avx512_bf16\\|amx_bf16\\|amx_tile\\|avx2' | sort -u | tr '\\n' ' '",
                     shell=True, capture_output=True, text=True).stdout)
print("rows  " + "  ".join(f"{w:>8}" for w in lms) + "   (ms per pass; ms per row)")
for r in ROWS:
    t = {w: time_passes(lm, engines[w].vocab_size, [r], repeats=5)[r] for w, lm in lms.items()}
    print(f"{r:4d}  " + "  ".join(f"{ms:8.1f}" for ms in t.values()) + "   "
          + "  ".join(f"{ms / r:6.1f}" for ms in t.values()))
