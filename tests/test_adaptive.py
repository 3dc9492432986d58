"""The planned drafter end to end without sockets: edge.generate + Drafter + cloud.verifier.Verifier.

Lossless under the adaptive plan (chi-square of the joint law of the first output tokens against
the exact target law at T = 1; token equality with plain decoding at T = 0), the bit budget under
both accountings, the C-SQS budget cap (no stalled rounds, beta recovers), plain target steps.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
import time

import numpy as np
import pytest
from scipy import stats

from cloud.verifier import TargetInfo, Verifier, VerifierConfig
from common import codec
from common.costmodel import Costs
from common.rejection import target_probs
from common.schemes import Scheme, SchemeConfig
from edge.client import RoundReply
from edge.drafter import DraftConfig, Drafter
from bench.link_model import LinkModel
from edge.generate import generate

V = 6
_rng = np.random.default_rng(7)
TARGET = _rng.normal(0, 1.5, size=(V, V))  # next-token logits given the previous token
DRAFT = TARGET + _rng.normal(0, 0.7, size=(V, V))


class TableLM:
    def __init__(self, table: np.ndarray) -> None:
        self.table = table

    def logits(self, context, want):
        return np.stack([self.table[t] for t in context[len(context) - want:]]).astype(np.float32)


class LoopbackClient:
    """edge.client.CloudClient's interface over an in-process Verifier (no gRPC, no sockets)."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self.session_id = ""
        self.reopens = 0
        self.requests: list[codec.Batch] = []

    def wire_counts(self):
        return 0, 0

    def open(self, req: codec.OpenRequest) -> codec.Opened:
        s = self.verifier.open(req)
        self.session_id = s.id
        passes = {1: 10.0, 2: 10.0, 9: 10.0}
        return codec.Opened(s.id, "table", V, pass_rows=tuple(passes), pass_ms=tuple(passes.values()))

    def round(self, msg: codec.Batch, reopen) -> RoundReply:
        self.requests.append(msg)
        sent = time.time_ns() // 1000
        r = self.verifier.verify(self.verifier.get(self.session_id), msg)
        now = time.time_ns() // 1000
        v = r.verdict(sent, now)
        up, down = codec.batch_to_pb(msg).ByteSize(), codec.verdict_to_pb(v).ByteSize()  # sizes on the wire
        return RoundReply(v, sent, now, up + 40, down + 30, up, down)


def verifier(table=TARGET, eos=()) -> Verifier:
    info = TargetInfo("table", table.shape[1], "fp", tuple(eos))
    return Verifier(info, lambda: TableLM(table), VerifierConfig(calibrate_rows=()))


def draft_config(scheme="topk", temperature=1.0, seed=0, draft_len=None, k=None, ell=None, **kw) -> DraftConfig:
    sc = SchemeConfig(scheme, V, k=k or 3, ell=ell or 20, **kw)
    return DraftConfig(sc, max_draft_len=draft_len, temperature=temperature, seed=seed,
                       k_auto=k is None and scheme == "topk", ell_auto=ell is None and Scheme(scheme).lattice)


def speculation_pays(drafter: Drafter) -> None:
    """Synthetic costs under which drafting pays (a flat verify pass), so the adaptive stop and the
    K/ell menu decide the rounds rather than timer noise of a table model."""
    drafter.costs.costs = lambda: Costs(0.5, 2.0, 0.001, lambda r: 20.0 + 0.1 * r)


def run(cfg: DraftConfig, n_out: int, start: int = 0, pays=True, v: Verifier | None = None):
    drafter = Drafter(TableLM(DRAFT), cfg)
    if pays:
        speculation_pays(drafter)
    client = LoopbackClient(v or verifier())
    res = generate([start], drafter, client, max_new_tokens=n_out, vocab_fingerprint="fp")
    return res, client, drafter


