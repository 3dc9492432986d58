"""Streamed plain decoding (issue 20 item 5): a round of plain target steps whose tokens the cloud
sends one message each as it samples them, over the session's Verify stream.

The tiny pair through a real gRPC cloud in this process. What is checked: the tokens are those of
plain decoding (T = 0 equality; at T = 1 the same draws, so the same tokens for a seed, and a
chi-square of the first two tokens against the target's exact distribution); a whole generation is
ONE request; a generation switches plain -> drafts -> plain; tokens reach the consumer long before
the request ends; cancel or close mid-stream stops the cloud's steps and frees its session; a cloud
restart mid-stream resyncs to the same tokens; a stopped stream resent replays and goes on; and
the real bytes per token, streamed against batched.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

import tests.survive_tools as st
from cloud.verifier import Verifier, VerifierConfig
from common import codec
from common.costmodel import Costs
from common.planner import Planner, PlannerConfig, RoundPlan
from common.rejection import target_probs
from common.schemes import SchemeConfig
from edge.client import Cancelled, ClientConfig, CloudClient
from edge.drafter import DraftConfig
from edge.runtime import EdgeRuntime

PROMPT = st.PROMPT


class SlowLM:
    """The tiny target LM with `delay_s` per one-row pass (a plain step), counting them."""

    steps = 0  # one-row passes of every SlowLM, process-wide (a test reads the difference)

    def __init__(self, lm, delay_s: float) -> None:
        self._lm, self._delay = lm, delay_s

    def logits(self, context, want):
        if want == 1:
            SlowLM.steps += 1
            time.sleep(self._delay)
        return self._lm.logits(context, want)


def slow_cloud(delay_s: float, port: int = 0) -> st.Cloud:
    info, new_lm = st.target()
    return st.Cloud(port, verifier=Verifier(info, lambda: SlowLM(new_lm(), delay_s), VerifierConfig()))


def plain_config(temperature: float = 0.0, seed: int = 0, draft_len: int = 0) -> DraftConfig:
    scheme = "none" if draft_len == 0 else "topk"
    e = st.draft_engine()
    return DraftConfig(SchemeConfig(scheme, vocab_size=e.vocab_size, k=4, ell=100), max_draft_len=draft_len,
                       temperature=temperature, seed=seed, pipeline=False)


def runtime(address: str, **client) -> EdgeRuntime:
    return EdgeRuntime(st.draft_engine(), ClientConfig(address, **{**st.FAST_RETRY, **client}))


class Unstreamed:
    """A client that only has round(): plain rounds come back whole (the batched form)."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def round(self, batch, reopen):
        return self._inner.round(batch, reopen=reopen)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def batches(cloud: st.Cloud) -> float:
    return cloud.running.metrics.registry.get_sample_value("sqs_batches_total", {"sparsifier": "none"}) or 0.0


@pytest.fixture(scope="module")
def cloud():
    c = st.Cloud()
    yield c
    c.stop()


# --- the planner (pure) ------------------------------------------------------------------------


def test_streamed_plain_rounds_run_to_the_end_or_the_next_probe_and_probes_back_off():
    costs = Costs(1.0, 20.0, 0.0, lambda r: 10.0 * r)  # multi-row passes cost a step per row: plain wins
    planner = Planner(PlannerConfig(probe_tokens=8), lambda k, ell: 40.0)
    assert planner.plain(costs, 100).plain_steps + 1 == 16  # batched: capped at max_plain_steps
    planner.streaming = True
    assert planner.plain(costs, 100).plain_steps + 1 == 100  # streamed: every token still wanted

    from common.acceptance import AcceptanceModel, QuantLoss

    acc, loss = AcceptanceModel(), QuantLoss()
    lengths = []
    for _ in range(8):
        plan = planner.plan(costs, acc, loss, 5000.0, 1000)
        lengths.append(-1 if plan.speculate else plan.plain_steps + 1)
    # round 1 runs to the first probe (fixed_ms / 5% of a step = 40 steps > 8), then probe, then a
    # round to the next probe, whose interval doubled: 8 -> 16 -> 32 ... (at least the 40-step minimum)
    assert lengths[0] == 40 and lengths[1] == -1
    plains = [m for m in lengths if m > 0]
    assert plains == sorted(plains) and plains[-1] > plains[0]


