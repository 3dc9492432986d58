"""Lookahead drafts (DraftBatch.lookahead): drafts the edge sends while the cloud streams plain
tokens, which the stream's next step verifies instead of ending the stream.

Tiny fp32 pair. At the Verifier: drafts offered between two steps are verified by the next one (T =
0: the tokens are plain decoding's, fewer passes); leading drafts act as guesses of the tokens
sampled since their position (a right guess lets the rest ride, a wrong or stale one is dropped);
the round still commits exactly what it owes; at T = 1 the token verified against a draft from an
unrelated q follows the target's exact marginal (chi-square); a malformed lookahead fails its own
session only. Through gRPC: a lookahead that starts a stream is INVALID_ARGUMENT, and an edge
generation that sends lookaheads over a slow cloud commits plain decoding's tokens at T = 0.
"""

from __future__ import annotations

import time
from dataclasses import replace

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tests.survive_tools as st  # noqa: E402
from cloud.quotas import QuotaConfig  # noqa: E402
from cloud.verifier import SessionError, TargetInfo, Verifier, VerifierConfig  # noqa: E402
from cloud.sessions import Refusal  # noqa: E402
from common import codec  # noqa: E402
from common.pb.v1 import sqs_pb2 as pb  # noqa: E402
from common.pb.v1 import sqs_pb2_grpc  # noqa: E402
from common.planner import RoundPlan  # noqa: E402
from common.rejection import target_probs  # noqa: E402
from common.schemes import SchemeConfig, describe, draw  # noqa: E402
from edge.client import ClientConfig  # noqa: E402
from edge.drafter import DraftConfig  # noqa: E402
from edge.runtime import EdgeRuntime  # noqa: E402
from sqs_models.cached_lm import CachedLM  # noqa: E402
from sqs_models.registry import load_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", role="target")


class Counting:
    """The target LM, counting its passes."""

    def __init__(self, lm) -> None:
        self.lm, self.passes = lm, 0

    def logits(self, context, want):
        self.passes += 1
        return self.lm.logits(context, want)

    def __getattr__(self, name):  # vocab size, prefill, ... of the wrapped LM
        return getattr(self.lm, name)


def make_verifier(m) -> Verifier:
    info = TargetInfo(m.name, m.vocab_size, m.fingerprint, ())
    return Verifier(info, lambda: Counting(CachedLM(m.model, m.vocab_size)), VerifierConfig(calibrate_rows=(1,)))


def open_session(v: Verifier, m, context, seed: int, temperature: float):
    cfg = SchemeConfig("topk", m.vocab_size, k=8, ell=64)
    req = codec.OpenRequest(list(context), codec.Sampling(temperature, 0, 1.0, seed), cfg, m.fingerprint, 8)
    s = v.open(req)
    while not v.prefill_step(s):
        pass
    return s, cfg


def greedy(m, context, n: int) -> list[int]:
    """The target's argmax chain after `context` (plain decoding at T = 0)."""
    lm, ctx, out = CachedLM(m.model, m.vocab_size), list(context), []
    for _ in range(n):
        out.append(int(np.argmax(lm.logits(ctx, 1)[0])))
        ctx.append(out[-1])
    return out


def drafts_of(tokens, cfg, m, rng):
    """Drafts that are these tokens (one-hot q: drawn, each is its token)."""
    out = []
    for t in tokens:
        q = np.zeros(m.vocab_size)
        q[t] = 1.0
        out.append(draw(describe(q, cfg), cfg.ell, rng))
    return out


def second_token_marginal(m, prompt) -> np.ndarray:
    """The target's exact law of the second token after `prompt` at T = 1: sum_x0 p(x0) p(x1 | x0)."""
    lm = CachedLM(m.model, m.vocab_size)
    p1 = target_probs(lm.logits(prompt, 1)[0].astype(np.float64), 1.0)
    return sum(p1[t] * target_probs(lm.logits(prompt + [t], 1)[0].astype(np.float64), 1.0)
               for t in range(len(p1)) if p1[t] > 1e-9)


