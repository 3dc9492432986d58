"""Conformal threshold controller (common/conformal.py): Theorem 2 and checkpoint/rollback.

Synthetic streams: peaked draft distributions q ~ Dirichlet(c * 1) over V = 1000 (c small), the
C-SQS support sparsify.threshold(q, beta) with the controller's current beta, batches of random
length L whose accepted count T is random; the controller observes every drafted position and
settle(T, L) keeps only the surviving ones. Checked:
- Theorem 2: mean dropped mass over the counted positions <= theorem2_bound() (an inequality, no
  tolerance), and the telescoping identity behind it,
  sum(dropped - alpha) = (beta_1 - beta_final) / eta, to 1e-9 relative;
- rollback equivalence: a controller that went through batches with rollbacks has exactly the same
  beta (bitwise) and counters as a fresh one that observed only the surviving positions in order.
"""

from __future__ import annotations

import numpy as np
import pytest

from common import schemes, sparsify
from common.conformal import ConformalController


def peaked_stream(rng: np.random.Generator, v: int, concentration: float, size: int) -> np.ndarray:
    """[size, V] draft distributions, Dirichlet(concentration) (gamma draws normalised)."""
    g = rng.gamma(concentration, size=(size, v))
    g[g.sum(axis=1) == 0, 0] = 1.0
    return g / g.sum(axis=1, keepdims=True)


def run_stream(ctrl: ConformalController, rng, v=1000, concentration=0.05, batches=600, max_len=8, log=None):
    """Simulate C-SQS batches; returns the positions' dropped masses that survived, in order."""
    survivors: list[float] = []
    for _ in range(batches):
        L = int(rng.integers(1, max_len + 1))
        qs = peaked_stream(rng, v, concentration, L)
        dropped = []
        for q in qs:
            s = sparsify.threshold(q, ctrl.beta)
            dropped.append(s.dropped_mass)
            ctrl.observe(s.dropped_mass)
        accepted = int(rng.integers(0, L + 1))
        ctrl.settle(accepted, L)
        kept = accepted + 1 if accepted < L else L
        survivors.extend(dropped[:kept])
        if log is not None:
            log.append((L, accepted, dropped))
    return survivors


THEOREM2_CASES = [
    # (eta, alpha, beta0, concentration, uniform q)
    (0.05, 0.05, 0.01, 0.05, False),
    (0.2, 0.01, 0.5, 0.02, False),
    (0.001, 0.0005, 0.01, 0.05, False),  # paper defaults: bound is loose at this T, must still hold
    (0.05, 0.02, -0.3, 0.1, False),  # negative start
    (0.05, 0.05, 0.01, 0.0, True),  # uniform q: all-or-nothing support, the hardest case for the bound
]


@pytest.mark.parametrize("eta,alpha,beta0,conc,uniform", THEOREM2_CASES)
def test_theorem2_bound_holds_on_synthetic_streams(eta, alpha, beta0, conc, uniform):
    """Over ~1800 counted positions of random batches with rollbacks, the mean dropped mass is at
    most alpha + (|beta_1| + 1 + eta*alpha) / (eta*T) = theorem2_bound(); the counters match the
    survivors; the telescoping identity holds to 1e-9 relative."""
    rng = np.random.default_rng(2024)
    ctrl = ConformalController(beta=beta0, eta=eta, alpha=alpha)
    if uniform:
        survivors = []
        for _ in range(600):
            L = int(rng.integers(1, 9))
            dropped = []
            for _ in range(L):
                s = sparsify.threshold(np.full(1000, 1e-3), ctrl.beta)
                dropped.append(s.dropped_mass)
                ctrl.observe(s.dropped_mass)
            a = int(rng.integers(0, L + 1))
            ctrl.settle(a, L)
            survivors.extend(dropped[: a + 1 if a < L else L])
    else:
        survivors = run_stream(ctrl, rng, concentration=conc)
    n = len(survivors)
    assert ctrl.counted_positions == n > 1000
    assert ctrl.counted_dropped_mass == pytest.approx(sum(survivors), rel=1e-12, abs=1e-12)
    assert ctrl.mean_dropped_mass == pytest.approx(sum(survivors) / n, rel=1e-12, abs=1e-12)
    bound = ctrl.theorem2_bound()
    assert bound == pytest.approx(alpha + (abs(beta0) + 1 + eta * alpha) / (eta * n), rel=1e-12)
    assert ctrl.mean_dropped_mass <= bound
    # Telescoping (what the proof uses): beta_final = beta_1 - eta * sum(d - alpha) over survivors.
    if eta > 0:
        lhs = sum(d - alpha for d in survivors)
        assert lhs == pytest.approx((beta0 - ctrl.beta) / eta, rel=1e-9, abs=1e-9)


