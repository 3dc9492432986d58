"""The TLS flags of sqs-cloud and sqs-edge, a real sqs-cloud process with TLS and tokens (SIGHUP
revokes), and sqs-bench tls on the tiny pair."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import grpc
import pytest

from cloud import tls
from cloud.cli import parse_args
from edge.client import CloudError
from edge.options import add_runtime_args
from edge.runtime import client_config_from_args
from tests.test_tls_e2e import _generate


def test_cloud_flags(tmp_path, capsys):
    p = tls.gen_certs(tmp_path)
    c = parse_args(["--host", "0.0.0.0", "--tls-cert", str(p.server), "--tls-key", str(p.server_key),
                    "--tls-client-ca", str(p.ca), "--quota-sessions", "4", "--quota-rows", "500"])
    assert c.tls == tls.ServerTLS(p.server, p.server_key, p.ca)
    assert c.quotas.max_sessions == 4 and c.quotas.rows_per_s == 500 and c.quotas.rounds_per_s == 0
    assert parse_args(["--host", "127.0.0.1"]).tls is None  # plaintext on loopback needs no word
    assert parse_args(["--host", "0.0.0.0", "--insecure"]).tls is None
    bad = {
        "without TLS": ["--host", "0.0.0.0"],
        "go together": ["--host", "127.0.0.1", "--tls-cert", str(p.server)],
        "mutual TLS is TLS": ["--host", "127.0.0.1", "--tls-client-ca", str(p.ca)],
        "--token-file": ["--host", "127.0.0.1", "--token-file", str(tmp_path / "missing")],
        "quota": ["--host", "127.0.0.1", "--quota-rounds", "-1"],
    }
    for why, argv in bad.items():
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert why in capsys.readouterr().err, why


def test_edge_flags_reach_the_client_config(tmp_path, monkeypatch):
    import argparse

    p = tls.gen_certs(tmp_path)
    monkeypatch.setenv("SQS_TOKEN", "tok")  # read when the flags are declared
    ap = argparse.ArgumentParser()
    add_runtime_args(ap)
    a = ap.parse_args(["--cloud", "cloud.example:443", "--tls-ca", str(p.ca), "--tls-cert", str(p.client),
                       "--tls-key", str(p.client_key)])
    c = client_config_from_args(a)
    assert (c.tls_ca, c.tls_cert, c.tls_key, c.token, c.insecure) == (str(p.ca), str(p.client), str(p.client_key),
                                                                      "tok", False)
    with pytest.raises(ValueError, match="--insecure"):
        client_config_from_args(ap.parse_args(["--cloud", "cloud.example:443"]))
    assert client_config_from_args(ap.parse_args(["--cloud", "cloud.example:443", "--insecure"])).insecure


def test_sqs_cloud_process_with_tls_tokens_and_sighup(tmp_path, free_port, draft_engine):
    certs = tmp_path / "certs"
    assert subprocess.run([sys.executable, "-m", "cloud", "gen-certs", str(certs)], capture_output=True,
                          timeout=60).returncode == 0
    token_file = tmp_path / "tokens"
    made = subprocess.run([sys.executable, "-m", "cloud", "token", "edge-a", "--token-file", str(token_file)],
                          capture_output=True, text=True, timeout=60)
    token = made.stdout.strip()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud", "--model", "tiny", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server-key.pem"),
         "--token-file", str(token_file), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    address = f"127.0.0.1:{port}"
    check = [sys.executable, "-m", "cloud", "check", address, "--tls-ca", str(certs / "ca.pem")]
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(check, capture_output=True, timeout=30).returncode != 0:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "sqs-cloud with TLS not serving within 120 s"
            time.sleep(0.5)
        plain = subprocess.run([sys.executable, "-m", "cloud", "check", address, "--timeout", "1"],
                               capture_output=True, text=True, timeout=30)
        assert plain.returncode == 1  # a plaintext probe does not get through a TLS port
        engine = draft_engine
        link = {"tls_ca": str(certs / "ca.pem"), "token": token}
        assert len(_generate(engine, address, 0.0, tokens=8, **link).token_ids) == 8
        token_file.write_text("")  # revoke every token
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:
            try:
                _generate(engine, address, 0.0, tokens=8, **link)
            except CloudError as exc:
                assert exc.code == grpc.StatusCode.UNAUTHENTICATED
                break
            assert time.monotonic() < deadline, "SIGHUP did not revoke the token"
            time.sleep(0.2)
        assert proc.poll() is None  # SIGHUP reloads; it does not stop the cloud
    finally:
        proc.terminate()
        proc.wait(30)


def test_sqs_bench_tls_tiny():
    from bench.tls_bench import run

    rows = run("tiny", "tiny", prompts=1, max_new_tokens=8, temperatures=(1.0,), schemes=("topk",))
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"plaintext", "tls-token", "mtls"}
    assert all(r["same_tokens"] for r in rows)
    plain = by_mode["plaintext"]
    for mode in ("tls-token", "mtls"):
        r = by_mode[mode]
        assert r["tokens"] == plain["tokens"] and r["rounds"] == plain["rounds"]
        assert r["up_round_B_per_tok"] > plain["up_round_B_per_tok"]  # TLS records frame every message
        assert r["handshake_B"] > plain["handshake_B"] + 1000  # certificates in the handshake