def exact_joint(start: int, n: int, temperature: float) -> np.ndarray:
    p = target_probs(TARGET, temperature)  # [V, V]: row = previous token
    joint = np.zeros((V,) * n)
    for seq in itertools.product(range(V), repeat=n):
        prob, prev = 1.0, start
        for t in seq:
            prob *= p[prev, t]
            prev = t
        joint[seq] = prob
    return joint


@pytest.mark.parametrize("scheme", ["topk", "conformal"])
def test_adaptive_plan_is_lossless_joint_of_two_tokens(scheme):
    n_samples = 3000
    counts = np.zeros((V, V))
    lengths = set()
    for seed in range(n_samples):
        extra = {"beta0": 0.05} if scheme == "conformal" else {}
        res, client, _ = run(draft_config(scheme, seed=seed, **extra), n_out=3)
        counts[tuple(res.token_ids[:2])] += 1
        lengths.update(m.num_drafts for m in client.requests)
    expected = exact_joint(0, 2, 1.0) * n_samples
    mask = expected >= 5
    chi2 = (((counts - expected) ** 2 / np.where(mask, expected, 1))[mask]).sum()
    p_value = stats.chi2.sf(chi2, mask.sum() - 1)
    assert p_value > 1e-3, f"chi-square p = {p_value:.2e}"
    assert len(lengths) >= 2, "the plan should vary the draft length"


def test_control_a_biased_verifier_is_detected():
    """The harness above rejects a biased sampler: always taking the draft's argmax is not p."""
    n_samples = 1500
    counts = np.zeros(V)
    q = target_probs(DRAFT, 1.0)
    rng = np.random.default_rng(0)
    for _ in range(n_samples):
        counts[int(np.argmax(q[0] + rng.random(V) * 0.1))] += 1
    expected = target_probs(TARGET, 1.0)[0] * n_samples
    mask = expected >= 5
    chi2 = (((counts - expected) ** 2 / expected)[mask]).sum()
    assert stats.chi2.sf(chi2, mask.sum() - 1) < 1e-3


@pytest.mark.parametrize("scheme", ["topk", "conformal", "dense", "token", "fp16-topk"])
def test_greedy_tokens_equal_plain_decoding(scheme):
    plain, _, _ = run(draft_config("none", temperature=0.0), n_out=24, pays=False)
    ref = [int(t) for t in np.zeros(0)]
    prev = 0
    p = target_probs(TARGET, 0.0)
    for _ in range(24):
        prev = int(np.argmax(p[prev]))
        ref.append(prev)
    assert plain.token_ids == ref
    res, client, _ = run(draft_config(scheme, temperature=0.0), n_out=24)
    assert res.token_ids == ref
    assert any(m.num_drafts for m in client.requests)


def test_plain_steps_commit_several_tokens_per_round():
    cfg = draft_config("none", temperature=1.0, seed=3)
    drafter = Drafter(TableLM(DRAFT), cfg)
    drafter.costs.costs = lambda: Costs(1.0, 100.0, 0.0, lambda r: 10.0)  # RTT 10x a step: batch steps
    client = LoopbackClient(verifier())
    res = generate([0], drafter, client, max_new_tokens=20, vocab_fingerprint="fp")
    assert len(res.token_ids) == 20 and res.stats.rounds == 2 and res.stats.plain == 18
    # The same tokens as one zero-draft round per token (each step is that round's draw).
    one_by_one = Drafter(TableLM(DRAFT), cfg)
    one_by_one.costs.costs = lambda: Costs(1.0, 0.0, 0.0, lambda r: 10.0)
    res1 = generate([0], one_by_one, LoopbackClient(verifier()), max_new_tokens=20, vocab_fingerprint="fp")
    assert res1.stats.rounds == 20 and res1.token_ids == res.token_ids


