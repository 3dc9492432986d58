"""Load-aware plans (issue 20 item 6): every verdict quotes the cloud's price of one more row in its
passes at its current load, and the edge's plan weighs drafts with it, so speculation shrinks when
the cloud is saturated and grows when it is idle. Synthetic tables and prices, then one generation
through a real gRPC cloud to see the price travel.
"""

from __future__ import annotations

import tests.survive_tools as st
from cloud.pass_batcher import PassStats
from cloud.verifier import Verifier, VerifierConfig
from common.acceptance import AcceptanceModel, QuantLoss
from common.costmodel import CostModel, PassTimes, row_price
from common.planner import Planner, PlannerConfig, best_length
from edge.client import ClientConfig
from edge.runtime import EdgeRuntime

# A batched pass table (ms by rows in the pass): nearly flat up to 8 rows, then compute-bound.
TABLE = {1: 50.0, 2: 52.0, 4: 56.0, 8: 64.0, 16: 160.0, 32: 320.0}


def table() -> PassTimes:
    t = PassTimes()
    t.seed(list(TABLE), list(TABLE.values()))
    return t


def test_the_price_of_a_row_rises_with_the_load():
    t = table()
    loads = [(1, 1), (4, 2), (8, 4), (16, 8), (32, 16)]  # (rows, sessions) per pass
    prices = [row_price(t.predict, r, s) for r, s in loads]
    assert prices == sorted(prices) and prices[0] == 2.0 and prices[-1] >= 50 * prices[0]


def test_the_cloud_quotes_the_price_at_its_current_load():
    info, new_lm = st.target()
    v = Verifier(info, new_lm, VerifierConfig(batch_window_ms=2.0))
    v.record_passes(TABLE)
    quotes, total = [], PassStats()
    for rows_per, sessions_per in [(1, 1), (8, 4), (32, 16), (32, 16), (1, 1)]:  # 10 passes at each load
        total = PassStats(total.passes + 10, total.items + 10 * sessions_per, total.rows + 10 * rows_per)
        v.pass_stats = lambda t=total: t  # the batcher's cumulative counters
        quotes.append(v.row_price())
    # idle -> busier -> saturated (smoothed: the second saturated quote is higher still) -> idle again
    assert quotes[0] < quotes[1] < quotes[2] < quotes[3] and quotes[4] < quotes[3]


def test_planned_length_falls_as_the_price_per_row_rises():
    acc, loss = AcceptanceModel(), QuantLoss()
    lengths, speculates = [], []
    for price in (0.0, 0.5, 2.0, 8.0, 32.0, 128.0):
        cm = CostModel()
        cm.passes.seed(list(TABLE), list(TABLE.values()))
        cm.draft.add(1.0)
        cm.link.add(100, 10.0)
        cm.row_price.add(price)
        costs = cm.costs()
        assert costs.pass_ms(1) == 50.0 and costs.pass_ms(5) == 50.0 + 4 * price
        lengths.append(best_length(0.8, costs, 40.0, 32)[0])
        plan = Planner(PlannerConfig(), lambda k, ell: 40.0).plan(costs, acc, loss, 5000.0, 200)
        speculates.append(plan.speculate)
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    assert speculates[0] and not speculates[-1]  # idle: speculate; saturated: plain target steps


def test_verdicts_carry_the_price_to_the_edges_cost_model():
    cloud = st.Cloud()
    try:
        e = st.draft_engine()
        rt = EdgeRuntime(e, ClientConfig(cloud.address, **st.FAST_RETRY))
        g = rt.start(rt.encode(st.PROMPT), st.draft_config(3), max_new_tokens=12)
        for _ in g:
            pass
        assert g.drafter.costs.row_price and g.drafter.costs.row_price.value >= 0.0
    finally:
        cloud.stop()
