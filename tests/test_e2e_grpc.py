"""End to end over real gRPC on loopback (port 0) with the tiny fp32 pair."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from scipy import stats

from common.pb.v1 import sqs_pb2 as pb
from common.pb.v1 import sqs_pb2_grpc
from cloud.health import check, wait_serving
from cloud.inprocess import LocalCloud
from common.rejection import target_probs

PROMPT = "The quick brown fox"
SCHEMES = [
    ("topk", {"k": 4}),
    ("topk", {"k": 16, "drop_zeros": True}),
    ("conformal", {"beta0": 0.02}),
    ("dense", {}),
    ("token", {}),
    ("fp16-topk", {"k": 8}),
    ("fp32", {}),
]


def test_t0_every_scheme_prints_the_reference_tokens(cloud, run_generation):
    """At T = 0 (fp32) speculative output equals plain target decoding token for token."""
    ref = run_generation(cloud.address, PROMPT, scheme="none", max_new_tokens=24).token_ids
    assert len(ref) == 24
    for scheme, kw in SCHEMES:
        res = run_generation(cloud.address, PROMPT, scheme=scheme, max_new_tokens=24, **kw)
        assert res.token_ids == ref, scheme
        if scheme != "fp32":  # fp32 dense drafts never fit the 5000-bit budget
            assert res.stats.drafted > 0, scheme


def _exact_first_token_probs(temperature: float, tokenizer) -> np.ndarray:
    from cloud.server import load_target

    _, new_lm = load_target("tiny")
    ids = tokenizer.encode(PROMPT)
    logits = new_lm().logits(ids, want=1)[0]
    return target_probs(logits.astype(np.float64), temperature)


@pytest.mark.slow
@pytest.mark.parametrize("scheme,kw", [("topk", {"k": 2}), ("conformal", {"beta0": 0.05})])
def test_t1_first_tokens_follow_the_target_distribution(cloud, run_generation, draft_model, scheme, kw):
    """Through the whole stack the first generated token ~ p(. | prompt): chi-square p > 1e-3.

    max_new_tokens = 3 lets up to two drafts through, so the first token is an accepted draft, a
    resampled token or (rarely) ... every path of the verifier contributes.
    """
    temperature, n = 0.8, 600
    p = _exact_first_token_probs(temperature, draft_model.tokenizer)
    counts = np.zeros(p.size)
    drafted = 0
    for seed in range(n):
        res = run_generation(cloud.address, PROMPT, scheme=scheme, max_new_tokens=3, temperature=temperature,
                             seed=seed, **kw)
        counts[res.token_ids[0]] += 1
        drafted += res.stats.drafted
    assert drafted >= n  # the speculative path was exercised
    expected = p * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    pval = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
    assert pval > 1e-3, (pval, obs, exp)


def test_malformed_requests_get_invalid_argument_and_server_keeps_serving(cloud, run_generation, draft_model):
    ch = grpc.insecure_channel(cloud.address)
    raw_open = ch.unary_unary("/sqs.v1.Verifier/OpenSession", request_serializer=None, response_deserializer=None)
    raw_batch = ch.unary_unary("/sqs.v1.Verifier/VerifyBatch", request_serializer=None, response_deserializer=None)
    rng = np.random.default_rng(0)
    for _ in range(20):
        junk = rng.integers(0, 256, size=int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
        for call in (raw_open, raw_batch):
            with pytest.raises(grpc.RpcError) as e:
                call(junk, timeout=5)
            assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), e.value
    stub = sqs_pb2_grpc.VerifierStub(ch)
    m = draft_model
    good = pb.OpenSessionRequest(
        context_token_ids=[1, 2, 3], vocab_size=m.vocab_size, vocab_fingerprint=m.fingerprint, max_drafts=8,
        scheme=pb.SchemeParams(scheme=pb.SCHEME_TOPK, k=4, ell=100), sampling=pb.SamplingParams(temperature=1.0),
    )
    bad_opens = {
        "empty context": dict(context_token_ids=[]),
        "token outside vocab": dict(context_token_ids=[1, 10_000]),
        "huge context": dict(context_token_ids=list(range(100)) * 2000),
        "bad temperature": dict(sampling=pb.SamplingParams(temperature=-1)),
        "k > V": dict(scheme=pb.SchemeParams(scheme=pb.SCHEME_TOPK, k=10_000, ell=100)),
        "no scheme": dict(scheme=pb.SchemeParams()),
        "absurd max_drafts": dict(max_drafts=10**6),
    }
    for name, change in bad_opens.items():
        req = pb.OpenSessionRequest()
        req.CopyFrom(good)
        for field, value in change.items():
            req.ClearField(field)
            if isinstance(value, list):
                getattr(req, field).extend(value)
            elif hasattr(value, "CopyFrom"):
                getattr(req, field).CopyFrom(value)
            else:
                setattr(req, field, value)
        with pytest.raises(grpc.RpcError) as e:
            stub.OpenSession(req, timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert e.value.details(), name
    wrong_vocab = pb.OpenSessionRequest()
    wrong_vocab.CopyFrom(good)
    wrong_vocab.vocab_fingerprint = "0" * 64
    with pytest.raises(grpc.RpcError) as e:
        stub.OpenSession(wrong_vocab, timeout=5)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    sid = stub.OpenSession(good, timeout=5).session_id
    bad_batches = {
        "position mismatch": pb.DraftBatch(session_id=sid, position=99, num_drafts=0),
        "too many drafts": pb.DraftBatch(session_id=sid, position=3, num_drafts=9, packed=b"\x01" * 40),
        "truncated": pb.DraftBatch(session_id=sid, position=3, num_drafts=2, packed=b"\x07"),
        "raw on lattice": pb.DraftBatch(session_id=sid, position=3, num_drafts=0, raw=b"\x00" * 4),
    }
    for name, batch in bad_batches.items():
        with pytest.raises(grpc.RpcError) as e:
            stub.VerifyBatch(batch, timeout=5)
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), name
        sid = stub.OpenSession(good, timeout=5).session_id  # a refused batch closes its session
    with pytest.raises(grpc.RpcError) as e:
        stub.VerifyBatch(pb.DraftBatch(session_id="no-such-session", position=3), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    ok = stub.VerifyBatch(pb.DraftBatch(session_id=sid, position=3, num_drafts=0), timeout=5)
    assert ok.accepted == 0 and ok.position == 4
    ch.close()
    assert len(run_generation(cloud.address, PROMPT, max_new_tokens=8).token_ids) == 8


def test_health_and_reflection(cloud):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = grpc.insecure_channel(cloud.address)
    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="sqs.v1.Verifier"), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert "sqs.v1.Verifier" in names and "grpc.health.v1.Health" in names
    ch.close()


def test_cloud_restart_mid_generation_gives_identical_output(run_generation):
    """Kill the cloud after the first rounds; the edge re-opens with its context and finishes the same."""
    first = LocalCloud("tiny")
    port = first.port
    reference = run_generation(first.address, PROMPT, scheme="conformal", max_new_tokens=30, temperature=1.0, seed=7)
    holder = {"cloud": first}
    import edge.generate as gen_mod

    original = gen_mod._record
    calls = {"n": 0}

    def restart_after_two_rounds(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            holder["cloud"].stop()
            holder["cloud"] = LocalCloud("tiny", port=port)
        return original(*a, **kw)

    gen_mod._record = restart_after_two_rounds
    try:
        resumed = run_generation(first.address, PROMPT, scheme="conformal", max_new_tokens=30, temperature=1.0, seed=7)
    finally:
        gen_mod._record = original
        holder["cloud"].stop()
    assert resumed.stats.reopens == 1
    assert resumed.token_ids == reference.token_ids


def test_two_concurrent_sessions_match_their_solo_runs(cloud, run_generation):
    solo = [run_generation(cloud.address, PROMPT, scheme="topk", k=4, temperature=1.0, seed=s, max_new_tokens=20)
            .token_ids for s in (1, 2)]
    results: dict[int, list[int]] = {}

    def run(seed: int) -> None:
        results[seed] = run_generation(cloud.address, PROMPT, scheme="topk", k=4, temperature=1.0, seed=seed,
                                       max_new_tokens=20).token_ids

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[1], results[2]] == solo


def test_cli_generate_json(cloud):
    out = subprocess.run(
        [sys.executable, "-m", "edge", "generate", "--cloud", cloud.address, "--prompt", PROMPT,
         "--max-new-tokens", "12", "--sparsifier", "conformal", "--seed", "3", "--temperature", "0.5", "--json",
         "--draft-len", "4"],  # a fixed plan: the auto plan may rightly choose plain decoding on the tiny pair
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    for key in ("text", "token_ids", "rounds", "drafted", "accepted", "resampled", "uplink_payload_bytes",
                "uplink_wire_bytes", "formula_bits", "draft_ms", "uplink_ms", "verify_ms", "downlink_ms", "total_ms"):
        assert key in d, key
    assert len(d["token_ids"]) == 12
    # Wire bytes are measured on the connection and include framing: more than the payload.
    assert d["uplink_wire_bytes"] > d["uplink_payload_bytes"] > 0


@pytest.mark.slow  # the edge retries its connection before giving up
def test_cli_unreachable_cloud_is_one_line_error():
    out = subprocess.run(
        [sys.executable, "-m", "edge", "generate", "--cloud", "127.0.0.1:1", "--prompt", "x", "--max-new-tokens", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("sqs-edge: error:"), out.stderr


def test_cloud_metrics_match_the_edge_stats(cloud, run_generation):
    g = cloud.running.metrics.registry.get_sample_value
    lab = {"sparsifier": "conformal"}
    before = {n: g(n, lab) or 0.0 for n in ("sqs_batches_total", "sqs_draft_tokens_total", "sqs_accepted_tokens_total",
                                           "sqs_resampled_tokens_total", "sqs_uplink_payload_bytes_total",
                                           "sqs_uplink_formula_bits_total")}
    by_position = lambda: {(n, j): g(f"sqs_{n}_by_position_total", {**lab, "position": str(j)}) or 0.0  # noqa: E731
                           for n in ("drafted", "accepted") for j in range(1, 33)}
    before_positions = by_position()
    res = run_generation(cloud.address, PROMPT, scheme="conformal", max_new_tokens=20, temperature=1.0, seed=5)
    s = res.stats
    assert g("sqs_batches_total", lab) - before["sqs_batches_total"] == s.rounds
    assert g("sqs_draft_tokens_total", lab) - before["sqs_draft_tokens_total"] == s.drafted
    assert g("sqs_accepted_tokens_total", lab) - before["sqs_accepted_tokens_total"] == s.accepted
    assert g("sqs_resampled_tokens_total", lab) - before["sqs_resampled_tokens_total"] == s.resampled
    assert g("sqs_uplink_payload_bytes_total", lab) - before["sqs_uplink_payload_bytes_total"] == s.uplink_payload_bytes
    # Both sides price a batch with common.batch_format.batch_bits: the cloud's count is the edge's.
    cloud_bits = g("sqs_uplink_formula_bits_total", lab) - before["sqs_uplink_formula_bits_total"]
    assert cloud_bits == pytest.approx(s.formula_bits, rel=1e-9)
    # Acceptance by draft position: the cloud counts what the edge's records say, position by position.
    after = by_position()
    for j in range(1, 33):
        assert after["drafted", j] - before_positions["drafted", j] == sum(r.drafted >= j for r in s.records), j
        assert after["accepted", j] - before_positions["accepted", j] == sum(r.accepted >= j for r in s.records), j
    assert sum(after["accepted", j] - before_positions["accepted", j] for j in range(1, 33)) == s.accepted > 0


def test_sqs_cloud_process_serves_and_exports_metrics(free_port, run_generation):
    import urllib.request

    port, mport = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cloud", "--port", str(port), "--metrics-port", str(mport),
                             "--host", "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}", 60, process=proc)
        res = run_generation(f"127.0.0.1:{port}", PROMPT, max_new_tokens=6)
        assert len(res.token_ids) == 6
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        for name in ("sqs_batches_total", "sqs_draft_tokens_total", "sqs_accepted_tokens_total",
                     "sqs_resampled_tokens_total", "sqs_bonus_tokens_total", "sqs_uplink_payload_bytes_total",
                     "sqs_uplink_formula_bits_total", "sqs_batch_latency_seconds_bucket", "sqs_active_sessions"):
            assert name in body, name
        assert 'sparsifier="topk"' in body
        assert "session=" not in body and "session_id" not in body and "prompt" not in body  # bounded labels
        probe = subprocess.run([sys.executable, "-m", "cloud", "check", f"127.0.0.1:{port}"], capture_output=True,
                               text=True, timeout=60)
        assert probe.returncode == 0 and probe.stderr == "" and "SERVING" in probe.stdout, probe
    finally:
        proc.terminate()
        proc.wait(20)


def test_check_exit_status_and_one_line_reasons(cloud, free_port, capsys):
    """`sqs-cloud check HOST:PORT`: 0 when SERVING; 1 and one line on stderr when the port is dead, when
    nothing answers within --timeout, or when the verifier is not serving."""
    from cloud.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as e:
            main(["check", *argv])
        out, err = capsys.readouterr()
        return e.value.code, out, err

    assert run(cloud.address) == (0, f"{cloud.address}: sqs.v1.Verifier SERVING\n", "")
    dead = f"127.0.0.1:{free_port()}"
    code, out, err = run(dead)
    assert code == 1 and out == "" and err.startswith(f"sqs-cloud check: {dead} does not answer") and \
        err.count("\n") == 1, err
    with socket.socket() as mute:  # accepts connections (the kernel's backlog) but never speaks HTTP/2
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        address = f"127.0.0.1:{mute.getsockname()[1]}"
        assert run(address, "--timeout", "0.5") == (1, "", f"sqs-cloud check: {address} does not answer within 0.5 s\n")
    code, _, err = run("no-port-here")
    assert code == 2 and "HOST:PORT" in err
    assert check(cloud.address, service="no.such.Service").endswith("(not a sqs-cloud?)")


def test_check_reports_not_serving_during_shutdown():
    with LocalCloud("tiny") as c:
        asyncio.run_coroutine_threadsafe(c.running.health.enter_graceful_shutdown(), c.loop).result(10)
        assert check(c.address) == f"{c.address}: sqs.v1.Verifier is NOT_SERVING"


def test_serving_options_are_unchanged_by_the_check_word():
    from cloud.cli import parse_args

    cfg = parse_args(["--model", "tiny", "--port", "0", "--host", "127.0.0.1", "--max-sessions", "3"])
    assert (cfg.model, cfg.port, cfg.host, cfg.verifier.max_sessions) == ("tiny", 0, "127.0.0.1", 3)


def test_unary_transport_gives_the_same_tokens_with_more_framing(cloud, draft_model):
    """Same seeds over VerifyBatch (unary) and Verify (stream): identical output; the unary call
    pays HEADERS and trailers every round, so its measured uplink bytes per round are larger."""
    from edge.client import ClientConfig, CloudClient
    from edge.drafter import DraftConfig, Drafter
    from edge.generate import generate
    from common.schemes import SchemeConfig
    from sqs_models.cached_lm import CachedLM

    m = draft_model
    out = {}
    for transport in ("stream", "unary"):
        cfg = DraftConfig(scheme=SchemeConfig("topk", m.vocab_size, k=4), max_draft_len=4, temperature=1.0, seed=11)
        drafter = Drafter(CachedLM(m.model, m.vocab_size), cfg)
        with CloudClient(ClientConfig(cloud.address, transport=transport)) as client:
            out[transport] = generate(m.tokenizer.encode(PROMPT), drafter, client, max_new_tokens=24,
                                      vocab_fingerprint=m.fingerprint)
    s, u = out["stream"], out["unary"]
    assert s.token_ids == u.token_ids
    assert s.stats.uplink_payload_bytes == u.stats.uplink_payload_bytes
    assert u.stats.uplink_wire_bytes / u.stats.rounds > s.stats.uplink_wire_bytes / s.stats.rounds + 20
