"""Cross-session batched verification (Verifier + PassBatcher + CachedLM.logits_batch), tiny fp32 pair.

Each session's verdicts and random stream must be those of an unbatched run: T = 0 token equality
with a window-0 verifier and with plain greedy decoding of the target, the same verdict seed by seed
at T = 1 and a chi-square test of the first output token against the target's exact p; a malformed
batch fails only its own session; a failed batched pass falls back to per-session passes. Sessions
are attached (as a Verify stream would) so that a pass leader waits for all of them.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy import stats

torch = pytest.importorskip("torch")

from cloud.verifier import SessionError, TargetInfo, Verifier, VerifierConfig  # noqa: E402
from common import codec  # noqa: E402
from common.rejection import target_probs  # noqa: E402
from common.schemes import SchemeConfig, describe, draw  # noqa: E402
from sqs_models.cached_lm import CachedLM  # noqa: E402
from sqs_models.registry import load_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", role="target")


def make_verifier(m, window_ms: float, **cfg) -> Verifier:
    info = TargetInfo(m.name, m.vocab_size, m.fingerprint, ())
    return Verifier(info, lambda: CachedLM(m.model, m.vocab_size),
                    VerifierConfig(batch_window_ms=window_ms, calibrate_rows=(1,), **cfg))


def open_session(v: Verifier, m, context, seed: int, temperature: float, k: int = 8):
    cfg = SchemeConfig("topk", m.vocab_size, k=k, ell=64)
    req = codec.OpenRequest(list(context), codec.Sampling(temperature, 0, 1.0, seed), cfg, m.fingerprint, 8)
    s = v.open(req)
    while not v.prefill_step(s):
        pass
    v.attach(s.id)  # as a Verify stream does: the pass leader waits for attached sessions
    return s, cfg


def drafts_for(m, context, cfg, seed: int, n: int, temperature: float):
    """n drafts from a random (but context-keyed, so reproducible) q: any q keeps the output lossless."""
    rng = np.random.default_rng([seed, len(context), 7])
    ctx, out = list(context), []
    for _ in range(n):
        q = rng.dirichlet(np.full(m.vocab_size, 0.3))
        d = draw(describe(q, cfg), cfg.ell, rng)
        out.append(d)
        ctx.append(d.token)
    return out


def generate(v: Verifier, m, prompt, seed: int, temperature: float, n_tokens: int, barrier=None) -> list[int]:
    s, cfg = open_session(v, m, prompt, seed, temperature)
    if barrier is not None:
        barrier.wait()
    while len(s.context) - len(prompt) < n_tokens:
        drafts = drafts_for(m, s.context, cfg, seed, 3, temperature)
        v.verify(s, codec.pack_batch(len(s.context), drafts, cfg))
    v.release(s.id)
    return s.context[len(prompt):][:n_tokens]


def greedy(m, prompt, n: int) -> list[int]:
    ctx = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = m.model(input_ids=torch.tensor([ctx]), use_cache=False).logits[0, -1, : m.vocab_size]
            ctx.append(int(torch.argmax(logits)))
    return ctx[len(prompt):]


PROMPTS = [[5], [1, 2, 3, 4, 5, 6, 7], list(range(20, 50)), [9] * 13]  # different cached lengths


def run_concurrently(v, m, seeds, temperature, n_tokens):
    barrier = threading.Barrier(len(PROMPTS))
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futs = [pool.submit(generate, v, m, p, seed, temperature, n_tokens, barrier) for p, seed in zip(PROMPTS, seeds)]
        return [f.result(120) for f in futs]


def test_t0_tokens_equal_unbatched_and_plain_greedy(tiny):
    m = tiny
    batched = make_verifier(m, window_ms=500)
    got = run_concurrently(batched, m, [0, 1, 2, 3], 0.0, 24)
    s = batched.pass_stats()
    assert s.passes > 0 and s.max_items >= 2, s  # the passes really were shared
    plain = make_verifier(m, window_ms=0)
    assert plain.pass_stats() is None
    for prompt, seed, out in zip(PROMPTS, [0, 1, 2, 3], got):
        assert out == generate(plain, m, prompt, seed, 0.0, 24)
        assert out == greedy(m, prompt, 24)


def test_t1_each_session_keeps_its_unbatched_random_stream(tiny):
    m = tiny
    seeds = [11, 12, 13, 14]
    got = run_concurrently(make_verifier(m, window_ms=500), m, seeds, 1.0, 20)
    plain = make_verifier(m, window_ms=0)
    for prompt, seed, out in zip(PROMPTS, seeds, got):
        assert out == generate(plain, m, prompt, seed, 1.0, 20)


@pytest.mark.slow
def test_t1_first_token_through_the_batched_path_is_distributed_as_the_target(tiny):
    """Chi-square of the first output token of 2,400 sessions (batches of 8) against p(. | context)."""
    m = tiny
    context = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.inference_mode():
        logits = m.model(input_ids=torch.tensor([context]), use_cache=False).logits[0, -1, : m.vocab_size]
    p = target_probs(logits.double().numpy()[None], 1.0)[0]
    v = make_verifier(m, window_ms=500, max_sessions=64)
    n, width = 2400, 8
    firsts: list[int] = []

    def one(seed, barrier):
        s, cfg = open_session(v, m, context, seed, 1.0)
        barrier.wait()
        v.verify(s, codec.pack_batch(len(s.context), drafts_for(m, context, cfg, seed, 2, 1.0), cfg))
        v.release(s.id)
        v.close(s.id)
        return s.context[len(context)]

    with ThreadPoolExecutor(width) as pool:
        for start in range(0, n, width):
            barrier = threading.Barrier(width)
            firsts += [f.result(60) for f in [pool.submit(one, seed, barrier) for seed in range(start, start + width)]]
    assert v.pass_stats().mean_items() > 4
    counts = np.bincount(firsts, minlength=m.vocab_size)
    expected = p * n
    big = expected >= 5  # pool the rare tokens into one cell
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_a_malformed_batch_fails_only_its_own_session(tiny):
    m = tiny
    v = make_verifier(m, window_ms=500)
    sessions = [open_session(v, m, p, i, 0.0) for i, p in enumerate(PROMPTS[:3])]
    barrier = threading.Barrier(3)

    def round_of(i):
        s, cfg = sessions[i]
        # Session 1's batch does not continue its position: INVALID_ARGUMENT, before any batching.
        position = len(s.context) + (5 if i == 1 else 0)
        msg = codec.pack_batch(position, drafts_for(m, s.context, cfg, i, 3, 0.0), cfg)
        barrier.wait()
        return v.verify(s, msg)

    with ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(round_of, i) for i in range(3)]
        with pytest.raises(SessionError) as err:
            futs[1].result(60)
        assert err.value.code == "INVALID_ARGUMENT"
        good = [futs[0].result(60), futs[2].result(60)]
    # The others are served (the malformed batch closed its session, so the leader stops waiting for it)
    # and their tokens are still the target's greedy ones.
    assert all(not r.replayed for r in good)
    with pytest.raises(SessionError):
        v.get(sessions[1][0].id)
    for (s, _), prompt in zip([sessions[0], sessions[2]], [PROMPTS[0], PROMPTS[2]]):
        assert s.context[len(prompt):] == greedy(m, prompt, len(s.context) - len(prompt))


def test_a_failed_batched_pass_falls_back_to_one_pass_per_session(tiny, monkeypatch):
    m = tiny

    def broken(lms, contexts, wants):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(CachedLM, "logits_batch", staticmethod(broken))
    got = run_concurrently(make_verifier(m, window_ms=500), m, [0, 1, 2, 3], 0.0, 8)
    for prompt, out in zip(PROMPTS, got):
        assert out == greedy(m, prompt, 8)


def test_the_pass_table_records_each_shared_pass_at_the_rows_of_all_its_sessions(tiny):
    m = tiny
    v = make_verifier(m, window_ms=500)
    run_concurrently(v, m, [0, 1, 2, 3], 0.0, 8)
    table, stats = v.pass_table(), v.pass_stats()
    assert stats.max_items >= 2  # passes were shared
    # Every round carries 3 drafts + 1 = 4 rows: a shared pass is recorded at 4 x its sessions.
    assert max(table) >= 8 and all(r % 4 == 0 for r in table) and all(ms > 0 for ms in table.values())