def test_plain_steps_stop_at_eos():
    cfg = draft_config("none", temperature=1.0, seed=4)
    costs = lambda: Costs(1.0, 100.0, 0.0, lambda r: 10.0)  # noqa: E731 - batch 16 steps per round

    def gen(eos):
        drafter = Drafter(TableLM(DRAFT), cfg, eos_token_ids=eos)
        drafter.costs.costs = costs
        return generate([0], drafter, LoopbackClient(verifier(eos=eos)), max_new_tokens=20, vocab_fingerprint="fp")

    ref = gen([]).token_ids
    j = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])  # a token first seen at step j
    res = gen([ref[j]])
    assert res.stop_reason == "eos" and res.token_ids == ref[: j + 1] and res.stats.rounds == 1


@pytest.mark.parametrize("accounting", ["honest", "formula"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_batches_stay_within_the_budget(accounting, adaptive):
    for seed in range(20):
        sc = SchemeConfig("topk", V, k=3, ell=20)
        cfg = DraftConfig(sc, max_draft_len=None if adaptive else 12, budget_bits=40.0, budget_accounting=accounting,
                          temperature=1.0, seed=seed)
        res, client, _ = run(cfg, n_out=16)
        for r in res.stats.records:
            assert (r.honest_bits if accounting == "honest" else r.formula_bits) <= 40.0
        if not adaptive:
            assert max(m.num_drafts for m in client.requests) <= 12


class FlatLM:
    """A wide, nearly flat draft over 4,096 tokens: the threshold set at a small beta is huge."""

    def __init__(self, v: int = 4096) -> None:
        self.v = v

    def logits(self, context, want):
        rng = np.random.default_rng(len(context))
        return rng.normal(0, 0.05, size=(want, self.v)).astype(np.float32)


def test_conformal_never_stalls_when_the_threshold_support_exceeds_the_budget():
    """beta_1 = 1e-5 keeps all 4,096 tokens (~700 bits): the budget caps the support, the capped mass
    counts as dropped mass, and beta is projected onto what the budget allows instead of drifting
    down without bound; every round that may draft carries a draft, within B."""
    v = 4096
    info = TargetInfo("flat", v, "fp", ())
    ver = Verifier(info, lambda: FlatLM(v), VerifierConfig(calibrate_rows=()))
    sc = SchemeConfig("conformal", v, ell=100, beta0=1e-5, eta=0.01, alpha=0.0005)
    cfg = DraftConfig(sc, max_draft_len=4, budget_bits=600.0, temperature=1.0, seed=1)
    drafter = Drafter(FlatLM(v), cfg)
    client = LoopbackClient(ver)
    res = generate([0], drafter, client, max_new_tokens=30, vocab_fingerprint="fp")
    assert all(m.num_drafts >= 1 for m in client.requests[:-1])  # the last round has one token left
    assert all(r.honest_bits <= 600.0 for r in res.stats.records)
    assert drafter.controller.projections >= 28
    # Without the projection beta falls by eta * (dropped - alpha) ~ 0.01 per position (to -0.27 here).
    assert min(res.beta_trace) > -0.011
    assert res.mean_dropped_mass > 0.9  # honest: the cap's mass is dropped mass


def test_round_records_carry_the_plan_and_an_analytic_link():
    cfg = draft_config("topk", temperature=1.0, seed=5)
    drafter = Drafter(TableLM(DRAFT), cfg)
    speculation_pays(drafter)
    link = LinkModel(uplink_bps=64_000, downlink_bps=1e6, rtt_ms=200.0)
    res = link.priced(generate([0], drafter, link.around(LoopbackClient(verifier())), max_new_tokens=12,
                               vocab_fingerprint="fp"))
    assert res.link.startswith("model:")
    for r in res.stats.records:
        assert r.uplink_ms >= 100.0 and r.downlink_ms >= 100.0  # half the RTT each, plus serialisation
        assert r.predicted_ms > 0 and (r.k > 0) == (r.drafted > 0)
    assert res.stats.wall_s == pytest.approx(res.stats.latency_ms["total"] / 1e3)
    summary = res.stats.controller_summary()
    assert summary["rounds_speculative"] + summary["rounds_plain"] == res.stats.rounds


def test_pipelined_drafting_is_lossless_and_adopts_ahead_batches():
    """Fixed L = 1 and a 1 ms analytic link: while a batch flies the edge drafts the next one from
    its own guess of the bonus token; the joint law of output tokens 2 and 3 (the second made with
    an adopted ahead draft when the guess was right) is the target's."""
    n_samples, adopted = 3000, 0
    counts = np.zeros((V, V))
    link = LinkModel(1e9, 1e9, 1.0)
    for seed in range(n_samples):
        drafter = Drafter(TableLM(DRAFT), draft_config("topk", seed=seed, draft_len=1, k=3, ell=20))
        res = generate([0], drafter, link.around(LoopbackClient(verifier())), max_new_tokens=4, vocab_fingerprint="fp")
        counts[res.token_ids[1], res.token_ids[2]] += 1
        adopted += sum(r.ahead_adopted for r in res.stats.records)
    p = target_probs(TARGET, 1.0)  # [V, V]: row = previous token
    joint23 = np.einsum("a,ab,bc->bc", p[0], p, p) * n_samples  # sum over t1 of P(t1, t2, t3)
    mask = joint23 >= 5
    chi2 = (((counts - joint23) ** 2 / np.where(mask, joint23, 1))[mask]).sum()
    p_value = stats.chi2.sf(chi2, mask.sum() - 1)
    assert p_value > 1e-3, f"chi-square p = {p_value:.2e}"
    assert adopted > n_samples // 10, adopted


def test_pipelined_greedy_tokens_equal_plain_decoding():
    ref, _, _ = run(draft_config("none", temperature=0.0), n_out=24, pays=False)
    drafter = Drafter(TableLM(DRAFT), draft_config("topk", temperature=0.0, draft_len=2, k=3, ell=20))
    res = generate([0], drafter, LinkModel(1e9, 1e9, 5.0).around(LoopbackClient(verifier())), max_new_tokens=24,
                   vocab_fingerprint="fp")
    assert res.token_ids == ref.token_ids
    assert any(r.ahead_adopted for r in res.stats.records)


@pytest.mark.parametrize("scheme", ["topk", "conformal"])
def test_pipelining_never_changes_the_tokens_of_a_fixed_plan(scheme):
    """An adopted ahead batch is exactly the batch drafted after the verdict: with a fixed plan the
    tokens at T = 1 are those of the unpipelined run, whatever the timing."""
    adopted = 0
    for seed in range(6):
        outs = []
        for pipeline in (False, True):
            cfg = replace(draft_config(scheme, seed=seed, draft_len=3, k=3, ell=20), pipeline=pipeline)
            res = generate([0], Drafter(TableLM(DRAFT), cfg), LoopbackClient(verifier()), max_new_tokens=40,
                           vocab_fingerprint="fp")
            outs.append(res)
        assert outs[0].token_ids == outs[1].token_ids
        adopted += outs[1].stats.controller_summary()["ahead_batches_adopted"]
    assert adopted > 0


def test_a_round_repriced_on_its_own_link_keeps_its_recorded_time():
    """Repricing keeps what is not network (draft, cloud, drafting ahead past the verdict)."""
    link = LinkModel(64_000, 1e6, 200.0)
    drafter = Drafter(TableLM(DRAFT), draft_config("topk", seed=2, draft_len=2, k=3, ell=20))
    res = generate([0], drafter, link.around(LoopbackClient(verifier())), max_new_tokens=16, vocab_fingerprint="fp")
    for r in res.stats.records:
        assert link.round_ms(r) == pytest.approx(r.total_ms)
        assert LinkModel(1e9, 1e9, 0.0).round_ms(r) < r.total_ms - 199.0
