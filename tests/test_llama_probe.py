"""The llama.cpp extra-buffer-type probe (sqs_models.llama_probe): a child that crashes or fails turns
them off, the decision is kept per key and reused, the override skips the probe, and llama-server
gets --no-repack where the probe says so. Fake children only: no llama.cpp, no model needed.
"""

from __future__ import annotations

import json
import sys

import pytest

from sqs_models import llama_probe
from sqs_models.llama_probe import describe_exit, extra_bufts_ok, run_probe

CRASH = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
FAIL = [sys.executable, "-c", "import sys; sys.exit('llama_decode returned -1')"]
OK = [sys.executable, "-c", "print('decoded 4 passes')"]
HANG = [sys.executable, "-c", "import time; time.sleep(30)"]


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    monkeypatch.delenv(llama_probe.ENV, raising=False)
    monkeypatch.setattr(llama_probe, "probe_key", lambda path: f"{path}|cpu:test|llama-cpp-python:test")
    p = tmp_path / "model.gguf"
    p.write_bytes(b"GGUF")
    return p


def test_exit_descriptions():
    assert describe_exit(-11) == "killed by SIGSEGV"
    assert describe_exit(-4) == "killed by SIGILL"
    assert describe_exit(3) == "exit 3"
    assert describe_exit(None) == "timed out"


@pytest.mark.parametrize("child,ok,why", [(CRASH, False, "killed by SIGSEGV"), (FAIL, False, "exit 1: llama_decode"),
                                          (OK, True, "decoded 4 passes")])
def test_a_child_that_crashes_or_fails_means_no_extra_buffer_types(gguf, child, ok, why):
    got, said = run_probe(gguf, child)
    assert got is ok and why in said


def test_a_child_that_hangs_is_a_failure(gguf):
    got, said = run_probe(gguf, HANG, timeout_s=1.0)
    assert not got and "timed out" in said


def test_the_decision_is_cached_per_key_and_reused_without_a_child(gguf, tmp_path, caplog):
    cache = tmp_path / "probe.json"
    caplog.set_level("INFO", logger="sqs.models")
    assert extra_bufts_ok(gguf, cache=cache, command=CRASH)[0] is False
    assert [r.message for r in caplog.records if "extra buffer types" in r.message][0].count("OFF") == 1
    stored = json.loads(cache.read_text())
    assert list(stored.values()) == [{"extra_bufts": False, "why": "probe killed by SIGSEGV"}]
    # a child that would now succeed is never run: the cached decision stands
    ok, why = extra_bufts_ok(gguf, cache=cache, command=OK)
    assert ok is False and "probed before" in why
    # another file (another key) is probed on its own
    other = gguf.with_name("model.Q8_0.gguf")
    other.write_bytes(b"GGUF")
    assert extra_bufts_ok(other, cache=cache, command=OK)[0] is True
    assert len(json.loads(cache.read_text())) == 2


def test_the_environment_overrides_without_probing(gguf, tmp_path, monkeypatch):
    cache = tmp_path / "probe.json"
    monkeypatch.setenv(llama_probe.ENV, "1")
    assert extra_bufts_ok(gguf, cache=cache, command=CRASH) == (True, f"{llama_probe.ENV}=1")
    monkeypatch.setenv(llama_probe.ENV, "0")
    assert extra_bufts_ok(gguf, cache=cache, command=OK)[0] is False
    assert not cache.exists()


def test_the_key_names_the_file_cpu_and_library(tmp_path, monkeypatch):
    pytest.importorskip("numpy")
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF")
    key = llama_probe.probe_key(p)
    assert str(p.resolve()) in key and "|cpu:" in key and "llama-cpp-python:" in key
    from sqs_models.pass_table import llama_build

    assert key.endswith(f"llama-cpp-python:{llama_build()}")  # the build (AMX on/off), not the version alone
    p.write_bytes(b"GGUF2")  # another file at the same path is another key
    assert llama_probe.probe_key(p) != key


def test_llama_server_gets_no_repack_where_the_probe_says_it_crashes(gguf, monkeypatch):
    from bench import llama_server
    from bench.llama_server import ServerConfig, repack_args

    monkeypatch.setattr(llama_server, "extra_bufts_ok", lambda path: (False, "probe killed by SIGSEGV"))
    args, note = repack_args(ServerConfig("llama-server", str(gguf)))
    assert args == ("--no-repack",) and "crashes" in note and "SIGSEGV" in note
    monkeypatch.setattr(llama_server, "extra_bufts_ok", lambda path: (True, "decoded"))
    assert repack_args(ServerConfig("llama-server", str(gguf))) == ((), "")
    # told explicitly: no probe
    monkeypatch.setattr(llama_server, "extra_bufts_ok", lambda path: pytest.fail("probed"))
    assert repack_args(ServerConfig("llama-server", str(gguf), no_repack=False)) == ((), "")
    assert repack_args(ServerConfig("llama-server", str(gguf), no_repack=True))[0] == ("--no-repack",)


@pytest.mark.slow
def test_the_real_child_on_the_tiny_gguf(tmp_path, monkeypatch):
    """The child itself (llama_lm.probe_decode in a python -c) decodes the tiny F32 GGUF and exits 0."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    pytest.importorskip("gguf")
    from bench.tiny_gguf import write_tiny_gguf

    monkeypatch.delenv(llama_probe.ENV, raising=False)
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    ok, why = extra_bufts_ok(path, cache=tmp_path / "probe.json")
    assert ok and "decoded" in why