# --- tokens ------------------------------------------------------------------------------------


def test_t0_streamed_plain_equals_plain_decoding_in_one_request(cloud):
    rt = runtime(cloud.address)
    n = 40
    before = batches(cloud)
    g = rt.start(rt.encode(PROMPT), plain_config(), max_new_tokens=n, previews=True)
    list(g)
    streamed = g.result
    assert batches(cloud) - before == 1  # the whole generation: ONE verification request
    assert streamed.stats.rounds == 1 and len(streamed.token_ids) == n
    unary = runtime(cloud.address, transport="unary").generate(rt.encode(PROMPT), plain_config(), max_new_tokens=n)
    assert unary.stats.rounds > 1  # batched: rounds of at most max_plain_steps
    # the reference: argmax of the target, one step at a time
    info, new_lm = st.target()
    lm, ctx, ref = new_lm(), rt.encode(PROMPT), []
    for _ in range(n):
        t = int(np.argmax(lm.logits(ctx, want=1)[0]))
        ctx.append(t)
        ref.append(t)
    assert streamed.token_ids == unary.token_ids == ref[: len(streamed.token_ids)]


def test_t1_a_seed_fixes_the_tokens_and_the_first_two_follow_the_target(cloud):
    """Same draws as the unstreamed rounds (keyed by seed and position): equal tokens per seed. The
    first token (the round's own) and the second (the first streamed step) against the exact
    distribution of the tiny target at T = 1: chi-square over bins with >= 5 expected, p > 0.001
    (one fixed set of seeds, so the test is deterministic; the threshold is the tolerance)."""
    rt = runtime(cloud.address)
    prompt = rt.encode(PROMPT)
    for seed in range(3):
        a = rt.generate(prompt, plain_config(1.0, seed), max_new_tokens=12)
        b = runtime(cloud.address, transport="unary").generate(prompt, plain_config(1.0, seed), max_new_tokens=12)
        assert a.token_ids == b.token_ids
    info, new_lm = st.target()
    lm = new_lm()
    p1 = target_probs(lm.logits(prompt, want=1)[0].astype(np.float64), 1.0)  # [V]
    p2 = sum(p1[t] * target_probs(lm.logits(prompt + [t], want=1)[0].astype(np.float64), 1.0)
             for t in range(len(p1)) if p1[t] > 1e-9)  # [V]: the second token's marginal
    n = 400
    firsts, seconds = np.zeros(len(p1)), np.zeros(len(p1))
    for seed in range(n):
        ids = rt.generate(prompt, plain_config(1.0, 1000 + seed), max_new_tokens=2).token_ids
        firsts[ids[0]] += 1
        seconds[ids[1]] += 1
    for counts, p in ((firsts, p1), (seconds, p2)):
        assert st.pooled_chisquare_p(counts, n * p) > 1e-3


def test_a_generation_switches_plain_drafts_plain_and_previews_add_up(cloud):
    """A fixed plan of 3 drafts, scripted to plain (5 tokens streamed) -> drafts -> plain (the rest):
    at T = 0 the output is plain decoding's, every plain round is one streamed request, and the
    previews with the rounds' own tokens are the output in order."""
    n = 30
    rt = runtime(cloud.address)
    prompt = rt.encode(PROMPT)
    ref = rt.generate(prompt, plain_config(), max_new_tokens=n).token_ids
    g = rt.start(prompt, plain_config(draft_len=3), max_new_tokens=n, previews=True)
    fixed = g.drafter.plan
    script = iter(["plain", "draft"])

    def plan(costs, remaining, ready=0):
        step = next(script, "rest")
        if step == "plain":
            return RoundPlan(False, None, 0, 4, 5.0, 1.0, 0.0)
        if step == "draft":
            return fixed(costs, remaining)
        return RoundPlan(False, None, 0, remaining - 1, float(remaining), 1.0, 0.0)

    g.drafter.plan = plan
    outs = list(g)
    records = [r.record for r in outs if not r.preview]
    assert [r.drafted for r in records] == [0, 3, 0]
    assert [r.plain for r in records][0] == 4 and records[-1].plain > 0
    assert [t for r in outs for t in r.tokens] == g.result.token_ids == ref
    assert any(r.preview for r in outs)