def second_tokens_with_random_lookahead(v: Verifier, m, prompt, n: int, *, seed0: int, tag: int, drafts: int,
                                        steps: int) -> tuple[np.ndarray, int]:
    """n streamed rounds of `steps` plain steps at T = 1, seeds seed0.., each its own session: after
    the round's token x0 the edge offers `drafts` lookahead drafts, each drawn from its own random q
    unrelated to the target (the edge's draws, rng [seed, tag]: not the cloud's keys). Returns the
    counts of x1 over the vocabulary and the lookahead drafts the cloud verified."""
    counts = np.zeros(m.vocab_size)
    drafted = 0
    for seed in range(n):
        s, cfg = open_session(v, m, prompt, seed0 + seed, 1.0)
        rng = np.random.default_rng([seed, tag])

        def emit(result, s=s, cfg=cfg, rng=rng):
            if len(s.context) == len(prompt) + 1:  # after x0
                ds = [draw(describe(rng.dirichlet(np.full(m.vocab_size, 0.3)), cfg), cfg.ell, rng)
                      for _ in range(drafts)]
                v.offer_lookahead(s, codec.pack_batch(len(s.context), ds, cfg, lookahead=True))

        r = v.verify(s, streamed(len(prompt), steps), emit=emit)
        drafted += r.lookahead_drafted
        counts[r.plain_tokens[0]] += 1
        v.close(s.id)
    return counts, drafted


def streamed(position: int, steps: int) -> codec.Batch:
    return codec.Batch(position, 0, plain_steps=steps, stream=True)


def prompt_ids(m) -> list[int]:
    return list(m.tokenizer.encode(st.PROMPT))


def test_t0_lookahead_drafts_ride_the_next_step_and_the_tokens_are_plain_decodings(tiny):
    """After every streamed token the edge offers the target's next two tokens; each next step
    verifies both in one pass (3 tokens a pass; the last one only what the round still owes), the
    round commits exactly the 1 + 11 tokens it asked for, and they are plain decoding's."""
    v = make_verifier(tiny)
    prompt = prompt_ids(tiny)
    s, cfg = open_session(v, tiny, prompt, 0, 0.0)
    rng = np.random.default_rng(0)

    def emit(result):  # the verifier's thread, between two steps: what the edge's send does
        ahead = greedy(tiny, s.context, 2)
        v.offer_lookahead(s, codec.pack_batch(len(s.context), drafts_of(ahead, cfg, tiny, rng), cfg, lookahead=True))

    before = s.lm.passes
    r = v.verify(s, streamed(len(prompt), 11), emit=emit)
    tokens = [r.token, *r.plain_tokens]
    assert tokens == greedy(tiny, prompt, 12) and r.position == len(prompt) + 12
    assert r.lookahead_drafted == 7 and r.lookahead_accepted == 7  # 2 + 2 + 2 + 1 (2 owed)
    assert s.lm.passes - before == 4  # 11 plain steps would be 11 passes


def test_leading_drafts_are_guesses_a_wrong_or_stale_guess_is_dropped(tiny):
    """A lookahead one token behind the stream whose first draft is the token sampled there: the
    rest rides. One whose first draft is not that token, or one entirely behind: dropped (a plain step)."""
    v = make_verifier(tiny)
    prompt = prompt_ids(tiny)
    rng = np.random.default_rng(1)
    used = {}
    for case in ("guess", "wrong", "stale"):
        s, cfg = open_session(v, tiny, prompt, 0, 0.0)
        offered = []

        def emit(result, s=s, cfg=cfg, case=case, offered=offered):
            if offered:
                return
            c = len(s.context)
            last = s.context[-1]
            ahead = greedy(tiny, s.context, 2)
            first = {"guess": [last], "wrong": [(last + 1) % tiny.vocab_size], "stale": []}[case]
            position = c - 1 if case != "stale" else c - 2
            tokens = first + ahead if case != "stale" else [s.context[c - 2], last]
            offered.append(position)
            v.offer_lookahead(s, codec.pack_batch(position, drafts_of(tokens, cfg, tiny, rng), cfg, lookahead=True))

        r = v.verify(s, streamed(len(prompt), 6), emit=emit)
        assert [r.token, *r.plain_tokens] == greedy(tiny, prompt, 7)
        used[case] = r.lookahead_drafted
    assert used == {"guess": 2, "wrong": 0, "stale": 0}


