"""Pass ms of the 0.5B draft, Q4_0 (made by sqs_models.quantize, refused as a target type: KL 0.095, top-1
0.812 against bf16) against the PyPI Q4_K_M, repacked llama.cpp, 1 thread, fastest of 5 (time_passes).
Run pinned: taskset -c 1 .venv/bin/python this file. Output (copied from the terminal): draft_table.txt."""
from pathlib import Path
from sqs_models.llama_lm import LlamaModel
from sqs_models.engines import time_passes
d = Path.home() / ".cache/sqs-sd/models/qwen2.5-coder-0.5b"
ROWS = [1, 2, 3, 4, 5, 8, 12, 16]
ms = {n: LlamaModel(d / f, threads=1, vocab_size=151936) for n, f in (("Q4_0", "model.Q4_0.gguf"), ("Q4_K_M", "model.gguf"))}
lms = {w: m.new_lm() for w, m in ms.items()}
print({w: (m.description, m.extra_bufts) for w, m in ms.items()})
print("rows  " + "  ".join(f"{w:>8}" for w in lms))
for r in ROWS:
    t = {w: time_passes(lm, 151936, [r], repeats=5)[r] for w, lm in lms.items()}
    print(f"{r:4d}  " + "  ".join(f"{x:8.1f}" for x in t.values()), flush=True)