def test_the_draft_follows_a_streamed_plain_round_so_the_next_drafts_start_at_once():
    """With pipelining on, the draft model is fed the plain tokens while they stream (on the
    pipeline's thread), not all at once when the next speculative round starts drafting: by the
    time that round plans, the draft LM has already been asked for contexts that reach deep into
    the streamed round. Without pipelining it has not (the follow-up runs on that thread only)."""
    cloud = slow_cloud(0.03)
    try:
        rt = runtime(cloud.address)
        prompt = rt.encode(PROMPT)
        reached = {}
        for pipeline in (True, False):
            cfg = replace(plain_config(draft_len=3), pipeline=pipeline)
            g = rt.start(prompt, cfg, max_new_tokens=24, previews=True)
            seen: list[int] = []  # context lengths the draft LM was asked for, in order
            inner = g.drafter.lm

            class Recorder:
                def logits(self, context, want):
                    seen.append(len(context))
                    return inner.logits(context, want)

            g.drafter.lm = Recorder()
            fixed = g.drafter.plan
            script = iter(["plain"])
            at_draft: list[int] = []

            def plan(costs, remaining, ready=0):
                if next(script, "draft") == "plain":
                    seen.clear()  # from here on: the opening chain (warm) reaches past the prompt too
                    return RoundPlan(False, None, 0, 11, 12.0, 1.0, 0.0)
                if not at_draft:
                    at_draft.append(max(seen, default=0))
                return fixed(costs, remaining)

            g.drafter.plan = plan
            list(g)
            reached[pipeline] = at_draft[0] - len(prompt)
        assert reached[True] >= 8  # most of the 12 streamed tokens were fed during the stream
        assert reached[False] <= 1
    finally:
        cloud.stop()


def test_the_follow_up_stops_before_the_last_streamed_token_so_the_next_round_does_not_wait():
    """The follow-up feeds the draft the streamed tokens up to the one before the round's last,
    then step_past prepares the row after a guess of the last. Feeding the real last token too
    (~75 ms of a 0.5B pass, measured) only made the next round's drafting wait: the draft LM is
    asked for contexts as long as the whole round once (step_past's prepare), never twice."""
    cloud = slow_cloud(0.03)
    try:
        rt = runtime(cloud.address)
        prompt = rt.encode(PROMPT)
        cfg = replace(plain_config(draft_len=3), pipeline=True)
        g = rt.start(prompt, cfg, max_new_tokens=16, previews=True)
        follower_calls: list[int] = []  # context lengths asked for off the generation's thread
        main = threading.get_ident()
        inner = g.drafter.lm

        class Recorder:
            def logits(self, context, want):
                if threading.get_ident() != main:
                    follower_calls.append(len(context))
                return inner.logits(context, want)

        g.drafter.lm = Recorder()
        fixed = g.drafter.plan
        script = iter(["plain"])

        def plan(costs, remaining, ready=0):
            if next(script, "draft") == "plain":
                follower_calls.clear()  # the stream's follow-up from here (not the opening chain)
                return RoundPlan(False, None, 0, 7, 8.0, 1.0, 0.0)
            return fixed(costs, remaining, ready)

        g.drafter.plan = plan
        list(g)
        whole = len(prompt) + 8  # the first stream commits its token and 7 plain tokens
        assert follower_calls and max(follower_calls) <= whole
        assert follower_calls.count(whole) == 1  # step_past's prepare; no feed of the real last token
    finally:
        cloud.stop()


def test_the_draft_prefills_the_prompt_while_the_cloud_opens_the_session():
    """The edge's draft prefill and timed step run during the open (where the cloud prefills the
    same prompt on the target), not after it: with every target step taking 0.4 s, the draft's first
    call starts long before the open can have returned."""
    cloud = slow_cloud(0.4)
    try:
        rt = runtime(cloud.address)
        g = rt.start(rt.encode(PROMPT), plain_config(draft_len=2), max_new_tokens=2)
        first: list[float] = []
        inner = g.drafter.lm

        class Recorder:
            def logits(self, context, want):
                first.append(time.perf_counter())
                return inner.logits(context, want)

        g.drafter.lm = Recorder()
        t0 = time.perf_counter()
        list(g)
        assert first and first[0] - t0 < 0.2
    finally:
        cloud.stop()


