"""Pass tables (sqs_models.pass_table) and the auto choice by predicted committed tokens per second
(sqs_models.engines.pick_by_tables): the prediction against a naive oracle, the choice on synthetic
tables of the two kinds of machine issue 20 names, the on-disk cache (measured once, reused after a
restart, re-measured when the key changes), and the cloud reporting a cached table on the tiny pair.
"""

from __future__ import annotations

import json

import pytest

from sqs_models.pass_table import GRID, cached_table, choose, expected_tokens, pass_grid, pass_ms, predict


def linear(step_ms: float, rows=GRID) -> dict[int, float]:
    """A compute-bound engine: r rows cost r steps (llama.cpp on an AVX-512 core, section 11)."""
    return {r: step_ms * r for r in rows}


def flat(step_ms: float, slope: float, rows=GRID) -> dict[int, float]:
    """A memory-bound engine: r rows cost a step plus ``slope`` of a step per extra row."""
    return {r: step_ms * (1 + slope * (r - 1)) for r in rows}


def test_expected_tokens_against_a_naive_sum():
    for a in (0.0, 0.3, 0.7, 0.95):
        for n in range(0, 12):
            naive = 1.0
            p = 1.0
            for _ in range(n):
                p *= a
                naive += p
            assert expected_tokens(n, a) == pytest.approx(naive)


def test_prediction_plain_is_one_step_and_speculation_is_the_best_draft_length():
    table = {1: 100.0, 2: 110.0, 3: 120.0, 5: 140.0, 9: 180.0, 17: 260.0}
    p = predict("x", table, acceptance=0.7, max_drafts=16)
    assert p.plain_tok_s == pytest.approx(10.0)
    # naive: try every L, interpolating linearly between measured rows
    import numpy as np

    xs, ys = list(table), list(table.values())
    rates = {n: 1e3 * expected_tokens(n, 0.7) / float(np.interp(n + 1, xs, ys)) for n in range(1, 17)}
    best = max(rates, key=rates.get)
    assert (p.drafts, p.spec_tok_s) == (best, pytest.approx(rates[best]))
    assert p.best_tok_s == max(p.plain_tok_s, p.spec_tok_s) and p.mode == f"speculative L={best}"


def test_compute_bound_engine_with_the_cheaper_step_wins_when_speculation_cannot_pay():
    """Issue 20's AMD EPYC: llama.cpp 50 ms a step, a row per step; torch bf16 330 ms, 9 rows 1.3x."""
    tables = {"torch bfloat16": flat(330.0, 0.3 / 8), "llama Q4_K_M": linear(50.0)}
    best, preds = choose(tables, acceptance=0.7)
    assert best == "llama Q4_K_M"
    by = {p.name: p for p in preds}
    assert by["llama Q4_K_M"].mode == "plain"  # r rows cost r steps: speculating never pays
    assert by["llama Q4_K_M"].spec_tok_s < by["llama Q4_K_M"].plain_tok_s == pytest.approx(20.0)
    assert by["torch bfloat16"].spec_tok_s > by["torch bfloat16"].plain_tok_s  # torch would speculate...
    assert by["torch bfloat16"].best_tok_s < 20.0  # ...and still lose


def test_nearly_free_multi_row_passes_and_a_cheaper_step_win_at_every_acceptance():
    """A GPU: torch's step is the cheaper one and its 17-row pass about one step."""
    tables = {"llama Q4_K_M": linear(150.0), "torch bfloat16": flat(100.0, 0.01)}
    best, preds = choose(tables)
    assert best == "torch bfloat16" and preds[0].mode.startswith("speculative")
    assert choose(tables, acceptance=0.9)[1][0].drafts >= 4


