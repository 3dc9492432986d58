"""Shared passes that drop lookahead draft rows (common/pass_shape.py in Verifier._run_pass).

Tiny fp32 pair, batching on (the batched pass is where shaping runs), the verifier's pass table
replaced by synthetic ones: a table on which an extra row costs far more than it commits drops
every lookahead draft (T = 0: the tokens are still plain decoding's, the drops are metered, no
draft counts as verified); a flat table keeps them all; at T = 1 a table that keeps one draft of
two verifies only the first, and the token after it still follows the target's exact marginal
(chi-square, fixed seeds).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import tests.survive_tools as st  # noqa: E402
from cloud.verifier import TargetInfo, Verifier, VerifierConfig  # noqa: E402
from common import codec  # noqa: E402
from sqs_models.cached_lm import CachedLM  # noqa: E402
from sqs_models.registry import load_model  # noqa: E402
from tests.test_lookahead import (drafts_of, greedy, open_session, prompt_ids,  # noqa: E402
                                  second_token_marginal, second_tokens_with_random_lookahead, streamed)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", role="target")


def batched_verifier(m, table: dict[int, float]) -> tuple[Verifier, list[int]]:
    info = TargetInfo(m.name, m.vocab_size, m.fingerprint, ())
    v = Verifier(info, lambda: CachedLM(m.model, m.vocab_size), VerifierConfig(calibrate_rows=(1,), batch_window_ms=2.0))
    v._predict_pass_as_measured = lambda rows: table.get(rows, table[max(table)] * rows)  # the synthetic engine
    dropped: list[int] = []
    v.on_rows_dropped = dropped.append
    return v, dropped


@pytest.mark.parametrize("table, kept", [({1: 10.0, 2: 100.0, 3: 110.0}, False), ({1: 100.0, 2: 101.0, 3: 102.0}, True)])
def test_t0_drafts_a_pass_drops_leave_plain_decodings_tokens(tiny, table, kept):
    assert hasattr(CachedLM, "logits_batch")  # else the batched path (and shaping) would not run
    v, dropped = batched_verifier(tiny, table)
    prompt = prompt_ids(tiny)
    s, cfg = open_session(v, tiny, prompt, 0, 0.0)
    rng = np.random.default_rng(0)

    def emit(result):
        ahead = greedy(tiny, s.context, 2)
        v.offer_lookahead(s, codec.pack_batch(len(s.context), drafts_of(ahead, cfg, tiny, rng), cfg, lookahead=True))

    r = v.verify(s, streamed(len(prompt), 11), emit=emit)
    assert [r.token, *r.plain_tokens] == greedy(tiny, prompt, 12) and r.position == len(prompt) + 12
    if kept:
        assert (r.lookahead_drafted, r.lookahead_accepted, dropped) == (7, 7, [])
    else:  # every step had 2 drafts (1 on the last, which owes 2) and verified none
        assert (r.lookahead_drafted, r.lookahead_accepted) == (0, 0) and sum(dropped) == 2 * 9 + 1  # owed 11..3, 2


def test_t1_a_pass_that_keeps_the_first_of_two_drafts_keeps_the_target_marginal(tiny):
    """After x0 the edge offers two drafts from a random q; the table (2 rows as cheap as 1, 3 dear) keeps
    the first only, so the step verifies one draft and x1 must follow sum_x0 p(x0) p(x1 | x0)."""
    m = tiny
    v, dropped = batched_verifier(m, {1: 10.0, 2: 10.0, 3: 100.0})  # keeps 1 whatever the acceptance
    prompt = prompt_ids(m)
    p2 = second_token_marginal(m, prompt)
    n = 400
    counts, drafted = second_tokens_with_random_lookahead(v, m, prompt, n, seed0=7000, tag=77, drafts=2, steps=3)
    assert drafted == n and sum(dropped) == n  # one verified, one dropped, every sample
    assert st.pooled_chisquare_p(counts, n * p2) > 1e-3
