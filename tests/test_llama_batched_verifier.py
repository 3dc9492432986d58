"""The verifier and the gRPC cloud on llama.cpp batched across sessions (BatchedLlamaLM), tiny GGUF.

Same guarantees as the torch batcher (tests/test_batching_verifier.py, whose helpers drive the
sessions here): T = 0 tokens equal to an unbatched verifier on per-session LlamaLMs and to plain
greedy decoding; each session's T = 1 random stream unchanged; the first output token at T = 1
distributed as the target's p (chi-square); a failing item fails only its own session. Through gRPC,
whole generations at T = 0 are the same with batching on and off, and the cloud exports rows and
sessions per pass (sqs_pass_rows, sqs_pass_sessions).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")

from cloud.server import CloudConfig, create_server  # noqa: E402
from cloud.verifier import TargetInfo, Verifier, VerifierConfig  # noqa: E402
from common import codec  # noqa: E402
from common.rejection import target_probs  # noqa: E402
from sqs_models.engines import Engine  # noqa: E402
from sqs_models.llama_batched import BatchedLlama, BatchedLlamaLM  # noqa: E402
from sqs_models.llama_lm import LlamaLM  # noqa: E402
from sqs_models.registry import load_model  # noqa: E402
from tests.test_batching_verifier import PROMPTS, drafts_for, generate, open_session, run_concurrently  # noqa: E402
from tests.test_rejection_stats import pooled_chisquare_pvalue  # noqa: E402


@pytest.fixture(scope="module")
def meta():
    """The tiny target as the protocol sees it (name, vocab, tokenizer fingerprint): the GGUF's source."""
    return load_model("tiny", role="target")


@pytest.fixture(scope="module")
def model(tiny_llama_target):
    return tiny_llama_target


def make_verifier(meta, model, window_ms: float, **cfg) -> Verifier:
    """window_ms > 0: batched LMs (sequences of shared contexts); 0: a LlamaLM per session."""
    info = TargetInfo(meta.name, meta.vocab_size, meta.fingerprint, ())
    vc = VerifierConfig(batch_window_ms=window_ms, calibrate_rows=(1,), **cfg)
    new_lm = BatchedLlama(model, max_seqs=vc.max_sessions).new_lm if window_ms else model.new_lm
    return Verifier(info, new_lm, vc)


def greedy(model, prompt, n: int) -> list[int]:
    lm, ctx = model.new_lm(), list(prompt)
    for _ in range(n):
        ctx.append(int(np.argmax(lm.logits(ctx, 1)[0])))
    return ctx[len(prompt):]


def test_t0_tokens_equal_unbatched_and_plain_greedy(meta, model):
    batched = make_verifier(meta, model, window_ms=500)
    got = run_concurrently(batched, meta, [0, 1, 2, 3], 0.0, 24)
    s = batched.pass_stats()
    assert s.passes > 0 and s.max_items >= 2, s  # the passes really were shared
    assert isinstance(batched.sessions.new_lm(), BatchedLlamaLM)
    plain = make_verifier(meta, model, window_ms=0)
    for prompt, seed, out in zip(PROMPTS, [0, 1, 2, 3], got):
        assert out == generate(plain, meta, prompt, seed, 0.0, 24)
        assert out == greedy(model, prompt, 24)


def test_t1_each_session_keeps_its_unbatched_random_stream(meta, model):
    seeds = [11, 12, 13, 14]
    got = run_concurrently(make_verifier(meta, model, window_ms=500), meta, seeds, 1.0, 20)
    plain = make_verifier(meta, model, window_ms=0)
    for prompt, seed, out in zip(PROMPTS, seeds, got):
        assert out == generate(plain, meta, prompt, seed, 1.0, 20)


@pytest.mark.slow
def test_t1_first_token_through_batched_llama_is_distributed_as_the_target(meta, model):
    """Chi-square (pooled bins, p > 1e-3) of the first output token of 2,400 sessions, 8 at a time,
    against p(. | context) from a per-session LlamaLM. max_sessions 16: evicted sessions' sequence
    ids are recycled all along."""
    context = [3, 1, 4, 1, 5, 9, 2, 6]
    p = target_probs(model.new_lm().logits(context, 1).astype(np.float64), 1.0)[0]
    v = make_verifier(meta, model, window_ms=500, max_sessions=16)
    n, width = 2400, 8
    counts = np.zeros(meta.vocab_size)
    with ThreadPoolExecutor(width) as pool:
        for start in range(0, n, width):
            barrier = threading.Barrier(width)
            futs = [pool.submit(generate, v, meta, context, seed, 1.0, 1, barrier) for seed in range(start, start + width)]
            for f in futs:
                counts[f.result(60)[0]] += 1
    assert v.pass_stats().by_items.get(width, 0) >= n // width // 2  # the rounds of a group shared a pass
    assert pooled_chisquare_pvalue(counts, p) > 1e-3