def test_the_worst_case_keeps_the_cheaper_step_where_flat_passes_win_only_at_high_acceptance():
    """An AMX core: torch's multi-row pass is nearly free but its step dearer than llama.cpp's. At
    acceptance 0.9 torch speculating long wins; at 0.5 (T = 1, prose) it loses to llama.cpp's plain
    steps, and auto keeps the engine whose worst case is best; with no acceptance at all, too."""
    tables = {"llama Q4_K_M": linear(150.0), "torch bfloat16": flat(200.0, 0.01)}
    high, by_high = choose(tables, acceptance=0.9)
    assert high == "torch bfloat16" and by_high[0].drafts >= 4
    best, preds = choose(tables)
    assert best == "llama Q4_K_M" and preds[0].mode == "plain" and preds[0].acceptance == 0.5
    assert choose(tables, acceptance=0.0)[0] == "llama Q4_K_M"


def test_the_edges_draft_cost_keeps_the_cheaper_step_over_a_cheap_two_row_pass():
    """This AMX Xeon's llama.cpp tables (ms, 1 thread): Q4_0 steps in 179 ms but its 2-row pass costs
    186; Q4_K_M steps in 149. With drafts free, Q4_0 speculating wins even at acceptance 0.5; priced
    at 0.4 of the fastest step (60 ms; the 0.5B draft measured 68), the cheaper step wins."""
    q4_0 = {1: 179.0, 2: 186.0, 3: 219.0, 5: 367.0, 9: 522.0, 17: 779.0}
    q4_k_m = {1: 149.0, 2: 223.0, 3: 278.0, 5: 347.0, 9: 526.0, 17: 713.0}
    tables = {"llama Q4_0": q4_0, "llama Q4_K_M": q4_k_m}
    assert choose(tables, draft_ratio=0.0)[0] == "llama Q4_0"
    best, preds = choose(tables)
    assert best == "llama Q4_K_M" and preds[0].mode == "plain"
    assert preds[0].best_tok_s == pytest.approx(1e3 / 149.0)
    d = 0.4 * 149.0
    assert preds[1].spec_tok_s == pytest.approx(max(1e3 * expected_tokens(n, 0.5) / (n * d + pass_ms(q4_0, n + 1))
                                                    for n in range(1, 17)))


def test_a_multi_row_pass_cheaper_than_the_step_is_used_as_measured():
    """On this AMX Xeon torch bf16's 17-row pass measured cheaper than its step (GEMV vs AMX tiles):
    the prediction takes the table as it is, where a never-falling fit would hide it."""
    from sqs_models.pass_table import pass_ms

    table = {1: 390.0, 2: 400.0, 9: 330.0, 17: 360.0, 33: 900.0}
    assert pass_ms(table, 9) == 330.0 and pass_ms(table, 13) == pytest.approx(345.0)
    assert pass_ms(table, 49) == pytest.approx(900.0 + 16 * 540.0 / 16)  # along the last segment
    assert pass_ms({1: 50.0}, 4) == 200.0
    p = predict("torch bfloat16", table, acceptance=0.7)
    rates = {n: 1e3 * expected_tokens(n, 0.7) / pass_ms(table, n + 1) for n in range(1, 17)}
    assert p.drafts == max(rates, key=rates.get) == 9  # 10 rows: 333.75 ms, cheaper than the 390 ms step
    assert p.spec_tok_s == pytest.approx(1e3 * expected_tokens(9, 0.7) / 333.75)


# This AMX Xeon's cached tables (ms by rows, one thread): llama Q4_K_M and torch bf16.
AMX_Q4_K_M = {1: 146.1, 2: 215.5, 3: 280.5, 5: 366.7, 9: 527.5, 17: 719.5, 33: 940.7, 64: 1221.0}
AMX_BF16 = {1: 341.7, 2: 329.4, 3: 329.1, 5: 338.7, 9: 339.7, 17: 366.1, 33: 474.9, 64: 600.9}


