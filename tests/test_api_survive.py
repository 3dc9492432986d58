"""The HTTP API under the disturbances of issue 12: a cloud restarted mid-generation (the API resyncs
like the CLI), limits only the cloud knows (422, not 502), and HTTP clients that go away (the
generation stops and its cloud session is closed, plain and streaming)."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from fastapi.testclient import TestClient

from edge.api import EdgeServerConfig, create_app
from tests.survive_tools import Cloud, RestartingCloud, draft_engine, target, wait_until

BODY = {"prompt": "The quick brown fox", "max_new_tokens": 30, "temperature": 1.0, "seed": 5,
        "sparsifier": "topk", "k": 4, "ell": 100, "draft_len": 4, "no_pipeline": True}  # tokens depend on the seed only


def test_a_generation_rides_out_a_cloud_restart():
    """Round 3 of the second generation: the cloud stops before its verdict leaves and a new one
    starts on the same port; the API re-opens and answers exactly the tokens of an undisturbed run."""
    draft_engine(), target()
    seen: list[str] = []

    def second_generations_third_round(session) -> bool:
        if session.id not in seen:
            seen.append(session.id)
        return len(seen) == 2 and session.id == seen[1] and session.rounds == 3

    restarting = RestartingCloud(second_generations_third_round)
    app = create_app(EdgeServerConfig(cloud=restarting.address), engine=draft_engine())
    try:
        with TestClient(app) as c:
            reference = c.post("/v1/generate", json=BODY)
            disturbed = c.post("/v1/generate", json=BODY)
        assert reference.status_code == 200 and disturbed.status_code == 200, disturbed.text
        assert restarting.stopped.is_set() and len(restarting.clouds) == 2
        assert disturbed.json()["token_ids"] == reference.json()["token_ids"]
        assert disturbed.json()["stats"]["reopens"] == 1
    finally:
        restarting.stop()


def test_limits_known_to_the_cloud_only_are_422():
    cloud = Cloud(max_context=24)
    app = create_app(EdgeServerConfig(cloud=cloud.address), engine=draft_engine())
    try:
        with TestClient(app) as c:
            long_prompt = c.post("/v1/generate", json={**BODY, "prompt": "x" * 200})
            assert long_prompt.status_code == 422 and "no room for a round" in long_prompt.json()["detail"]
            top_k = c.post("/v1/generate", json={**BODY, "top_k": 100_000})
            assert top_k.status_code == 422 and "top_k" in top_k.json()["detail"]
            assert c.post("/v1/generate", json={**BODY, "max_new_tokens": 4}).status_code == 200
    finally:
        cloud.stop()


class HttpServer:
    """uvicorn serving an app on a free loopback port in a thread (a real socket to hang up on)."""

    def __init__(self, app) -> None:
        import uvicorn

        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        wait_until(lambda: self.server.started, 30, "uvicorn starts")

    def post(self, path: str, body: dict) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        data = json.dumps(body).encode()
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        return s

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/generate/stream"])
def test_a_client_that_goes_away_stops_its_generation_and_session(path):
    """The cloud holds every session's second round until released; the HTTP client hangs up
    meanwhile: the edge must close the cloud session while the round is still held, and no round
    may follow the release."""
    draft_engine()
    held, release = threading.Event(), threading.Event()

    def hold_second_round(session, msg):
        if session.rounds == 1:
            held.set()
            release.wait(30)

    cloud = Cloud(before=hold_second_round)
    app = create_app(EdgeServerConfig(cloud=cloud.address), engine=draft_engine())
    http = HttpServer(app)
    edge_sessions = lambda: app.state.metrics.registry.get_sample_value("sqs_active_sessions")  # noqa: E731
    try:
        s = http.post(path, {**BODY, "max_new_tokens": 4096})
        if path.endswith("stream"):
            got = b""
            while b"event: tokens" not in got:
                got += s.recv(4096)
        assert held.wait(30)
        s.close()
        wait_until(lambda: cloud.verifier.active_sessions == 0, 10, "the edge closes the cloud session")
        assert not release.is_set()  # closed while the round was still held
        computed = cloud.verifier.computed
        release.set()
        wait_until(lambda: edge_sessions() == 0, 10, "the generation ends on the edge")
        assert cloud.verifier.computed <= computed + 1 and cloud.verifier.active_sessions == 0
    finally:
        release.set()
        http.stop()
        cloud.stop()
