"""common/pass_shape.py: which optional (lookahead draft) rows a shared pass keeps, on synthetic
pass tables, against a brute-force oracle over every way of dropping rows deepest-first."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from common.pass_shape import shape_rows


def repacked(step: float = 115.0, four: float = 205.0):
    """llama.cpp with repacked weights: rows in fours, each left over alone (RESULTS 0i's shape)."""
    return lambda r: (r // 4) * four + (r % 4) * step


def repacked_wide(step: float = 115.0):
    """The same with the economies of width llama-bench measured there (1.5B Q4_K_M, one thread):
    4 rows 208 ms, 8 417, 16 466, 32 800, 64 1600, and each row past a multiple of 4 a step."""
    xs, ys = [0, 4, 8, 16, 32, 64], [0.0, 208.0, 417.0, 466.0, 800.0, 1600.0]
    return lambda r: float(np.interp(4 * (r // 4), xs, ys)) + (r % 4) * step


def linear(step: float = 100.0):
    return lambda r: step * r


def flat(step: float = 300.0, slope: float = 0.02):
    return lambda r: step * (1 + slope * (r - 1))


def oracle(wants, optional, cost, a):
    """Best expected tokens per ms over every per-item prefix of optional rows (ties: more rows),
    restricted to the deepest-first family the function searches (no kept row deeper than a dropped
    one; at one depth any subset, all worth the same)."""
    best = None
    for drops in itertools.product(*[range(o + 1) for o in optional]):
        keep = [w - d for w, d in zip(wants, drops)]
        # deepest-first: no kept row deeper than a dropped one of any item
        kept_depth = max((o - d for o, d in zip(optional, drops)), default=0)
        min_dropped = min((o - d + 1 for o, d in zip(optional, drops) if d), default=10 ** 9)
        if kept_depth > min_dropped:
            continue
        value = sum(w - o for w, o in zip(wants, optional)) + sum(a ** j for o, d in zip(optional, drops)
                                                                   for j in range(1, o - d + 1))
        rate = value / cost(sum(keep))
        if best is None or rate > best[0] * (1 + 1e-9) or (abs(rate - best[0]) <= best[0] * 1e-9 and sum(keep) > sum(best[1])):
            best = (rate, keep)
    return best


def test_one_draft_over_a_multiple_of_four_is_dropped_on_repacked_llama():
    # 8 sessions' plain steps + one lookahead draft: 9 rows cost 8 rows + a full step
    wants, optional = [1] * 7 + [2], [0] * 7 + [1]
    assert shape_rows(wants, optional, repacked(), 0.95) == [1] * 8
    # the same pass on an engine whose extra row is cheap keeps it
    assert shape_rows(wants, optional, flat(), 0.95) == wants
    # and on a compute-bound one, where every row costs a step, a draft (worth 0.95 token) never pays
    assert shape_rows(wants, optional, linear(), 0.95) == [1] * 8


def test_drafts_that_fill_a_four_are_kept_and_the_deepest_go_first():
    # 6 steps + 2 drafts on one session = 8 rows, a full multiple of four: kept (6 rows cost more)
    assert shape_rows([1] * 5 + [3], [0] * 5 + [2], repacked(), 0.9) == [1] * 5 + [3]
    # 10 steps, two of them with drafts 3 deep = 16 rows, where a row costs half what it does at 8: kept
    assert shape_rows([1] * 8 + [4, 4], [0] * 8 + [3, 3], repacked_wide(), 0.9) == [1] * 8 + [4, 4]
    # the same with one more draft (17 rows): only that deepest row goes
    assert shape_rows([1] * 8 + [4, 5], [0] * 8 + [3, 4], repacked_wide(), 0.9) == [1] * 8 + [4, 4]
    # 2 steps + drafts 3 deep on two = 10 rows: below the economies of width a draft (worth a^j < 1
    # token) costs what a step does, so they all go
    assert shape_rows([1, 1, 4, 4], [0, 0, 3, 3], repacked_wide(), 0.97) == [1, 1, 1, 1]


def test_nothing_to_shape_without_optional_rows_or_a_table():
    assert shape_rows([3, 1, 2], [0, 0, 0], repacked(), 0.9) == [3, 1, 2]
    assert shape_rows([1, 2], [0, 1], lambda r: 0.0, 0.9) == [1, 2]  # no pass measured yet


@pytest.mark.parametrize("seed", range(40))
def test_against_the_brute_force_oracle(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 5)
    optional = [rng.randint(0, 3) for _ in range(n)]
    wants = [o + rng.choice((1, 1, 2)) for o in optional]
    a = rng.choice((0.3, 0.6, 0.9, 0.99))
    cost = rng.choice((repacked(), linear(), flat(), repacked(140.0, 190.0), repacked_wide()))
    keep = shape_rows(wants, optional, cost, a)
    rate, best = oracle(wants, optional, cost, a)
    value = sum(w - o for w, o in zip(wants, optional)) + sum(a ** j for o, w, k in zip(optional, wants, keep)
                                                               for j in range(1, o - (w - k) + 1))
    assert value / cost(sum(keep)) == pytest.approx(rate, rel=1e-9) and sum(keep) == sum(best)
    assert all(w - o <= k <= w for w, o, k in zip(wants, optional, keep))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        shape_rows([1, 2], [0], repacked(), 0.9)
    with pytest.raises(ValueError):
        shape_rows([2], [2], repacked(), 0.9)  # the step's own row is never optional
    with pytest.raises(ValueError):
        shape_rows([2], [1], repacked(), 1.5)