def test_a_busy_cloud_keeps_the_engine_whose_wide_passes_are_cheap():
    """One session: llama.cpp's cheaper step wins (torch's 342 ms step cannot be bought back by
    drafts at acceptance 0.5). Eight sessions sharing passes: torch's 64-row pass costs 1.8 of its
    step while llama.cpp's costs 8.4, and torch wins; the rates are the eight sessions' sum."""
    tables = {"llama Q4_K_M": AMX_Q4_K_M, "torch bfloat16": AMX_BF16}
    assert choose(tables)[0] == "llama Q4_K_M"
    best, preds = choose(tables, sessions=8)
    assert best == "torch bfloat16" and all(p.sessions == 8 for p in preds)
    by = {p.name: p for p in preds}
    assert by["llama Q4_K_M"].plain_tok_s == pytest.approx(8e3 / pass_ms(AMX_Q4_K_M, 8))
    d = 0.4 * 146.1
    assert by["torch bfloat16"].spec_tok_s == pytest.approx(max(
        8e3 * expected_tokens(n, 0.5) / (n * d + pass_ms(AMX_BF16, 8 * (n + 1))) for n in range(1, 17)))
    assert "8 sessions" in str(by["torch bfloat16"])
    # A compute-bound engine gains nothing from sharing: eight sessions together commit what one does.
    one = predict("llama", linear(50.0), 0.7)
    many = predict("llama", linear(50.0), 0.7, sessions=8)
    assert many.best_tok_s == pytest.approx(one.best_tok_s)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        predict("x", {})
    with pytest.raises(ValueError):
        predict("x", {1: 10.0}, acceptance=1.0)
    with pytest.raises(ValueError):
        choose({})
    with pytest.raises(ValueError):
        predict("x", {1: 10.0}, draft_ms=-1.0)
    with pytest.raises(ValueError):
        predict("x", {1: 10.0}, sessions=0)


def test_the_cloud_times_at_start_the_rows_the_auto_choice_measures():
    """cloud/config.py may not import sqs_models (test_cloud_sessions), so its calibrate_rows repeats
    GRID; the two must not drift apart (last changed together for the multiples of 4)."""
    from cloud.config import VerifierConfig

    assert VerifierConfig().calibrate_rows == GRID


def test_pass_grid_stops_at_the_batch_limit():
    assert pass_grid(64) == (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64)
    assert pass_grid(20) == (1, 2, 3, 4, 5, 8, 9, 16, 17, 20)
    assert pass_grid(9) == (1, 2, 3, 4, 5, 8, 9)
    assert pass_grid(1) == (1,)


def test_cache_measures_only_missing_rows_and_reuses_them(tmp_path):
    cache = tmp_path / "tables.json"
    calls = []

    def measure(rows):
        calls.append(list(rows))
        return {r: 10.0 * r for r in rows}

    t, cached = cached_table("k1", (1, 2, 3), measure, cache)
    assert (t, cached, calls) == ({1: 10.0, 2: 20.0, 3: 30.0}, False, [[1, 2, 3]])
    t, cached = cached_table("k1", (1, 3), measure, cache)  # a restart: nothing measured
    assert (t, cached, len(calls)) == ({1: 10.0, 3: 30.0}, True, 1)
    t, cached = cached_table("k1", (1, 2, 3, 5), measure, cache)  # a bigger grid: only the new row
    assert (cached, calls[-1], t[5]) == (False, [5], 50.0)
    cached_table("k2", (1,), measure, cache)  # another key (other threads, CPU, version): measured
    assert calls[-1] == [1]
    assert set(json.loads(cache.read_text())) == {"k1", "k2"}


def test_auto_picks_by_tables_measures_once_and_leaves_out_a_failing_engine(tmp_path):
    pytest.importorskip("torch")
    from sqs_models.engines import Candidate, pick_by_tables

    cache = tmp_path / "tables.json"
    measured = []

    def fake(name, table):
        def measure(rows):
            measured.append(name)
            return {r: table[r] for r in rows}

        return Candidate(name, f"key-{name}", measure, lambda: name)

    def broken(rows):
        raise RuntimeError("llama_decode returned -1")

    cands = [fake("llama Q4_K_M", linear(150.0)), fake("torch bfloat16", flat(100.0, 0.01)),
             Candidate("llama Q8_0", "key-q8", broken, lambda: None)]
    best, tables, preds = pick_by_tables(cands, GRID, cache)
    assert best.name == "torch bfloat16" and set(tables) == {"llama Q4_K_M", "torch bfloat16"}
    assert [p.name for p in preds] == ["torch bfloat16", "llama Q4_K_M"]
    assert sorted(measured) == ["llama Q4_K_M", "torch bfloat16"]
    best2, _, _ = pick_by_tables(cands[:2], GRID, cache)  # a restart: the cache answers
    assert best2.name == best.name and len(measured) == 2


