"""Losslessness of speculative verification, tested statistically (common/rejection.py).

A tiny bigram "language model" over V = 5..8 tokens stands in for both models: the draft q(.|prev)
and the target p(.|prev) are fixed tables. The edge side is the real code path: q is described by a
scheme (schemes.describe: sparsify + lattice quantize, or float values) and every draft token is
drawn by schemes.draw from exactly the q_hat that is sent; the cloud side is rejection.verify with
the (L+1) target rows p(.|context), p(.|x_1), ..., p(.|x_L). The output sequence (accepted drafts
plus the resampled/bonus token, continuing over as many rounds as needed) must be distributed as
the target model would sample it: the joint law of the first n output tokens is the product
p(y_1|s) p(y_2|y_1) ... .

Tolerance: a Pearson chi-square test (scipy.stats.chisquare) of the empirical counts against the
exact probabilities, bins with expected count < 5 pooled, must give p-value > 1e-3 (P_MIN); an
outcome of exact probability 0 must never occur at all. Every run uses a fixed-seed numpy Generator,
so the outcome is deterministic; the "harness has power" tests show that the same harness rejects
two classic biased implementations (resampling from p instead of the residual, drafting from q
instead of q_hat) with p-value < 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from common import rejection, schemes
from common.rejection import sample, target_probs, verify
from common.schemes import Scheme, SchemeConfig

P_MIN = 1e-3  # chi-square p-value tolerance


# ---------------------------------------------------------------------------------------------
# harness


def pooled_chisquare_pvalue(observed: np.ndarray, probs: np.ndarray) -> float:
    """p-value of observed counts against exact probabilities, pooling bins with expected < 5.

    Asserts first that no outcome of probability 0 was observed (that is a hard failure, not a
    statistical one).
    """
    observed = np.asarray(observed, dtype=np.float64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    n = observed.sum()
    assert np.all(observed[probs <= 0] == 0), "an outcome of probability 0 occurred"
    keep = probs > 0
    obs, exp = observed[keep], n * probs[keep] / probs[keep].sum()
    small = exp < 5
    bins_o, bins_e = list(obs[~small]), list(exp[~small])
    if small.any():
        po, pe = obs[small].sum(), exp[small].sum()
        if pe >= 5 or not bins_e:
            bins_o.append(po)
            bins_e.append(pe)
        else:  # still too small: merge into the smallest regular bin
            j = int(np.argmin(bins_e))
            bins_o[j] += po
            bins_e[j] += pe
    if len(bins_e) < 2:
        return 1.0  # a single possible outcome: nothing statistical left to test
    return float(chisquare(bins_o, bins_e).pvalue)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Drafter:
    """Draft side of the bigram model: q_hat(.|prev) per previous token, via describe + draw."""

    def __init__(self, q_table: np.ndarray, config: SchemeConfig, beta: float | None = None):
        self.config = config
        self.drafts = [schemes.describe(q_table[prev], config, beta=beta) for prev in range(q_table.shape[0])]
        v = q_table.shape[1]
        self.q_hat = np.zeros((q_table.shape[0], v))  # [V_prev, V] dense q_hat rows as sent
        for prev, d in enumerate(self.drafts):
            self.q_hat[prev, d.support] = d.probs

    def draw(self, prev: int, rng: np.random.Generator) -> int:
        return schemes.draw(self.drafts[prev], self.config.ell, rng).token


def generate(target: np.ndarray, drafter, L: int, start: int, n_out: int, rng, verify_fn=verify, draft_fn=None):
    """Run speculative rounds of L drafts until n_out output tokens exist; return the first n_out.

    target: [V, V] table p(.|prev). The draft rows given to verify are drafter.q_hat; the draft
    tokens come from draft_fn(prev, rng) (default: drafter.draw, i.e. from q_hat itself).
    """
    draft_fn = draft_fn or drafter.draw
    out: list[int] = []
    last = start
    while len(out) < n_out:
        xs, prev = [], last
        for _ in range(L):
            prev = draft_fn(prev, rng)
            xs.append(prev)
        q_rows = drafter.q_hat[[last] + xs[:-1]]  # [L, V]
        p_rows = target[[last] + xs]  # [L+1, V]
        accepted, token = verify_fn(xs, q_rows, p_rows, rng)
        assert 0 <= accepted <= L
        new = xs[:accepted] + [int(token)]
        out.extend(new)
        last = new[-1]
    return out[:n_out]


def exact_joint(target: np.ndarray, start: int, n_out: int) -> np.ndarray:
    """p(y_1|start) p(y_2|y_1) ... as an array of shape [V] * n_out."""
    v = target.shape[1]
    joint = target[start].copy()
    for _ in range(1, n_out):
        joint = joint[..., None] * target.reshape((1,) * (joint.ndim - 1) + (v, v))
    return joint


def empirical_joint(target, drafter, L, start, n_out, n_samples, seed, **kw) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = target.shape[1]
    counts = np.zeros((v,) * n_out)
    for _ in range(n_samples):
        counts[tuple(generate(target, drafter, L, start, n_out, rng, **kw))] += 1
    return counts


def bigram_tables(v: int, seed: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """(q table, p table): draft softmax(logits_q), target target_probs(logits_p, T, top_k, top_p)."""
    rng = np.random.default_rng(seed)
    q = softmax_rows(rng.normal(0.0, 1.5, size=(v, v)))
    p = target_probs(rng.normal(0.0, 1.5, size=(v, v)), temperature, top_k, top_p)
    return q, p


# ---------------------------------------------------------------------------------------------
# first output token


FIRST_TOKEN_CASES = [
    # (id, scheme config kwargs, beta, L)
    ("topk-K3-ell8-L1", dict(scheme="topk", k=3, ell=8), None, 1),
    ("topk-K3-ell8-L2", dict(scheme="topk", k=3, ell=8), None, 2),
    ("topk-K3-ell8-L3", dict(scheme="topk", k=3, ell=8), None, 3),
    ("topk-K3-ell8-L4", dict(scheme="topk", k=3, ell=8), None, 4),
    ("topk-dropzeros-K5-ell4-L2", dict(scheme="topk", k=5, ell=4, drop_zeros=True), None, 2),
    ("conformal-beta0.15-ell20-L3", dict(scheme="conformal", ell=20), 0.15, 3),
    ("dense-ell5-L2", dict(scheme="dense", ell=5), None, 2),
    ("token-L3", dict(scheme="token"), None, 3),
    ("fp16-topk-K2-L2", dict(scheme="fp16-topk", k=2), None, 2),
    ("fp32-L4", dict(scheme="fp32"), None, 4),
]


@pytest.mark.parametrize("case", FIRST_TOKEN_CASES, ids=[c[0] for c in FIRST_TOKEN_CASES])
def test_first_output_token_follows_target_at_positive_temperature(case):
    """T = 0.8, V = 6: the first output token of a verification round is distributed as p_1 for
    every scheme (q_hat with zeros where p > 0 for top-K / token / conformal) and L = 1..4.
    Tolerance: chi-square p-value > 1e-3 over 3000 rounds."""
    _, kw, beta, L = case
    v = 6
    q, p = bigram_tables(v, seed=101, temperature=0.8)
    drafter = Drafter(q, SchemeConfig(vocab_size=v, **kw), beta=beta)
    counts = empirical_joint(p, drafter, L, start=2, n_out=1, n_samples=3000, seed=1000 + L)
    pval = pooled_chisquare_pvalue(counts, p[2])
    assert pval > P_MIN, f"first output token deviates from p_1 (p-value {pval:.2e})"


@pytest.mark.parametrize("L", [1, 2, 3, 4])
@pytest.mark.parametrize("scheme_kw", [dict(scheme="topk", k=3, ell=8), dict(scheme="dense", ell=3), dict(scheme="token")])
def test_greedy_target_output_is_deterministic_argmax(L, scheme_kw):
    """T = 0 (one-hot target rows): every one of 300 runs outputs exactly the greedy target chain
    (argmax, lowest id on ties) for its first 4 tokens, whatever the drafts were (no tolerance)."""
    v = 7
    rng = np.random.default_rng(5)
    q = softmax_rows(rng.normal(size=(v, v)))
    logits = rng.normal(size=(v, v))
    logits[3, [1, 4]] = logits[3].max() + 1.0  # an exact tie: token 1 must win
    p = target_probs(logits, 0.0)
    greedy, last = [], 0
    for _ in range(4):
        last = int(np.argmax(logits[last]))
        greedy.append(last)
    drafter = Drafter(q, SchemeConfig(vocab_size=v, **scheme_kw))
    gen = np.random.default_rng(77)
    for _ in range(300):
        assert generate(p, drafter, L, start=0, n_out=4, rng=gen) == greedy


# ---------------------------------------------------------------------------------------------
# whole sequence: joint law of several output tokens


def test_joint_of_three_output_tokens_topk_L2():
    """L = 2, top-K (K = 2 of V = 5, ell = 6: q_hat has zeros where p > 0), T = 1: the joint law
    of the first three output tokens (spanning one to three rounds) is p(y1) p(y2|y1) p(y3|y2).
    Tolerance: chi-square p-value > 1e-3 over 12000 sequences (125 cells, small ones pooled)."""
    v = 5
    q, p = bigram_tables(v, seed=202, temperature=1.0)
    drafter = Drafter(q, SchemeConfig("topk", v, k=2, ell=6))
    assert np.all((drafter.q_hat == 0).sum(axis=1) >= 3) and np.all(p > 0)
    counts = empirical_joint(p, drafter, 2, start=0, n_out=3, n_samples=12000, seed=2)
    pval = pooled_chisquare_pvalue(counts, exact_joint(p, 0, 3))
    assert pval > P_MIN, f"joint of 3 output tokens deviates (p-value {pval:.2e})"


def test_joint_of_two_output_tokens_target_topk_topp_L3():
    """Target top-k = 3 and top-p = 0.8 applied (p has zeros where the dense q_hat > 0; dense QS,
    ell = 4 so q_hat also has zeros where p > 0), T = 1.3, L = 3, V = 8: joint of the first two
    output tokens equals p(y1) p(y2|y1); outcomes outside the target's top-k/top-p never occur.
    Tolerance: chi-square p-value > 1e-3 over 8000 sequences."""
    v = 8
    q, p = bigram_tables(v, seed=303, temperature=1.3, top_k=3, top_p=0.8)
    assert np.any((p == 0) & (Drafter(q, SchemeConfig("dense", v, ell=4)).q_hat > 0))
    drafter = Drafter(q, SchemeConfig("dense", v, ell=4))
    counts = empirical_joint(p, drafter, 3, start=5, n_out=2, n_samples=8000, seed=3)
    pval = pooled_chisquare_pvalue(counts, exact_joint(p, 5, 2))
    assert pval > P_MIN, f"joint of 2 output tokens deviates (p-value {pval:.2e})"


def test_joint_of_two_output_tokens_conformal_L2():
    """C-SQS support (threshold 0.2, ell = 10), T = 0.7, L = 2, V = 6: joint of the first two
    output tokens is exact. Tolerance: chi-square p-value > 1e-3 over 8000 sequences."""
    v = 6
    q, p = bigram_tables(v, seed=404, temperature=0.7)
    drafter = Drafter(q, SchemeConfig("conformal", v, ell=10), beta=0.2)
    counts = empirical_joint(p, drafter, 2, start=1, n_out=2, n_samples=8000, seed=4)
    pval = pooled_chisquare_pvalue(counts, exact_joint(p, 1, 2))
    assert pval > P_MIN, f"joint of 2 output tokens deviates (p-value {pval:.2e})"


def test_one_hot_drafts_token_scheme_joint():
    """Token scheme (q_hat one-hot at the draft argmax), T = 1, L = 3, V = 5: joint of the first
    two output tokens exact. Tolerance: chi-square p-value > 1e-3 over 8000 sequences."""
    v = 5
    q, p = bigram_tables(v, seed=505, temperature=1.0)
    drafter = Drafter(q, SchemeConfig("token", v))
    assert np.all((drafter.q_hat == 1.0).sum(axis=1) == 1)
    counts = empirical_joint(p, drafter, 3, start=0, n_out=2, n_samples=8000, seed=5)
    pval = pooled_chisquare_pvalue(counts, exact_joint(p, 0, 2))
    assert pval > P_MIN, f"joint deviates with one-hot drafts (p-value {pval:.2e})"


def test_draft_equal_to_target_never_rejects():
    """q_hat == p exactly (the target table is the dequantized lattice table): every one of 3000
    rounds with L = 3 accepts all drafts (no tolerance), and the bonus token after the last draft
    follows p (chi-square p-value > 1e-3 on the first output token, which is always the draft)."""
    v = 6
    q, _ = bigram_tables(v, seed=606)
    drafter = Drafter(q, SchemeConfig("topk", v, k=4, ell=12))
    p = drafter.q_hat.copy()
    rng = np.random.default_rng(6)
    first = np.zeros(v)
    bonus_pairs = np.zeros((v, v))  # (x_L, bonus)
    for _ in range(3000):
        xs, prev = [], 3
        for _ in range(3):
            prev = drafter.draw(prev, rng)
            xs.append(prev)
        accepted, token = verify(xs, drafter.q_hat[[3] + xs[:-1]], p[[3] + xs], rng)
        assert accepted == 3
        first[xs[0]] += 1
        bonus_pairs[xs[-1], token] += 1
    assert pooled_chisquare_pvalue(first, p[3]) > P_MIN
    for x in range(v):  # bonus ~ p(.|x_L), tested per conditioning token with enough samples
        if bonus_pairs[x].sum() >= 200:
            assert pooled_chisquare_pvalue(bonus_pairs[x], p[x]) > P_MIN


def test_target_one_hot_with_dense_draft_first_token_is_argmax():
    """T = 0 target against a dense QS draft that puts mass on every token: the first output token
    is the target argmax in all 2000 rounds, L = 1..4 (no tolerance)."""
    v = 6
    q = softmax_rows(np.random.default_rng(707).normal(0.0, 0.3, size=(v, v)))  # no entry below 1/120
    logits = np.random.default_rng(8).normal(size=(v, v))
    p = target_probs(logits, 0.0)
    drafter = Drafter(q, SchemeConfig("dense", v, ell=60))
    assert np.all(drafter.q_hat > 0)
    rng = np.random.default_rng(9)
    for i in range(2000):
        assert generate(p, drafter, 1 + i % 4, start=4, n_out=1, rng=rng) == [int(np.argmax(logits[4]))]


class _ForcedFirstUniform:
    """A Generator stand-in: the first random() returns `first`, later calls use a real Generator."""

    def __init__(self, first: float, rng: np.random.Generator):
        self.first, self.rng, self.used = first, rng, False

    def random(self):
        if not self.used:
            self.used = True
            return self.first
        return self.rng.random()


def test_empty_residual_resamples_from_target():
    """p <= q_hat everywhere at a rejected position (p = q_hat (1 - 1e-13): the residual
    max(0, p - q_hat) is all zero): a rejection forced by a uniform of 1 - 1e-15 must resample from
    p itself: never token 3 (p = 0 there), chi-square p-value > 1e-3 over 4000 forced rejections
    (a uniform or argmax fallback fails this)."""
    q_hat = np.array([[0.5, 0.25, 0.25, 0.0]])
    p = np.vstack([q_hat[0] * (1 - 1e-13), [0.1, 0.2, 0.3, 0.4]])
    rng = np.random.default_rng(10)
    counts = np.zeros(4)
    for i in range(4000):
        x = [0, 1, 2][i % 3]
        accepted, token = verify([x], q_hat, p, _ForcedFirstUniform(1 - 1e-15, rng))
        assert accepted == 0
        counts[token] += 1
    pval = pooled_chisquare_pvalue(counts, p[0])
    assert pval > P_MIN, f"empty-residual resample deviates from p (p-value {pval:.2e})"


def test_residual_distribution_after_rejection():
    """Given a rejection at position 1, the new token follows norm(max(0, p - q_hat)) exactly
    (conditional check of the residual itself; V = 6, 5000 rejections collected, p-value > 1e-3),
    and never lands on a token where p <= q_hat."""
    v = 6
    q, p = bigram_tables(v, seed=808, temperature=1.0)
    drafter = Drafter(q, SchemeConfig("topk", v, k=3, ell=5))
    residual = np.maximum(0.0, p[0] - drafter.q_hat[0])
    residual /= residual.sum()
    rng = np.random.default_rng(11)
    counts = np.zeros(v)
    while counts.sum() < 5000:
        x = drafter.draw(0, rng)
        accepted, token = verify([x], drafter.q_hat[[0]], p[[0, x]], rng)
        if accepted == 0:
            counts[token] += 1
    pval = pooled_chisquare_pvalue(counts, residual)
    assert pval > P_MIN, f"resampled token deviates from the residual (p-value {pval:.2e})"


# ---------------------------------------------------------------------------------------------
# the harness has power: classic biased implementations are rejected


def _verify_resample_from_p(draft_tokens, draft_probs, target, rng):
    """A biased verifier: on rejection it samples from p instead of the residual."""
    for n, x in enumerate(draft_tokens):
        if rng.random() * draft_probs[n, x] < target[n, x]:
            continue
        return n, sample(target[n], rng)
    return len(draft_tokens), sample(target[len(draft_tokens)], rng)


def test_harness_detects_resampling_from_p():
    """Sanity of the statistics: the joint-of-two harness (same setting as the top-K test,
    6000 sequences) rejects a verifier that resamples from p instead of the residual
    (p-value < 1e-3), so the passing tests above are not vacuous."""
    v = 5
    q, p = bigram_tables(v, seed=202, temperature=1.0)
    drafter = Drafter(q, SchemeConfig("topk", v, k=2, ell=6))
    counts = empirical_joint(p, drafter, 2, start=0, n_out=2, n_samples=6000, seed=12, verify_fn=_verify_resample_from_p)
    assert pooled_chisquare_pvalue(counts, exact_joint(p, 0, 2)) < P_MIN


def test_harness_detects_drafting_from_unquantized_q():
    """Sanity of the statistics: drafting from q while verifying against the q_hat that was sent
    (pitfall of docs/DESIGN.md section 7) is detected (p-value < 1e-3, 6000 sequences; dense QS with
    ell = 7 over V = 5, every q_hat entry 1/7 or 2/7 so no draft is refused outright)."""
    v = 5
    rng = np.random.default_rng(909)
    q = softmax_rows(rng.normal(0.0, 0.3, size=(v, v)))
    p = softmax_rows(rng.normal(0.0, 1.0, size=(v, v)))
    drafter = Drafter(q, SchemeConfig("dense", v, ell=7))
    assert np.all(drafter.q_hat > 0)

    def from_q(prev, rng):
        return sample(q[prev], rng)

    counts = empirical_joint(p, drafter, 2, start=0, n_out=2, n_samples=6000, seed=13, draft_fn=from_q)
    assert pooled_chisquare_pvalue(counts, exact_joint(p, 0, 2)) < P_MIN
    honest = empirical_joint(p, drafter, 2, start=0, n_out=2, n_samples=6000, seed=13)
    assert pooled_chisquare_pvalue(honest, exact_joint(p, 0, 2)) > P_MIN


# ---------------------------------------------------------------------------------------------
# verify API contract


def test_verify_contract_and_determinism():
    """verify returns Python ints (accepted in [0, L], token in [0, V)); the same seed gives the
    same answer; verify and verify_sparse agree draw for draw on the same rows."""
    v = 8
    q, p = bigram_tables(v, seed=1)
    drafter = Drafter(q, SchemeConfig("topk", v, k=3, ell=10))
    rng = np.random.default_rng(0)
    for _ in range(200):
        xs, prev = [], 0
        for _ in range(3):
            prev = drafter.draw(prev, rng)
            xs.append(prev)
        qr, pr = drafter.q_hat[[0] + xs[:-1]], p[[0] + xs]
        seed = int(rng.integers(1 << 30))
        a = verify(xs, qr, pr, np.random.default_rng(seed))
        b = verify(xs, qr, pr, np.random.default_rng(seed))
        rows = [rejection.SparseRow(np.flatnonzero(r > 0), r[r > 0]) for r in qr]
        c = rejection.verify_sparse(xs, rows, pr, np.random.default_rng(seed))
        assert a == b == c
        assert type(a[0]) is int and type(a[1]) is int
        assert 0 <= a[0] <= 3 and 0 <= a[1] < v


def test_verify_rejects_zero_probability_draft_and_shape_mismatch():
    """A draft token with q_hat = 0 (it cannot have been drawn) or a wrong number of rows:
    ValueError, not IndexError."""
    q = np.array([[0.5, 0.5, 0.0]])
    p = np.full((2, 3), 1 / 3)
    with pytest.raises(ValueError):
        verify([2], q, p, np.random.default_rng(0))
    with pytest.raises(ValueError):
        verify([0], q, p[:1], np.random.default_rng(0))


def test_verify_with_no_drafts_samples_the_target():
    """L = 0 (plain target decoding through the same verifier): verify([], [0, V] rows, [1, V]
    target) returns (0, token ~ p_1). verify_sparse handles it; verify() raises ValueError
    'cannot reshape array of size 0 into shape (0,newaxis)'."""
    p = np.array([[0.0, 1.0, 0.0]])
    assert verify([], np.zeros((0, 3)), p, np.random.default_rng(0)) == (0, 1)


# ---------------------------------------------------------------------------------------------
# target_probs and sample


def test_target_probs_greedy_one_hot_lowest_id_on_tie():
    """T = 0 gives one-hot rows at the argmax; ties go to the lowest id; top-k/top-p don't matter."""
    logits = np.array([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    for kw in ({}, dict(top_k=2), dict(top_p=0.5)):
        out = target_probs(logits, 0.0, **kw)
        assert out.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


def test_target_probs_never_modifies_input():
    """Neither a float64 nor a float32 logits array is edited (any temperature/top-k/top-p), and
    the result is a fresh float64 array."""
    rng = np.random.default_rng(2)
    for dtype in (np.float64, np.float32):
        logits = rng.normal(size=(3, 50)).astype(dtype)
        before = logits.copy()
        for t, k, tp in [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.2, 0, 0.6), (0.5, 10, 0.9)]:
            out = target_probs(logits, t, top_k=k, top_p=tp)
            assert out.dtype == np.float64 and not np.shares_memory(out, logits)
            assert np.array_equal(logits, before)


def test_target_probs_softmax_with_temperature():
    """T > 0 without filters is softmax(logits / T) (to 1e-12), rows sum to 1, no overflow for
    logits spread over 1e4 or a tiny temperature."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 30))
    for t in (0.3, 1.0, 2.5):
        assert np.allclose(target_probs(logits, t), softmax_rows(logits / t), atol=1e-12, rtol=0)
    wild = np.array([[1e4, -1e4, 0.0, 1e4 - 1]])
    for t in (1e-6, 1.0):
        out = target_probs(wild, t)
        assert np.all(np.isfinite(out)) and out.sum() == pytest.approx(1.0)


def test_target_probs_top_k_keeps_the_k_largest():
    """top_k = k (distinct logits) keeps exactly the k most probable tokens, proportional to the
    softmax, renormalised (to 1e-12)."""
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(5, 40))
    full = softmax_rows(logits)
    for k in (1, 3, 39):
        out = target_probs(logits, 1.0, top_k=k)
        for row, f in zip(out, full):
            kept = np.flatnonzero(row > 0)
            assert kept.tolist() == sorted(np.argsort(-f)[:k].tolist())
            assert np.allclose(row[kept], f[kept] / f[kept].sum(), atol=1e-12, rtol=0)


def oracle_top_p(p: np.ndarray, top_p: float) -> list[int]:
    """Smallest set of most probable tokens whose mass reaches top_p (lower id first on ties)."""
    order = sorted(range(p.size), key=lambda i: (-p[i], i))
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    return sorted(kept)


def test_target_probs_top_p_keeps_smallest_high_probability_set():
    """top_p keeps exactly the oracle's smallest most-probable set reaching top_p (cases whose
    cumulative mass lies within 1e-9 of top_p are skipped as float-ambiguous); always >= 1 token;
    kept tokens renormalised."""
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(300):
        logits = rng.normal(0.0, 2.0, size=20)
        top_p = float(rng.uniform(0.05, 0.99))
        full = softmax_rows(logits)
        cums = np.cumsum(np.sort(full)[::-1])
        if np.min(np.abs(cums - top_p)) < 1e-9:
            continue
        out = target_probs(logits, 1.0, top_p=top_p)
        kept = np.flatnonzero(out > 0).tolist()
        assert kept == oracle_top_p(full, top_p)
        assert np.allclose(out[kept], full[kept] / full[kept].sum(), atol=1e-12, rtol=0)
        checked += 1
    assert checked > 250
    peaked = np.array([10.0, 0.0, 0.0])
    assert np.flatnonzero(target_probs(peaked, 1.0, top_p=0.01)).tolist() == [0]


@pytest.mark.parametrize("v,top_p,kept", [(4, 0.5, [0, 1]), (8, 0.375, [0, 1, 2]), (4, 0.51, [0, 1, 2]), (4, 1e-9, [0])])
def test_target_probs_top_p_exact_boundary(v, top_p, kept):
    """Uniform logits give exactly dyadic p (1/4, 1/8): when the first tokens' mass reaches top_p
    exactly, the set stops there (smallest set); ties go to the lower ids; uniform renormalisation."""
    out = target_probs(np.zeros((1, v)), 1.0, top_p=top_p)[0]
    assert np.flatnonzero(out).tolist() == kept
    assert np.all(out[kept] == 1.0 / len(kept))


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=float("inf")),
                                dict(temperature=1.0, top_p=0.0), dict(temperature=1.0, top_p=1.5),
                                dict(temperature=1.0, top_k=-1)])
def test_target_probs_rejects_bad_parameters(kw):
    """Negative/NaN/inf temperature, top_p outside (0, 1], negative top_k: ValueError."""
    with pytest.raises(ValueError):
        target_probs(np.zeros((1, 4)), **kw)


def test_sample_follows_weights_and_never_picks_zero():
    """sample() on un-normalised weights with zeros: zero-weight entries never drawn, frequencies
    match (chi-square p-value > 1e-3 over 20000 draws); an all-zero vector raises ValueError."""
    w = np.array([0.0, 3.0, 0.0, 1.0, 6.0, 0.0])
    rng = np.random.default_rng(14)
    counts = np.bincount([sample(w, rng) for _ in range(20000)], minlength=w.size)
    assert pooled_chisquare_pvalue(counts, w / w.sum()) > P_MIN
    with pytest.raises(ValueError):
        sample(np.zeros(4), rng)


def test_sample_at_the_top_of_the_unit_interval():
    """A uniform of 1 - 2**-53 (u * total can round up to the last cdf step) still returns the
    last positive-weight entry, never a trailing zero-weight one."""
    class Top:
        def random(self):
            return 1.0 - 2.0**-53

    assert sample(np.array([0.1, 0.2, 0.7, 0.0, 0.0]), Top()) == 2
    assert sample(np.array([1 / 3, 1 / 3, 1 / 3]), Top()) == 2


def test_sample_is_the_inverse_cdf_on_half_open_intervals():
    """sample maps u to the index i with cdf[i-1] <= u * total < cdf[i]: u = 0 gives the first
    positive-weight entry (skipping leading zeros), a u landing exactly on a cdf step goes to the
    next entry, and zero-weight entries in between are skipped."""
    class Fixed:
        def __init__(self, u):
            self.u = u

        def random(self):
            return self.u

    w = np.array([0.0, 1.0, 1.0, 0.0, 2.0])  # cdf 0, 1, 2, 2, 4 (total 4)
    assert sample(w, Fixed(0.0)) == 1
    assert sample(w, Fixed(0.25)) == 2  # u * total = 1.0, exactly cdf[1]
    assert sample(w, Fixed(0.5)) == 4  # exactly cdf[2] = cdf[3]: the zero entry 3 is skipped
    assert sample(w, Fixed(0.4999)) == 2


def test_draw_uses_exact_lattice_frequencies():
    """schemes.draw on lattice counts [0, 3, 0, 5, 2] (ell = 10) picks each support token with
    frequency counts / ell (chi-square p-value > 1e-3, 20000 draws) and never a zero-count token."""
    v = 5
    d = schemes.Draft(-1, np.arange(v), np.array([0, 3, 0, 5, 2]) / 10, counts=np.array([0, 3, 0, 5, 2]))
    rng = np.random.default_rng(15)
    counts = np.bincount([schemes.draw(d, 10, rng).token for _ in range(20000)], minlength=v)
    assert pooled_chisquare_pvalue(counts, d.probs) > P_MIN


def test_scheme_enum_covers_the_cases():
    """The statistical cases above exercise every rejection-sampled drafting scheme; the invariant
    scheme (verified by Gumbel-max agreement, not rejection) has its own in tests/test_gumbel.py and
    tests/test_invariant.py."""
    used = {Scheme(kw["scheme"]) for _, kw, _, _ in FIRST_TOKEN_CASES}
    assert used == set(Scheme) - {Scheme.NONE, Scheme.INVARIANT}