def test_a_failing_item_fails_only_its_own_session(meta, model):
    """Session 1's LM is closed under it: the shared pass refuses that item, the verifier runs the
    items one by one, session 1's round fails and the others get the greedy tokens."""
    v = make_verifier(meta, model, window_ms=500)
    sessions = [open_session(v, meta, p, i, 0.0) for i, p in enumerate(PROMPTS[:3])]
    sessions[1][0].lm.close()
    barrier = threading.Barrier(3)

    def round_of(i):
        s, cfg = sessions[i]
        msg = codec.pack_batch(len(s.context), drafts_for(meta, s.context, cfg, i, 3, 0.0), cfg)
        barrier.wait()
        return v.verify(s, msg)

    with ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(round_of, i) for i in range(3)]
        with pytest.raises(ValueError, match="closed"):
            futs[1].result(60)
        good = [futs[0].result(60), futs[2].result(60)]
    assert all(r.accepted >= 0 for r in good)
    for (s, _), prompt in zip([sessions[0], sessions[2]], [PROMPTS[0], PROMPTS[2]]):
        assert s.context[len(prompt):] == greedy(model, prompt, len(s.context) - len(prompt))


def test_a_prompt_is_prefilled_in_a_shared_pass_beside_another_sessions_round(meta, model):
    """llama.cpp feeds each session its own tokens, so an opened prompt's prefill is an item of the
    shared passes (recorded at the tokens it fed): here it joins the pass another session's round
    is gathering, and both sessions then decode the greedy tokens. The per-session verifier
    prefills alone."""
    v = make_verifier(meta, model, window_ms=2000)
    first, cfg = open_session(v, meta, PROMPTS[0], 0, 0.0)
    long_prompt = PROMPTS[2]  # 30 tokens, all fed by the prefill
    opened = v.open(codec.OpenRequest(list(long_prompt), codec.Sampling(0.0, 0, 1.0, 1), cfg, meta.fingerprint, 8))
    assert v.prefills_in_passes(opened)
    v.sessions.attach(opened.id)  # two attached: the round's pass waits (up to the window) for one more item

    def round_of_first():
        return v.verify(first, codec.pack_batch(len(first.context), drafts_for(meta, first.context, cfg, 0, 3, 0.0), cfg))

    def prefill():
        time.sleep(0.2)  # the round leads and gathers; the prefill comes during its window
        while not v.prefill_step(opened):
            pass

    before = v.pass_stats()  # first's own 1-token prefill
    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(round_of_first), pool.submit(prefill)]
        [f.result(60) for f in futs]
    stats = v.pass_stats()
    # One pass: 30 prompt tokens + first's 3 drafts (its first row came with its own prefill).
    assert (stats.passes - before.passes, stats.by_items[2], stats.rows - before.rows) == (1, 1, 30 + 3), stats
    assert all(r < 30 for r in v.pass_table())  # a pass with a prefill is no verify pass of as many rows: not in the table
    v.release(first.id)  # alone now: its rounds wait for nobody
    while len(opened.context) - len(long_prompt) < 8:
        v.verify(opened, codec.pack_batch(len(opened.context), drafts_for(meta, opened.context, cfg, 1, 3, 0.0), cfg))
    assert opened.context[len(long_prompt):][:8] == greedy(model, long_prompt, 8)
    assert first.context[len(PROMPTS[0]):] == greedy(model, PROMPTS[0], len(first.context) - len(PROMPTS[0]))
    alone = make_verifier(meta, model, window_ms=0)
    assert not alone.prefills_in_passes(alone.open(codec.OpenRequest(list(long_prompt), codec.Sampling(0.0, 0, 1.0, 1),
                                                                     cfg, meta.fingerprint, 8)))


def test_the_llama_engine_gives_batched_lms_when_batching_is_on(model):
    eng = Engine("llama", "tiny-gguf", None, model.vocab_size, (), "fp", model.new_lm, "", model=model)
    assert isinstance(eng.lm_factory(8)(), BatchedLlamaLM)
    assert isinstance(eng.lm_factory(0)(), LlamaLM)


@contextmanager
def serving(verifier: Verifier):
    """cloud.server.create_server around `verifier` on its own event-loop thread, port 0."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = CloudConfig(host="127.0.0.1", port=0, metrics_port=0, calibrate=False)
    running = asyncio.run_coroutine_threadsafe(create_server(config, verifier), loop).result(60)
    try:
        yield running
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_grpc_generations_at_t0_are_the_same_with_batching_on_and_off(meta, model, run_generation):
    prompts = ["def f(x):", "Hello, world", "import numpy as np\nimport torch", "a"]
    outputs, sessions_per_pass = [], []
    for window_ms in (50, 0):
        with serving(make_verifier(meta, model, window_ms)) as running:
            with ThreadPoolExecutor(len(prompts)) as pool:
                futs = [pool.submit(run_generation, f"127.0.0.1:{running.port}", p, max_new_tokens=24, seed=i)
                        for i, p in enumerate(prompts)]
                outputs.append([list(f.result(120).token_ids) for f in futs])
            sample = running.metrics.registry.get_sample_value
            assert sample("sqs_pass_rows_count") == sample("sqs_pass_sessions_count") > 0
            sessions_per_pass.append(sample("sqs_pass_sessions_sum") / sample("sqs_pass_sessions_count"))
    assert outputs[0] == outputs[1]
    assert all(len(t) == 24 for t in outputs[0])
    assert sessions_per_pass[0] > 1.0 and sessions_per_pass[1] == 1.0  # shared passes only with batching on