def test_the_first_plain_tokens_do_not_wait_for_a_slow_draft_warm_and_the_draft_lm_has_one_user():
    """Where the draft prefills slower than the cloud (edges sharing a core), the first round streams
    plain tokens while the warm finishes: the first token comes before the warm's two draft calls
    could have ended. The warm, the follow-up and the drafting never use the draft LM at once, and
    the tokens are plain decoding's (T = 0)."""
    cloud = slow_cloud(0.01)
    try:
        rt = runtime(cloud.address)
        prompt = rt.encode(PROMPT)
        plain = rt.start(prompt, plain_config(), max_new_tokens=12)
        list(plain)
        cfg = replace(plain_config(draft_len=None), pipeline=True)  # planned rounds
        g = rt.start(prompt, cfg, max_new_tokens=12, previews=True)
        inner = g.drafter.lm
        lock = threading.Lock()
        active, most, calls = [0], [0], [0]

        class Slow:
            def logits(self, context, want):
                with lock:
                    active[0] += 1
                    most[0] = max(most[0], active[0])
                    calls[0] += 1
                try:
                    time.sleep(0.3)
                    return inner.logits(context, want)
                finally:
                    with lock:
                        active[0] -= 1

        g.drafter.lm = Slow()
        t0 = time.perf_counter()
        first = None
        for out in g:
            if out.tokens and first is None:
                first = time.perf_counter() - t0
        assert first is not None and first < 0.45, first  # the warm alone is 2 x 0.3 s
        assert calls[0] >= 2 and most[0] == 1
        assert g.result.token_ids == plain.result.token_ids
    finally:
        cloud.stop()


def test_tokens_arrive_long_before_the_request_ends():
    cloud = slow_cloud(0.03)
    try:
        rt = runtime(cloud.address)
        t0 = time.perf_counter()
        arrivals = []
        g = rt.start(rt.encode(PROMPT), plain_config(1.0, 5), max_new_tokens=40, previews=True)
        for r in g:
            arrivals.extend([time.perf_counter() - t0] * len(r.tokens))
        assert g.result.stats.rounds == 1 and len(arrivals) == 40
        total = time.perf_counter() - t0
        assert arrivals[0] < 0.25 * total  # ~1 step of 40, plus the open
        assert len(set(arrivals)) >= 20  # tokens came one (or a few) at a time, not at the end
    finally:
        cloud.stop()


# --- ending a stream -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_cancel_or_close_mid_stream_stops_the_steps_and_frees_the_session(how):
    cloud = slow_cloud(0.03)
    try:
        cancel = threading.Event()
        rt = runtime(cloud.address)
        g = rt.start(rt.encode(PROMPT), plain_config(1.0, 3), max_new_tokens=500, cancel=cancel, previews=True)
        seen = 0
        with pytest.raises(Cancelled) if how == "cancel" else contextlib.nullcontext():
            for r in g:
                seen += len(r.tokens)
                if seen >= 3:
                    if how == "cancel":
                        cancel.set()
                    else:
                        g.close()
                        break
        st.wait_until(lambda: cloud.verifier.active_sessions == 0, 5, "the cloud session closed")
        steps = SlowLM.steps
        time.sleep(0.3)
        assert SlowLM.steps - steps <= 1  # the steps stopped (one may have been under way)
        assert seen < 100
    finally:
        cloud.stop()


def test_a_cloud_restart_mid_stream_resyncs_to_the_same_tokens():
    port = st.free_port()
    n = 60
    first = slow_cloud(0.02, port)
    rt = runtime(first.address, retries=40)
    prompt = rt.encode(PROMPT)
    try:
        g = rt.start(prompt, plain_config(1.0, 7), max_new_tokens=n, previews=True)
        out: list[int] = []
        second = None
        for r in g:
            out.extend(r.tokens)
            if second is None and len(out) >= 10:
                first.stop()
                second = slow_cloud(0.0, port)
        assert second is not None and g.result.stats.reopens >= 1
        assert out == g.result.token_ids and len(out) == n
        again = runtime(second.address).generate(prompt, plain_config(1.0, 7), max_new_tokens=n)
        assert again.token_ids == out
    finally:
        if second is not None:
            second.stop()


