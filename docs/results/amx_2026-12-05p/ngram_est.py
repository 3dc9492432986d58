"""How many tokens prompt-lookup (n-gram) guesses would add per cloud step: greedy 64 tokens of the 1.5B
Q4_0 for 8 code and 8 prose prompts, then at each position the continuation of the latest earlier match
of the last 3, 2 or 1 tokens, k tokens long; printed: (accepted guess tokens, guessed tokens) by k.
Output (copied from the terminal): ngram_est.txt."""
import numpy as np
from pathlib import Path
from sqs_models.llama_lm import LlamaModel
from bench.prompts import CODE_PROMPTS, wiki_prompts
from transformers import AutoTokenizer
d = Path.home() / ".cache/sqs-sd/models/qwen2.5-coder-1.5b"
tok = AutoTokenizer.from_pretrained(d)
m = LlamaModel(d / "model.Q4_0.gguf", threads=1, vocab_size=151936)
def propose(ctx, k, mmax=3):
    for mlen in range(mmax, 0, -1):
        if len(ctx) <= mlen: continue
        key = ctx[-mlen:]
        for s in range(len(ctx) - mlen - 1, -1, -1):
            if ctx[s:s + mlen] == key:
                return ctx[s + mlen: s + mlen + k]
    return []
for kind, prompts in (("code", list(CODE_PROMPTS)), ("prose", wiki_prompts(8))):
    tot = {k: [0, 0] for k in (1, 2, 3, 7)}
    for p in prompts:
        lm = m.new_lm(); ids = tok.encode(p); gen = []
        for _ in range(64):
            lg = lm.logits(ids + gen, want=1)
            gen.append(int(np.argmax(lg[-1])))
        full = ids + gen
        for n in range(len(ids), len(full) - 1):
            for k in tot:
                g = propose(full[:n + 1], k)
                acc = 0
                for j, t in enumerate(g):
                    if n + 1 + j < len(full) and full[n + 1 + j] == t: acc += 1
                    else: break
                tot[k][0] += acc; tot[k][1] += len(g)
        print(kind, repr(tok.decode(gen)[:80]), flush=True)
    print(kind, {k: (v[0], v[1]) for k, v in tot.items()})