def test_t1_the_token_verified_against_a_lookahead_draft_follows_the_target():
    """T = 1: after the round's token x0 the edge offers one draft for the next position, drawn from
    a random q unrelated to the target; the step verifies it (rejection sampling with the draws of
    that position), so x1's marginal over seeds must be the target's exact sum_x0 p(x0) p(x1 | x0):
    chi-square over bins with >= 5 expected, p > 0.001 (fixed seeds: deterministic). Every sample
    used its draft (the check would otherwise test plain steps)."""
    m = load_model("tiny", role="target")
    v = make_verifier(m)
    prompt = prompt_ids(m)
    p2 = second_token_marginal(m, prompt)
    n = 400
    counts, drafted = second_tokens_with_random_lookahead(v, m, prompt, n, seed0=5000, tag=99, drafts=1, steps=2)
    assert drafted == n
    assert st.pooled_chisquare_p(counts, n * p2) > 1e-3


def test_a_malformed_lookahead_fails_its_round_and_no_other_session(tiny):
    v = make_verifier(tiny)
    prompt = prompt_ids(tiny)
    a, cfg = open_session(v, tiny, prompt, 0, 0.0)
    b, _ = open_session(v, tiny, prompt, 0, 0.0)
    v.offer_lookahead(a, codec.Batch(len(prompt) + 1, 20, packed=b"\xff\xff\xff", lookahead=True))  # > max_drafts
    with pytest.raises(SessionError) as err:
        v.verify(a, streamed(len(prompt), 4))
    assert err.value.code == Refusal.MALFORMED and "lookahead" in err.value.reason
    r = v.verify(b, streamed(len(prompt), 4))
    assert [r.token, *r.plain_tokens] == greedy(tiny, prompt, 5)


# --- through gRPC --------------------------------------------------------------------------------


class SlowLM:
    """The tiny target with `delay_s` per one-row pass: the edge's lookaheads arrive in time."""

    def __init__(self, lm, delay_s: float) -> None:
        self._lm, self._delay = lm, delay_s

    def logits(self, context, want):
        if want == 1:
            time.sleep(self._delay)
        return self._lm.logits(context, want)


@pytest.fixture(scope="module")
def slow_cloud():
    info, new_lm = st.target()
    c = st.Cloud(0, verifier=Verifier(info, lambda: SlowLM(new_lm(), 0.03), VerifierConfig()))
    yield c
    c.stop()


