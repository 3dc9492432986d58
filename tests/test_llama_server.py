"""llama.cpp's llama-server (bench/llama_server.py, bench/llama_compare.py, loadtest/llama_levels.py) on the tiny pair.

The tiny pair is written as GGUF files (bench/tiny_gguf.py), so no real model is needed: llama.cpp's
greedy tokens must equal the torch tiny target's (the same function up to float rounding), and its
own speculative decoding with the tiny draft must keep them at T = 0 and report its draft counts.

llama-server is an integration tool: `make llama-server` (or `make test`) builds it; without it these
tests skip, or fail under SQS_REQUIRE_INTEGRATION=1.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import time

import pytest

from bench.llama_server import (
    LlamaServer,
    LlamaServerError,
    ServerConfig,
    complete,
    parse_cpus,
    resolve_binary,
)
from bench.llama_compare import (
    PAIRS,
    BenchConfig,
    Row,
    Sample,
    main,
    paired_ratio,
    ratio_records,
    register,
    tokens_per_s_ci,
)

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def binary(llama_server_binary: str) -> str:
    return llama_server_binary


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory) -> tuple[str, str]:
    from bench.tiny_gguf import write_tiny_gguf

    d = tmp_path_factory.mktemp("gguf")
    return str(write_tiny_gguf(d / "target.gguf", "target")), str(write_tiny_gguf(d / "draft.gguf", "draft"))


def _greedy_torch(prompt: str, n: int) -> list[int]:
    import torch

    from sqs_models.tiny import build_tiny

    model = build_tiny("target")
    ids = [ord(c) for c in prompt]
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_every_flag_we_pass_is_one_this_llama_server_knows(binary):
    import subprocess

    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60).stdout
    cmd = ServerConfig(binary, "m.gguf", draft_model="d.gguf").command(8080)
    flags = [a for a in cmd[1:] if a.startswith("--")]
    assert len(flags) > 10
    missing = [f for f in flags if f not in help_text]
    assert not missing, f"llama-server --help does not list {missing}"


def test_tiny_greedy_completion_matches_torch_and_reports_timings(binary, tiny_ggufs):
    with LlamaServer(ServerConfig(binary, tiny_ggufs[0], threads=1, slot_ctx=128)) as srv:
        c = complete(srv.address, PROMPT, n_predict=12, temperature=0.0, seed=0, ignore_eos=True, timeout_s=60)
        again = complete(srv.address, PROMPT, n_predict=12, temperature=1.0, seed=3, ignore_eos=True, timeout_s=60)
    assert srv.proc.poll() is not None  # stopped
    assert c.predicted_n == 12 and c.tokens == _greedy_torch(PROMPT, 12)
    assert c.prompt_n == len(PROMPT)
    assert c.predicted_per_second > 0 and c.predicted_ms > 0 and c.wall_ms > 0
    assert c.draft_n == c.draft_n_accepted == 0
    assert again.predicted_n == 12 and all(0 <= t < 128 for t in again.tokens)


def test_its_speculative_decoding_reports_draft_counts_and_keeps_greedy_tokens(binary, tiny_ggufs):
    target, draft = tiny_ggufs
    with LlamaServer(ServerConfig(binary, target, draft_model=draft, draft_n_max=4, threads=1, slot_ctx=128)) as srv:
        c = complete(srv.address, PROMPT, n_predict=16, temperature=0.0, seed=0, ignore_eos=True, timeout_s=60)
    assert c.predicted_n == 16 and c.tokens == _greedy_torch(PROMPT, 16)
    assert c.draft_n > 0 and 0 <= c.draft_n_accepted <= c.draft_n


def test_pinned_to_the_cpus_asked(binary, tiny_ggufs):
    cpu = max(os.sched_getaffinity(0))
    with LlamaServer(ServerConfig(binary, tiny_ggufs[0], threads=1, cpus=(cpu,), slot_ctx=128)) as srv:
        assert os.sched_getaffinity(srv.proc.pid) == {cpu}


@pytest.mark.timeout(30)
def test_bad_binary_and_model_paths_fail_in_one_line(binary, tiny_ggufs, tmp_path):
    with pytest.raises(LlamaServerError, match="does not exist or is not executable"):
        LlamaServer(ServerConfig(str(tmp_path / "no-such-llama-server"), tiny_ggufs[0])).start()
    with pytest.raises(LlamaServerError, match="model .* does not exist"):
        LlamaServer(ServerConfig(binary, str(tmp_path / "missing.gguf"))).start()
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file" * 100)
    t0 = time.monotonic()
    with pytest.raises(LlamaServerError) as exc:
        LlamaServer(ServerConfig(binary, str(bad), start_timeout_s=20)).start()
    assert "exited with status" in str(exc.value) and "\n" not in str(exc.value)
    assert time.monotonic() - t0 < 20


def test_a_dead_server_is_a_connection_error_not_a_hang(free_port):
    with pytest.raises(LlamaServerError) as exc:
        complete(f"127.0.0.1:{free_port()}", PROMPT, n_predict=4, temperature=0.0, seed=0, timeout_s=5)
    assert exc.value.status == "CONNECTION"


def test_resolve_binary_and_cpu_lists(tmp_path):
    with pytest.raises(LlamaServerError):
        resolve_binary(str(tmp_path))  # a directory is no binary
    assert parse_cpus("1") == (1,) and parse_cpus("0,2") == (0, 2) and parse_cpus("2-3,0") == (0, 2, 3)
    with pytest.raises(ValueError):
        parse_cpus("x")


def test_loadtest_llama_server_levels_next_to_ours(binary, tmp_path):
    from loadtest.runner import LoadTestConfig, run_load_test

    cfg = LoadTestConfig(clients=(1, 2), requests=4, duration_s=60, warmup=1, max_new_tokens=8, draft_len=4,
                         progress=False, llama_server=True, llama_server_binary=binary, llama_server_threads=1)
    report = run_load_test(cfg)
    assert [lv.clients for lv in report.levels] == [1, 2] == [lv.clients for lv in report.llama_levels]
    assert "error" not in report.llama_server and report.llama_server["threads"] == 1
    for lv in report.llama_levels:
        s = lv.summary()
        assert s["ok"] == s["requests"] == 4 and s["errors"] == 0 and s["stopped_by"] == "requests"
        assert s["tokens"] == 4 * 8 and s["tokens_per_s"] > 0 and s["warmup_requests"] == lv.clients
        assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p95"]
    table = report.table()
    assert "llama-server --parallel N" in table and len(table.splitlines()) == 3 + 1 + 3
    report.write_json(tmp_path / "r.json")
    report.write_csv(tmp_path / "r.csv")
    data = json.loads((tmp_path / "r.json").read_text())
    assert [lv["clients"] for lv in data["llama_server"]["levels"]] == [1, 2]
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert sorted({r["system"] for r in rows}) == ["llama-server", "sqs-sd"] and len(rows) == 16


def test_loadtest_cli_refuses_a_missing_binary_before_loading(tmp_path, capsys):
    from loadtest.cli import run as cli_run

    rc = cli_run(["--llama-server", "--llama-server-binary", str(tmp_path / "nope"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not executable" in err


def test_bench_refuses_a_missing_llama_server_model_in_one_line(tmp_path, capsys):
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["llama-server", "--llama-server-model", str(tmp_path / "no.gguf"), "--no-progress"])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--llama-server-model" in err and "no such file" in err


@pytest.mark.slow
def test_bench_quick_all_four_rows(binary, tmp_path, capsys):
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="cmd"))
    cpu = str(max(os.sched_getaffinity(0)))
    args = ap.parse_args(["llama-server", "--quick", "--llama-server", binary, "--server-cpus", cpu,
                          "--edge-cpus", cpu, "--temperatures", "0", "--prose-prompts", "1", "--out", str(tmp_path),
                          "--no-progress"])
    before = os.sched_getaffinity(0)
    assert main(args) == 0
    assert os.sched_getaffinity(0) == before  # the edge's pinning is undone
    out = capsys.readouterr().out
    assert "sqs-cloud / llama-ar p50 latency" in out and "2 code + 1 prose prompt(s)" in out
    assert len(re.findall(r"tokens/s x[\d.]+ \[[\d.]+, [\d.]+\] \(code x[\d.]+ \[[\d.]+, [\d.]+\], prose x", out)) == 4
    rows = list(csv.DictReader((tmp_path / "llama_server.csv").open()))
    assert [r["row"] for r in rows] == ["llama-ar", "llama-sd", "sqs-cloud", "sqs-sd"]
    assert all(int(r["generated"]) == 3 * 8 and float(r["tokens_per_s"]) > 0 for r in rows)
    by = {r["row"]: r for r in rows}
    assert int(by["llama-sd"]["drafted"]) > 0  # ours plans per round: on one shared CPU it may not draft
    assert by["llama-ar"]["drafted"] == by["sqs-cloud"]["drafted"] == "0"
    assert by["llama-ar"]["lookahead_drafted"] == by["sqs-cloud"]["lookahead_drafted"] == "0"
    samples = list(csv.DictReader((tmp_path / "llama_server_samples.csv").open()))
    for r in rows:  # the drafts that rode streamed rounds, per request and totalled per row
        mine = [s for s in samples if s["row"] == r["row"]]
        for col in ("lookahead_drafted", "lookahead_accepted"):
            assert sum(int(s[col]) for s in mine) == int(r[col])
    assert all(r["cpu_flags"] and r["server_cpus"] == cpu for r in rows)
    for r in rows:  # what ran, on every row
        assert re.fullmatch(r"[0-9a-f]{4,}(-dirty)?", r["commit"]) and float(r["loadavg_1m"]) >= 0
        assert r["llama_server_version"] == rows[0]["llama_server_version"] and r["engine"]
        assert (r["prompts_code"], r["prompts_prose"]) == ("2", "1")
        assert float(r["tokens_per_s_lo"]) <= float(r["tokens_per_s"]) <= float(r["tokens_per_s_hi"])
        assert float(r["tokens_per_s_code"]) > 0 and float(r["tokens_per_s_prose"]) > 0

    # Every measured request, paired by prompt across rows: the row's tokens/s recomputes from them.
    samples = list(csv.DictReader((tmp_path / "llama_server_samples.csv").open()))
    assert len(samples) == 4 * 3
    for r in rows:
        mine = [s for s in samples if s["row"] == r["row"]]
        assert [(s["kind"], s["prompt"], s["seed"]) for s in mine] == [("code", "0", "0"), ("code", "1", "1"),
                                                                        ("prose", "0", "2")]
        assert all(int(s["generated"]) == 8 and s["commit"] == r["commit"] for s in mine)
        tps = sum(int(s["generated"]) for s in mine) / sum(float(s["wall_ms"]) / 1e3 for s in mine)
        assert tps == pytest.approx(float(r["tokens_per_s"]), rel=1e-4)

    ratios = list(csv.DictReader((tmp_path / "llama_server_ratios.csv").open()))
    assert [(x["row_a"], x["row_b"], x["kind"]) for x in ratios] == [
        (a, b, k) for a, b in PAIRS for k in ("all", "code", "prose")]
    for x in ratios:
        ratio, lo, hi = float(x["ratio"]), float(x["lo"]), float(x["hi"])
        if x["kind"] == "all":
            assert ratio == pytest.approx(float(by[x["row_a"]]["tokens_per_s"]) / float(by[x["row_b"]]["tokens_per_s"]))
        if x["kind"] == "prose":  # one prompt: nothing to resample
            assert x["prompts"] == "1" and ratio > 0 and math.isnan(lo) and math.isnan(hi)
        else:
            assert 0 < lo <= ratio <= hi


# --- the bootstrap of `sqs-bench llama-server`, on fixed numbers --------------------------------------


def _samples(ms: list[float], kinds: list[str], tokens: int = 64) -> list[Sample]:
    seen = {"code": 0, "prose": 0}
    out = []
    for wall, kind in zip(ms, kinds):
        out.append(Sample(wall, tokens, kind=kind, index=seen[kind]))
        seen[kind] += 1
    return out


# per-prompt times that vary 10x: an unpaired bootstrap of a ratio would be wide
MS = [200.0, 2000.0, 500.0, 900.0, 1500.0, 300.0, 700.0, 1100.0]
KINDS8 = ["code"] * 4 + ["prose"] * 4


def test_paired_ratio_of_identical_rows_is_one_and_of_a_row_twice_as_fast_is_two():
    a = _samples(MS, KINDS8)
    assert paired_ratio(a, a) == (1.0, 1.0, 1.0)
    ratio, lo, hi = paired_ratio(_samples([m / 2 for m in MS], KINDS8), a)
    assert ratio == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    # each row's own interval over these prompts is wide; pairing is what makes the ratio's tight
    row_lo, row_hi = tokens_per_s_ci(a)
    assert row_hi / row_lo > 1.5
    with pytest.raises(ValueError, match="same prompts"):
        paired_ratio(a, a[::-1])


def test_ratios_split_by_kind_beside_the_headline():
    # code prompts run 2x faster in row a, prose prompts at the same speed: the split shows it
    base = _samples(MS, KINDS8)
    fast = _samples([m / 2 if k == "code" else m for m, k in zip(MS, KINDS8)], KINDS8)
    rows = [Row("llama-ar", 0.0, base).summary(), Row("sqs-sd", 0.0, fast).summary()]
    recs = {x["kind"]: x for x in ratio_records(rows)}
    assert list(recs) == ["all", "code", "prose"]
    assert all((x["row_a"], x["row_b"], x["prompts"]) == ("sqs-sd", "llama-ar", 8 if k == "all" else 4)
               for k, x in recs.items())
    assert (recs["code"]["ratio"], recs["code"]["lo"], recs["code"]["hi"]) == pytest.approx((2.0, 2.0, 2.0))
    assert (recs["prose"]["ratio"], recs["prose"]["lo"], recs["prose"]["hi"]) == (1.0, 1.0, 1.0)
    headline = recs["all"]
    assert 1.0 <= headline["lo"] < headline["ratio"] < headline["hi"] <= 2.0
    assert headline["ratio"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    assert ratio_records(rows) == ratio_records(rows)  # fixed seed: the same intervals every time

    # code only (the default): the headline alone, no split
    code = [Row(r, 0.0, _samples(MS[:4], KINDS8[:4])).summary() for r in ("llama-ar", "sqs-cloud")]
    assert [x["kind"] for x in ratio_records(code)] == ["all"]


def test_every_row_runs_the_prompts_in_one_order_with_one_seed_each():
    cfg = BenchConfig("llama-server", "t", "d", "t.gguf", "d.gguf", ["c0", "c1", "p0"], [0.0], 8, (0,), (0,), 1,
                      seed=5, kinds=["code", "code", "prose"])
    assert [(p.kind, p.index, p.seed, p.text) for p in cfg.plan()] == [
        ("code", 0, 5, "c0"), ("code", 1, 6, "c1"), ("prose", 0, 7, "p0")]
    assert cfg.plan() == cfg.plan()
    cfg.kinds = []
    assert [p.kind for p in cfg.plan()] == ["code"] * 3
    r = Row("llama-ar", 0.0, _samples([100.0], ["code"])).summary()
    assert math.isnan(r["tokens_per_s_lo"]) and r["tokens_per_s"] == pytest.approx(640.0)