def test_a_stopped_stream_resent_replays_its_tokens_and_goes_on():
    """Verifier level: a streamed round stopped after 5 tokens (its stream ended), then the same
    batch again: the emitted tokens start with the 5 replayed, and the round equals an unstopped one."""
    info, new_lm = st.target()
    prompt = st.draft_model().tokenizer.encode(PROMPT)
    req = codec.OpenRequest(list(prompt), codec.Sampling(1.0, 0, 1.0, 9), plain_config().scheme, info.fingerprint, 0)
    batch = codec.pack_batch(len(prompt), [], req.scheme, plain_steps=20, stream=True)

    def run(stop_after=None):
        v = Verifier(info, new_lm, VerifierConfig())
        s = v.open(req)
        seen: list[tuple] = []
        stop = (lambda: len(seen) > stop_after) if stop_after else None
        r = v.verify(s, batch, emit=lambda part: seen.append((part.token,) + part.plain_tokens), stop=stop)
        return v, s, r, seen

    _, _, whole, _ = run()
    v, s, part, seen = run(stop_after=5)
    assert len(part.plain_tokens) == 5 and part.plain_tokens == whole.plain_tokens[:5]
    resent: list[tuple] = []
    again = v.verify(s, batch, emit=lambda p: resent.append((p.token,) + p.plain_tokens))
    assert resent[0] == seen[-1]  # first what it had, then the steps it owed
    assert again.plain_tokens == whole.plain_tokens and again.position == whole.position and again.replayed
    assert v.verify(s, batch).plain_tokens == whole.plain_tokens  # complete now: a plain replay


# --- bytes ---------------------------------------------------------------------------------------


def test_wire_bytes_per_token_streamed_against_batched(cloud):
    """Real bytes on the connection (the client's meter) for the same 48 tokens: streamed (one
    request, a message per token) against batched (rounds of max_plain_steps tokens, one verdict
    each). Printed for the report; streamed pays per token a message's framing and its fields."""
    n = 48
    rt = runtime(cloud.address)
    prompt = rt.encode(PROMPT)
    g = rt.start(prompt, plain_config(1.0, 4), max_new_tokens=n, previews=True)
    list(g)
    streamed = g.result.stats
    config = ClientConfig(cloud.address, **st.FAST_RETRY)
    batched_rt = EdgeRuntime(st.draft_engine(), None, connect=lambda cancel: Unstreamed(CloudClient(config, cancel)))
    batched = batched_rt.generate(prompt, plain_config(1.0, 4), max_new_tokens=n).stats
    assert streamed.rounds == 1 and batched.rounds >= 3 and streamed.generated == batched.generated == n
    per = {name: ((s.uplink_wire_bytes) / n, s.downlink_wire_bytes / n)
           for name, s in (("streamed", streamed), ("batched", batched))}
    print(f"\nwire bytes per token (uplink, downlink): {per}")
    assert per["streamed"][0] < per["batched"][0]  # one batch up instead of three
    assert per["batched"][1] < per["streamed"][1] < 40  # a message per token: framing + a few fields


def test_a_failed_warm_costs_a_plain_generation_nothing_and_is_reported_once(cloud, caplog):
    """The warm runs beside the open; where it fails and the generation never drafts (a plain
    plan), the tokens are plain decoding's and the failure is one warning, not an exception."""
    rt = runtime(cloud.address)
    prompt = rt.encode(PROMPT)
    plain = rt.start(prompt, plain_config(), max_new_tokens=6)
    list(plain)
    g = rt.start(prompt, replace(plain_config(draft_len=None), pipeline=True), max_new_tokens=6)

    class Broken:
        def logits(self, context, want):
            raise RuntimeError("draft LM gone")

    g.drafter.lm = Broken()
    g.drafter.plan = lambda costs, remaining, ready=0: RoundPlan(False, None, 0, 5, 6.0, 1.0, 0.0)
    with caplog.at_level("WARNING", logger="edge.generate"):
        list(g)
    assert g.result.token_ids == plain.result.token_ids
    assert [r.message for r in caplog.records].count("draft warm-up failed: draft LM gone") == 1
