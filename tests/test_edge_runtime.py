"""The edge runtime (edge/runtime.py): the one way every program runs a generation.

Round by round it yields what the whole generation returns; a consumer that stops reading ends the
generation and its cloud session; `sqs-edge serve --engine llama` drafts with llama.cpp (the tiny
draft written as a GGUF into a local model directory), and its greedy tokens equal the torch
draft's (at T = 0 the output is the target's argmax whatever the draft).
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from common.metrics import Metrics
from edge.api import EdgeServerConfig, create_app
from edge.client import ClientConfig
from edge.generate import run_to_end
from edge.runtime import DraftSpec, EdgeRuntime
from tests.survive_tools import wait_until

PROMPT = "The quick brown fox"


@pytest.fixture()
def runtime(cloud, draft_engine):
    return EdgeRuntime(draft_engine, ClientConfig(cloud.address), metrics=Metrics())


def test_rounds_add_up_to_the_result_and_are_observed(runtime):
    config = runtime.draft_config({"temperature": 1.0, "seed": 3, "draft_len": 4, "k": 4, "ell": 100})
    g = runtime.start(runtime.encode(PROMPT), config, max_new_tokens=20)
    rounds = list(g)
    assert [t for r in rounds for t in r.tokens] == g.result.token_ids and len(g.result.token_ids) == 20
    assert [r.record for r in rounds] == g.result.stats.records
    sample = runtime.metrics.registry.get_sample_value
    assert sample("sqs_batches_total", {"sparsifier": "topk"}) == len(rounds)
    assert sample("sqs_active_sessions") == 0
    # the same seed and fixed plan through generate(): the same tokens
    assert runtime.generate(runtime.encode(PROMPT), config, max_new_tokens=20).token_ids == g.result.token_ids


def test_a_consumer_that_stops_reading_closes_the_cloud_session(runtime, cloud):
    verifier = cloud.running.verifier
    config = runtime.draft_config({"draft_len": 2, "k": 4, "ell": 100})
    g = runtime.start(runtime.encode(PROMPT), config, max_new_tokens=200)
    it = iter(g)
    next(it)
    assert verifier.active_sessions >= 1
    g.close()
    wait_until(lambda: verifier.active_sessions == 0, 10, "the edge closes its cloud session")
    assert g.result is None and runtime.metrics.registry.get_sample_value("sqs_active_sessions") == 0
    with pytest.raises(RuntimeError, match="closed"):  # no result to hand out, said so
        run_to_end(g)


def test_a_runtime_without_a_cloud_says_so(draft_engine):
    rt = EdgeRuntime(draft_engine, None)
    config = rt.draft_config({})
    with pytest.raises(RuntimeError, match="no cloud"):
        rt.generate(rt.encode(PROMPT), config, max_new_tokens=4)
    with pytest.raises(ValueError, match="no tokens"):
        rt.encode("")


def test_serve_passes_every_runtime_flag_to_the_server(monkeypatch):
    import edge.api
    from edge import cli

    seen = {}
    monkeypatch.setattr(edge.api, "serve", lambda config: seen.setdefault("config", config))
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--cloud", "127.0.0.1:9", "--engine", "llama", "--draft-model", "some/dir",
                  "--transport", "unary", "--outage-window", "7", "--wait-for-cloud", "2", "--draft-len", "3"])
    assert e.value.code == 0
    c = seen["config"]
    assert c.draft_spec() == DraftSpec("some/dir", engine="llama")
    cc = c.client_config()
    assert (cc.target, cc.transport, cc.outage_window_s, cc.connect_wait_s) == ("127.0.0.1:9", "unary", 7.0, 2.0)
    assert c.draft_len == 3


@pytest.fixture(scope="module")
def tiny_draft_dir(tmp_path_factory):
    """A local model directory holding the tiny draft as Hugging Face files and as model.gguf."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bench.tiny_gguf import write_tiny_gguf
    from sqs_models.tiny import build_tiny

    d = tmp_path_factory.mktemp("tiny-draft")
    build_tiny("draft").save_pretrained(str(d))
    tok = Tokenizer(models.WordLevel({chr(i): i for i in range(128)}, unk_token="?"))  # id = ASCII byte
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(d))
    write_tiny_gguf(d / "model.gguf", "draft")
    return d


def test_serve_with_engine_llama_drafts_with_llama_cpp(cloud, tiny_draft_dir, run_generation):
    body = {"prompt": PROMPT, "max_new_tokens": 24, "temperature": 0.0, "sparsifier": "topk", "k": 4,
            "draft_len": 4}
    app = create_app(EdgeServerConfig(cloud=cloud.address, draft_model=str(tiny_draft_dir), engine="llama"))
    with TestClient(app) as c:
        health = c.get("/healthz").json()
        r = c.post("/v1/generate", json=body)
    assert app.state.service.runtime.engine.kind == "llama"
    assert health["draft_engine"].startswith("llama: llama.cpp"), health
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["stats"]["drafted"] > 0 and d["stats"]["accepted"] > 0  # it drafted, and the cloud took drafts
    torch_drafted = run_generation(cloud.address, PROMPT, scheme="topk", k=4, max_new_tokens=24)
    assert d["token_ids"] == torch_drafted.token_ids  # T = 0: the target's greedy tokens either way