def test_theorem2_bound_is_nearly_tight_for_all_or_nothing_supports():
    """With uniform q the threshold keeps either everything (0 dropped) or one token (~1 dropped):
    the mean dropped mass then sits close to alpha, within the Theorem 2 slack: a controller that
    ignored the update (or updated with the wrong sign) would be far outside."""
    ctrl = ConformalController(beta=0.01, eta=0.05, alpha=0.05)
    q = np.full(1000, 1e-3)
    for _ in range(4000):
        ctrl.observe(sparsify.threshold(q, ctrl.beta).dropped_mass)
        ctrl.settle(1, 1)
    assert abs(ctrl.mean_dropped_mass - 0.05) <= ctrl.theorem2_bound() - 0.05
    assert ctrl.mean_dropped_mass <= ctrl.theorem2_bound()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rollback_equals_replaying_only_surviving_positions(seed):
    """A controller run through 400 batches with rollbacks has bitwise the same beta,
    counted_positions and counted_dropped_mass (to 1e-12) as a fresh controller that observed only
    the surviving positions (accepted drafts + the rejected one), in order, one settle per batch."""
    rng = np.random.default_rng(seed)
    a = ConformalController(beta=0.02, eta=0.03, alpha=0.02)
    log: list = []
    run_stream(a, rng, batches=400, log=log)
    b = ConformalController(beta=0.02, eta=0.03, alpha=0.02)
    for L, accepted, dropped in log:
        kept = accepted + 1 if accepted < L else L
        for d in dropped[:kept]:
            b.observe(d)
        b.settle(kept, kept)
    assert a.beta == b.beta
    assert a.counted_positions == b.counted_positions
    assert a.counted_dropped_mass == pytest.approx(b.counted_dropped_mass, rel=1e-12)


def test_settle_keeps_accepted_plus_rejected_and_restores_beta():
    """Hand-checked: after observing 4 positions, settle(1, 4) keeps positions 1 and 2 (the
    accepted one and the rejected one) and restores beta to its value after position 2;
    settle(L, L) keeps all L (the bonus position was never drafted); settle(0, 1) keeps the one
    rejected position."""
    c = ConformalController(beta=0.5, eta=0.1, alpha=0.0)
    for d in (0.1, 0.2, 0.3, 0.4):
        c.observe(d)
    c.settle(1, 4)
    assert c.beta == (0.5 - 0.1 * 0.1) - 0.1 * 0.2
    assert c.counted_positions == 2 and c.counted_dropped_mass == pytest.approx(0.3)
    c.observe(0.5)
    c.observe(0.5)
    before = c.beta
    c.settle(2, 2)
    assert c.counted_positions == 4 and c.beta == before
    c.observe(1.0)
    c.settle(0, 1)
    assert c.counted_positions == 5 and c.counted_dropped_mass == pytest.approx(2.3)


@pytest.mark.parametrize("accepted,drafted,observed", [(3, 2, 2), (-1, 2, 2), (0, 3, 2), (0, 1, 0)])
def test_settle_rejects_inconsistent_counts(accepted, drafted, observed):
    """settle with T > L, T < 0, or L different from the number of observed positions: ValueError."""
    c = ConformalController(beta=0.1)
    for _ in range(observed):
        c.observe(0.1)
    with pytest.raises(ValueError):
        c.settle(accepted, drafted)


def test_update_rule_and_edge_cases():
    """observe applies beta <- beta - eta (d - alpha) and returns the new beta; eta = 0 keeps beta
    fixed and makes the bound infinite; no counted positions: bound inf, mean 0; bad eta/alpha
    raise ValueError."""
    c = ConformalController(beta=0.01, eta=0.001, alpha=0.0005)
    assert c.theorem2_bound() == float("inf") and c.mean_dropped_mass == 0.0
    assert c.observe(0.2) == 0.01 - 0.001 * (0.2 - 0.0005) == c.beta
    z = ConformalController(beta=0.3, eta=0.0)
    z.observe(0.9)
    z.settle(1, 1)
    assert z.beta == 0.3 and z.theorem2_bound() == float("inf")
    for kw in (dict(eta=-0.1), dict(alpha=-0.01), dict(alpha=1.5)):
        with pytest.raises(ValueError):
            ConformalController(beta=0.1, **kw)


def test_conformal_scheme_reports_the_threshold_dropped_mass():
    """schemes.describe with the conformal scheme uses threshold(q, beta): the support and the
    dropped mass it reports are the sparsifier's (what the controller must be fed), and the
    lattice counts cover exactly that support."""
    rng = np.random.default_rng(9)
    cfg = schemes.SchemeConfig("conformal", vocab_size=1000, ell=100)
    for q in peaked_stream(rng, 1000, 0.05, 50):
        for beta in (0.0, 0.01, 0.2, 2.0):
            d = schemes.describe(q, cfg, beta=beta)
            s = sparsify.threshold(q, beta)
            assert np.array_equal(d.support, s.tokens)
            assert d.dropped_mass == s.dropped_mass
            assert int(d.counts.sum()) == 100