def _scripted(name: str, timings: list[dict[int, float]], order: list[str]):
    """A candidate whose successive timings are ``timings`` (a noisy host), logging each call."""
    from sqs_models.engines import Candidate

    def measure(rows):
        order.append(name)
        t = timings[min(order.count(name) - 1, len(timings) - 1)]
        return {r: t[r] for r in rows}

    return Candidate(name, f"key-{name}", measure, lambda: name)


def test_a_near_tie_measured_on_a_noisy_host_is_timed_again_interleaved_and_reversed(tmp_path):
    """RESULTS 0h: a start while the host was busy timed Q4_K_M's step at 181 ms (161 quiet) and
    Q4_0's at 154 (195 quiet) and kept Q4_0. The leaders within TIE_MARGIN are timed again, A B A B,
    each row keeps the median of its timings, and the quiet tables decide; the cache keeps them."""
    pytest.importorskip("torch")
    from sqs_models.engines import pick_by_tables
    from sqs_models.pass_table import TIE_RETIMES

    cache = tmp_path / "tables.json"
    order: list[str] = []
    k_noisy, k_quiet = linear(181.0), linear(161.0)
    q_lucky, q_quiet = linear(154.0), linear(195.0)
    cands = [_scripted("llama Q4_K_M", [k_noisy, k_quiet], order),
             _scripted("llama Q4_0", [q_lucky, q_quiet], order),
             _scripted("torch bfloat16", [linear(900.0)], order)]  # far behind: never timed again
    best, tables, preds = pick_by_tables(cands, GRID, cache)
    assert best.name == "llama Q4_K_M" and preds[0].name == "llama Q4_K_M"
    assert order == ["llama Q4_K_M", "llama Q4_0", "torch bfloat16"] + ["llama Q4_0", "llama Q4_K_M"] * TIE_RETIMES
    assert tables["llama Q4_K_M"] == k_quiet and tables["llama Q4_0"] == q_quiet  # the median per row
    stored = json.loads(cache.read_text())
    assert stored["key-llama Q4_K_M"] == {str(r): ms for r, ms in k_quiet.items()}
    order.clear()
    best2, _, _ = pick_by_tables(cands, GRID, cache)  # a restart: cached, no tie-break timings
    assert best2.name == "llama Q4_K_M" and order == []


def test_no_second_timing_when_the_leaders_are_apart_or_both_were_cached(tmp_path):
    pytest.importorskip("torch")
    from sqs_models.engines import pick_by_tables
    from sqs_models.pass_table import store_table

    order: list[str] = []
    apart = [_scripted("a", [linear(100.0)], order), _scripted("b", [linear(150.0)], order)]
    best, _, _ = pick_by_tables(apart, GRID, tmp_path / "apart.json")
    assert best.name == "a" and order == ["a", "b"]
    order.clear()
    cache = tmp_path / "tied.json"
    store_table("key-a", linear(100.0), cache)
    store_table("key-b", linear(103.0), cache)
    tied = [_scripted("a", [linear(100.0)], order), _scripted("b", [linear(50.0)], order)]
    best, _, _ = pick_by_tables(tied, GRID, cache)
    assert best.name == "a" and order == []  # both from the cache: already settled on an earlier start


