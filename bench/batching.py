"""Would verifying several sessions' batches in one forward pass raise cloud throughput?

Measures, on the target model, S sessions each verifying L+1 new tokens over a cached prefix of P
tokens: S separate forward passes (what sqs-cloud does) against one forward pass with batch size S
(a batched verifier), same shapes, same cache contents. Prints ms per round of S sessions and the
speed-up; a batched verifier is only worth building where the speed-up is clearly above 1.

Then the path sqs-cloud really runs (`measure_cached`): S CachedLM sessions with DIFFERENT cached
lengths (prefix - 8 ... prefix + 8 tokens, so the pass is padded), each verifying L+1 new tokens,
through CachedLM.logits_batch (one padded pass) against S unbatched CachedLM.logits calls: the
rows-vs-time curve of the target's batched pass (rows = S x (L+1)), ms per pass and per row.
Record `lscpu` flags with the numbers (main_batching prints them).
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from bench.machine import cpu_flags


def _prefill(model, ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    with torch.inference_mode():
        return model(input_ids=ids, past_key_values=cache, use_cache=True).past_key_values


def measure(model, vocab: int, sessions: int = 4, new_tokens: int = 9, prefix: int = 32, repeats: int = 3,
            seed: int = 0) -> dict:
    times: list[float] = []
    g = torch.Generator().manual_seed(seed)
    prefix_ids = torch.randint(0, min(vocab, 30000), (sessions, prefix), generator=g)
    new_ids = torch.randint(0, min(vocab, 30000), (sessions, new_tokens), generator=g)

    def separate() -> None:
        for s in range(sessions):
            cache = _prefill(model, prefix_ids[s : s + 1])
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=new_ids[s : s + 1], past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t0)

    def batched() -> None:
        cache = _prefill(model, prefix_ids)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=new_ids, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t0)

    out = {}
    for name, fn in (("separate", separate), ("batched", batched)):
        fn()  # warm-up
        times.clear()
        for _ in range(repeats):
            fn()
        out[name] = sum(times) / repeats * 1e3  # ms per round of all sessions
    out["speedup"] = out["separate"] / out["batched"]
    return out


def measure_cached(model, vocab: int, sessions: int = 4, new_tokens: int = 9, prefix: int = 32, repeats: int = 3,
                   seed: int = 0) -> dict:
    """ms of one CachedLM.logits_batch pass over `sessions` ragged caches vs the unbatched calls."""
    from sqs_models.cached_lm import CachedLM

    g = torch.Generator().manual_seed(seed)
    spread = [prefix + (8 * (2 * s - sessions + 1)) // max(1, sessions) for s in range(sessions)]  # ragged lengths
    bases = [torch.randint(0, min(vocab, 30000), (max(1, n),), generator=g).tolist() for n in spread]
    lms = [CachedLM(model, vocab) for _ in range(sessions)]
    for lm, base in zip(lms, bases):
        lm.logits(base, want=1)  # prefill, not timed
    out: dict = {"cached": spread}
    for name in ("separate", "batched"):
        times = []
        for r in range(repeats + 1):  # the first is a warm-up of the shape
            news = [torch.randint(0, min(vocab, 30000), (new_tokens,), generator=g).tolist() for _ in lms]
            ctxs = [base + new for base, new in zip(bases, news)]  # the caches crop back to the base each time
            t0 = time.perf_counter()
            if name == "separate":
                for lm, ctx in zip(lms, ctxs):
                    lm.logits(ctx, want=new_tokens)
            else:
                CachedLM.logits_batch(lms, ctxs, [new_tokens] * sessions)
            if r:
                times.append(time.perf_counter() - t0)
        out[name] = sorted(times)[len(times) // 2] * 1e3  # median ms for all sessions
    out["rows"] = sessions * new_tokens
    out["speedup"] = out["separate"] / out["batched"]
    return out


def main_batching(args) -> int:
    from sqs_models.registry import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    m = load_model(args.model, role="target")
    print(f"{m.name}, dtype {m.dtype}, torch threads {torch.get_num_threads()}, prefix {args.prefix} tokens, "
          f"{args.new_tokens} new tokens per session")
    print(f"{'sessions':>8} {'separate ms':>12} {'batched ms':>11} {'speed-up':>9}")
    for s in args.sessions:
        r = measure(m.model, m.vocab_size, s, args.new_tokens, args.prefix, args.repeats)
        print(f"{s:>8} {r['separate']:>12.1f} {r['batched']:>11.1f} {r['speedup']:>9.2f}")
    print(f"\nthe cloud's path: CachedLM.logits_batch over ragged caches (~{args.prefix} +- 8 tokens), CPU flags: "
          f"{cpu_flags()}")
    print(f"{'sessions':>8} {'rows':>5} {'separate ms':>12} {'batched ms':>11} {'ms/row':>7} {'speed-up':>9}")
    for s in args.sessions:
        r = measure_cached(m.model, m.vocab_size, s, args.new_tokens, args.prefix, args.repeats)
        print(f"{s:>8} {r['rows']:>5} {r['separate']:>12.1f} {r['batched']:>11.1f} {r['batched'] / r['rows']:>7.1f} "
              f"{r['speedup']:>9.2f}")
    return 0
