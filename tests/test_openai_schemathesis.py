"""schemathesis against the daemon's own OpenAPI document, every route: generated requests, valid
(positive) and invalid (negative), go over loopback to uvicorn serving the edge app with the tiny
draft and a real tiny cloud. No response may be a 5xx; every 4xx of an OpenAI route (edge/openai_api.py
`owns`) must be {"error": {"message", "type", "param", "code"}}, the edge's own routes keep
{"detail": ...}. Generations are capped at a few tokens so that the bounded number of examples runs
in seconds; the number of cases that ran is printed (pytest -s) and checked."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from edge.api import EdgeServerConfig, create_app
from edge.openai_api import owns
from tests.test_api_survive import HttpServer

# examples per operation and mode: the generating routes cost a generation each
EXAMPLES = {"POST": 25, "GET": 8}
CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def daemon(cloud, draft_engine):
    http = HttpServer(create_app(EdgeServerConfig(cloud=cloud.address, connect_timeout_s=2.0), engine=draft_engine))
    yield http
    http.stop()


def _cap(body) -> None:
    """Few tokens per generated request (a valid request stays valid; an invalid one may not)."""
    if isinstance(body, dict):
        for key, cap in CAPS.items():
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > cap:
                body[key] = cap


def _check(case, response, seen: dict) -> None:
    path = case.operation.path
    status = response.status_code
    seen[status] = seen.get(status, 0) + 1
    assert status < 500, f"{case.method} {path} -> {status}: {response.text[:500]}"
    if 400 <= status < 500:
        body = response.json()
        if owns(path):
            assert set(body) == {"error"}, body
            assert set(body["error"]) == {"message", "type", "param", "code"}, body
            assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        else:
            assert "detail" in body, body


def test_every_route_of_the_openapi_document(daemon, capsys):
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{daemon.port}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/generate", "/healthz"} <= paths
    counts: dict[str, int] = {}
    statuses: dict[int, int] = {}
    skipped: list[str] = []
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{op.method.upper()} {op.path} {mode.value}"

            @settings(max_examples=EXAMPLES.get(op.method.upper(), 8), deadline=None, database=None,
                      derandomize=True, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(mode))
            def run(case):
                _cap(case.body)
                response = case.call(timeout=60)
                counts[label] = counts.get(label, 0) + 1
                _check(case, response, statuses)

            try:
                run()
            except Unsatisfiable:
                if mode is not GenerationMode.NEGATIVE:
                    raise
                skipped.append(label)  # nothing can make this request invalid (no parameters, or a free string)
    total = sum(counts.values())
    with capsys.disabled():
        print(f"\nschemathesis: {total} cases over {len(operations)} operations; statuses {dict(sorted(statuses.items()))}")
        for label, n in sorted(counts.items()):
            print(f"  {n:4d}  {label}")
        print(f"  no invalid request possible: {', '.join(skipped)}")
    assert total >= 150
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0