def test_a_lookahead_that_starts_a_stream_is_invalid_argument(slow_cloud):
    with grpc.insecure_channel(slow_cloud.address) as ch:
        stub = sqs_pb2_grpc.VerifierStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Verify(iter([pb.DraftBatch(position=3, num_drafts=1, lookahead=True)]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lookahead" in err.value.details()


def test_an_edge_streaming_plain_tokens_sends_lookaheads_and_commits_plain_decodings_tokens(slow_cloud):
    """A fixed plan scripted to one long streamed plain round, lookahead 2, pipelining on: the edge's
    drafts ride the stream (the cloud verified some) and the tokens are plain decoding's (T = 0).
    With lookahead 0 nothing rides."""
    e = st.draft_engine()
    rt = EdgeRuntime(e, ClientConfig(slow_cloud.address, **st.FAST_RETRY))
    prompt = rt.encode(st.PROMPT)
    base = DraftConfig(SchemeConfig("topk", vocab_size=e.vocab_size, k=4, ell=100), max_draft_len=3,
                       temperature=0.0, seed=0, pipeline=True)
    info, new_lm = st.target()
    lm, ctx, ref = new_lm(), list(prompt), []
    for _ in range(24):
        ref.append(int(np.argmax(lm.logits(ctx, want=1)[0])))
        ctx.append(ref[-1])
    rode = {}
    for n in (2, 0):
        g = rt.start(prompt, replace(base, lookahead=n), max_new_tokens=24)
        g.drafter.plan = lambda costs, remaining, ready=0: RoundPlan(False, None, 0, remaining - 1,
                                                                    float(remaining), 1.0, 0.0)
        list(g)
        assert g.result.token_ids == ref
        rode[n] = g.result.stats.lookahead_drafted
    assert rode[2] > 0 and rode[0] == 0


def test_over_the_rows_quota_a_lookahead_is_dropped_and_the_stream_goes_on():
    """The round's charge covers its plain steps, not the drafts that ride them: with a rows quota
    the bucket cannot cover, every lookahead is dropped (counted), none fails the stream, and the
    tokens are still plain decoding's (T = 0)."""
    info, new_lm = st.target()
    cloud = st.Cloud(0, verifier=Verifier(info, lambda: SlowLM(new_lm(), 0.03), VerifierConfig()),
                     quotas=QuotaConfig(rows_per_s=0.01, burst_s=2000.0))  # 20 rows: the 24-row round leaves a debt
    try:
        e = st.draft_engine()
        rt = EdgeRuntime(e, ClientConfig(cloud.address, **st.FAST_RETRY))
        prompt = rt.encode(st.PROMPT)
        cfg = DraftConfig(SchemeConfig("topk", vocab_size=e.vocab_size, k=4, ell=100), max_draft_len=3,
                          temperature=0.0, seed=0, pipeline=True, lookahead=2)
        lm, ctx, ref = new_lm(), list(prompt), []
        for _ in range(24):
            ref.append(int(np.argmax(lm.logits(ctx, want=1)[0])))
            ctx.append(ref[-1])
        g = rt.start(prompt, cfg, max_new_tokens=24)
        g.drafter.plan = lambda costs, remaining, ready=0: RoundPlan(False, None, 0, remaining - 1,
                                                                    float(remaining), 1.0, 0.0)
        list(g)
        assert g.result.token_ids == ref
        assert g.result.stats.lookahead_drafted == 0
        dropped = cloud.running.metrics.registry.get_sample_value("sqs_quota_refusals_total",
                                                                  {"limit": "lookahead_rows"})
        assert dropped and dropped > 0
    finally:
        cloud.stop()


def test_lookahead_drafts_past_the_guess_go_out_only_while_likely_accepted():
    """The first draft (a guess) always goes; each later one only while the acceptance model's
    chance for the chain stays >= LOOKAHEAD_MIN_ACCEPT (0.5): at 0.9 a draft, 3 of 3 go; at 0.6,
    the guess and one (0.6, then 0.36 < 0.5); at 0.4, the guess alone."""
    from edge.drafter import Drafter

    e = st.draft_engine()
    cfg = DraftConfig(SchemeConfig("topk", vocab_size=e.vocab_size, k=4, ell=100), temperature=1.0, seed=3)
    drafter = Drafter(e.new_lm(), cfg)
    context = list(e.tokenizer.encode(st.PROMPT))
    sent = {}
    for chance in (0.9, 0.6, 0.4):
        drafter.acceptance.predict = lambda c, chance=chance: chance
        sent[chance] = len(drafter.lookahead(context, 3)[0])
    assert sent == {0.9: 3, 0.6: 2, 0.4: 1}


def test_an_eos_among_accepted_lookahead_drafts_ends_the_round_and_counts_what_it_committed(tiny):
    """The target's next two tokens offered after x0, the first of them an EOS: the step accepts
    both but commits up to the EOS only, and counts one accepted draft (not two)."""
    prompt = prompt_ids(tiny)
    ahead = greedy(tiny, prompt, 3)  # x0, x1, x2
    info = TargetInfo(tiny.name, tiny.vocab_size, tiny.fingerprint, (ahead[1],))
    v = Verifier(info, lambda: CachedLM(tiny.model, tiny.vocab_size), VerifierConfig(calibrate_rows=(1,)))
    s, cfg = open_session(v, tiny, prompt, 0, 0.0)
    rng = np.random.default_rng(2)

    def emit(result):
        if len(s.context) == len(prompt) + 1:
            v.offer_lookahead(s, codec.pack_batch(len(s.context), drafts_of(ahead[1:], cfg, tiny, rng), cfg,
                                                  lookahead=True))

    r = v.verify(s, streamed(len(prompt), 6), emit=emit)
    assert [r.token, *r.plain_tokens] == ahead[:2]
    assert (r.lookahead_drafted, r.lookahead_accepted) == (2, 1)