def test_a_tiny_engine_table_is_measured_once_then_read(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from sqs_models import engines

    cache = tmp_path / "tables.json"
    eng = engines.load_engine("tiny", "target", engine="torch")
    assert eng.table_key.startswith("tiny|torch|float32|-|threads=") and "|cpu:" in eng.table_key
    t1, cached = engines.engine_pass_table(eng, (1, 2, 5), cache)
    assert not cached and set(t1) == {1, 2, 5} and all(ms > 0 for ms in t1.values())
    monkeypatch.setattr(engines, "time_passes", lambda *a, **k: pytest.fail("measured again"))
    again = engines.load_engine("tiny", "target", engine="torch")
    t2, cached = engines.engine_pass_table(again, (1, 5), cache)
    assert cached and t2 == {1: t1[1], 5: t1[5]} and again.pass_table == t2


def test_the_cloud_reports_the_cached_table_at_start(tmp_path, caplog):
    pytest.importorskip("torch")
    from cloud.config import VerifierConfig
    from cloud.inprocess import LocalCloud
    from cloud.server import calibration_rows

    assert calibration_rows(VerifierConfig(batch_max_rows=12)) == (1, 2, 3, 4, 5, 8, 9, 12)
    cache = tmp_path / "tables.json"
    vc = VerifierConfig(calibrate_rows=(1, 3, 9), batch_window_ms=0, batch_max_rows=4)
    caplog.set_level("INFO", logger="sqs.cloud")
    with LocalCloud("tiny", verifier=vc, pass_table_cache=cache) as c:
        first = c.running.verifier.pass_table()
    assert set(first) == {1, 3, 4}  # clipped to batch_max_rows, which is measured too
    with LocalCloud("tiny", verifier=vc, pass_table_cache=cache) as c:
        second = c.running.verifier.pass_table()
    assert second == first
    said = [r.message for r in caplog.records if "forward pass ms by rows" in r.message]
    assert "(measured;" in said[0] and "(cached;" in said[1]


def test_benchmarks_read_the_auto_choice_from_the_cloud_log(tmp_path):
    from bench.cloudproc import cloud_engine
    from sqs_models.pass_table import describe_choice

    _, preds = choose({"llama Q4_K_M": linear(150.0), "torch bfloat16": flat(100.0, 0.02)})
    detail = "llama.cpp 0.3.36 qwen2 1.5B Q4_K - Medium (model.gguf), 1 threads, no repack; " + describe_choice(preds, draft_ms=40.0)
    log = tmp_path / "cloud.log"
    log.write_text("2026-12-04 14:22:51,709 INFO sqs.models qwen2.5-coder-1.5b (target): engine llama, "
                   f"{detail}, loaded in 556.5 s\n")
    got = cloud_engine(log)
    assert got == f"llama, {detail}"
    assert "kept torch bfloat16" in got and "speculative L=" in got and "llama Q4_K_M: " in got
    assert "over acceptance 0.5..0.9" in got and "drafts at 40 ms" in got


def test_tables_and_probes_are_keyed_by_the_llama_build_not_its_version_alone(tmp_path, monkeypatch):
    """One llama-cpp-python version built with AMX and without runs other kernels (and crashes or
    not): a rebuilt libggml-cpu must measure and probe anew."""
    import importlib.util
    from types import SimpleNamespace

    from sqs_models import pass_table

    lib = tmp_path / "llama_cpp" / "lib"
    lib.mkdir(parents=True)
    monkeypatch.setattr(pass_table, "package_version", lambda p: "0.3.36" if p == "llama-cpp-python" else "x")
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: SimpleNamespace(
        submodule_search_locations=[str(lib.parent)]) if name == "llama_cpp" else real_find(name, *a))
    assert pass_table.llama_build() == "0.3.36"  # no library found: the version alone
    (lib / "libggml-cpu.so").write_bytes(b"kernels built with AMX")
    with_amx, key_amx = pass_table.llama_build(), pass_table.machine_key()
    (lib / "libggml-cpu.so").write_bytes(b"kernels built without AMX")
    without = pass_table.llama_build()
    assert with_amx.startswith("0.3.36+") and without.startswith("0.3.36+") and with_amx != without
    assert key_amx != pass_table.machine_key() and f"llama-cpp-python={without}" in pass_table.machine_key()
