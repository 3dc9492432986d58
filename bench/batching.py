"""Would verifying several sessions' batches in one forward pass raise cloud throughput?

Measures, on the target model, S sessions each verifying L+1 new tokens over a cached prefix of P
tokens: S separate forward passes (what sqs-cloud does) against one forward pass with batch size S
(a batched verifier), same shapes, same cache contents. Prints ms per round of S sessions and the
speed-up; a batched verifier is only worth building where the speed-up is clearly above 1.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache


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
    return 0
