"""Edge HTTP API through FastAPI's test client, against a real cloud on loopback."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from edge.api import EdgeServerConfig, create_app


@pytest.fixture(scope="module")
def client(cloud, draft_engine):
    app = create_app(EdgeServerConfig(cloud=cloud.address), engine=draft_engine)
    with TestClient(app) as c:
        yield c


def test_generate_matches_the_library_path(client, cloud, draft_model, run_generation):
    body = {"prompt": "Hello", "max_new_tokens": 10, "temperature": 1.0, "seed": 4, "sparsifier": "topk", "k": 4,
            "draft_len": 4}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    ref = run_generation(cloud.address, "Hello", scheme="topk", k=4, max_new_tokens=10, temperature=1.0, seed=4)
    assert d["token_ids"] == ref.token_ids
    assert d["text"] == draft_model.tokenizer.decode(ref.token_ids)
    for key in ("rounds", "drafted", "accepted", "resampled", "uplink_wire_bytes", "formula_bits", "total_ms"):
        assert key in d["stats"]


def test_stream_sends_token_events_then_done(client):
    body = {"prompt": "Hello", "max_new_tokens": 12, "sparsifier": "conformal"}
    with client.stream("POST", "/v1/generate/stream", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = []
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("tokens") >= 1
    streamed = [t for k, d in events if k == "tokens" for t in d["token_ids"]]
    final = events[-1][1]
    assert streamed == final["token_ids"] and len(streamed) == 12
    assert "".join(d["text"] for k, d in events if k == "tokens") == final["text"]


@pytest.mark.parametrize("body", [
    {},
    {"prompt": ""},
    {"prompt": "x", "max_new_tokens": 0},
    {"prompt": "x", "temperature": -1},
    {"prompt": "x", "sparsifier": "magic"},
    {"prompt": "x", "top_p": 0},
    {"prompt": "x", "k": 500},  # k beyond the tiny vocabulary (128): refused by the scheme
])
def test_bad_input_is_422_with_json(client, body):
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422, r.text
    assert "detail" in r.json()


def test_health_and_metrics(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    client.post("/v1/generate", json={"prompt": "Hi", "max_new_tokens": 4})
    m = client.get("/metrics")
    assert m.status_code == 200
    assert 'sqs_batches_total{sparsifier="topk"}' in m.text
    assert "sqs_batch_latency_seconds_bucket" in m.text
    assert client.get("/openapi.json").json()["paths"]["/v1/generate"]


def test_concurrent_requests_are_served(client):
    results = {}

    def go(seed):
        results[seed] = client.post("/v1/generate", json={"prompt": "Hey", "max_new_tokens": 8, "seed": seed,
                                                          "temperature": 1.0}).status_code

    threads = [threading.Thread(target=go, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {s: 200 for s in range(4)}


def test_cloud_down_is_503_not_a_hang(free_port, draft_engine):
    dead = f"127.0.0.1:{free_port()}"
    app = create_app(EdgeServerConfig(cloud=dead, connect_timeout_s=0.5, retries=0), engine=draft_engine)
    with TestClient(app) as c:
        r = c.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 3})
        assert r.status_code == 503 and "detail" in r.json()
        h = c.get("/healthz")
        assert h.status_code == 503 and h.json()["status"] == "unavailable"
