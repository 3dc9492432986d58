"""The OpenAI-compatible routes (edge/openai_api.py) through the official `openai` client against a
real daemon on loopback: uvicorn serving the edge app with the tiny draft, an in-process tiny cloud.
The stop-text filter is also tested alone, and the chat route with the real Qwen pair where it is
installed."""

from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest

from edge.api import EdgeServerConfig, create_app
from edge.stop_text import StopText
from tests.survive_tools import wait_until
from tests.test_api_survive import HttpServer

PROMPT = "The quick brown fox"
FIXED = {"draft_len": 4, "sparsifier": "topk", "k": 4, "no_pipeline": True}  # rounds depend on the seed only


@pytest.fixture(scope="module")
def daemon(cloud, draft_engine):
    http = HttpServer(create_app(EdgeServerConfig(cloud=cloud.address), engine=draft_engine))
    yield http
    http.stop()


@pytest.fixture(scope="module")
def client(daemon):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="not-checked", max_retries=0)


@pytest.fixture(scope="module")
def http(daemon):
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=60) as c:
        yield c


def generate(http, **body) -> dict:
    r = http.post("/v1/generate", json={"prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    return r.json()


# --- the visible text, alone ----------------------------------------------------------------------


def ascii_decode(ids):
    return "".join(map(chr, ids))


def utf8_bytes_decode(ids):
    """A byte-level tokenizer: each id is one byte; an open character decodes to U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")


def push_all(text: StopText, chunks) -> str:
    return "".join(text.push(c) for c in chunks) + text.flush()


def test_stop_text_ends_at_a_string_spanning_tokens_and_holds_back_a_possible_start():
    t = StopText(ascii_decode, stop=["END"])
    assert t.push([ord(c) for c in "abcE"]) == "abc"  # "E" may start "END"
    assert t.push([ord("N")]) == ""
    assert t.push([ord(c) for c in "Dxyz"]) == "" and t.stopped
    assert len(t.tokens) == 6  # up to and including the token completing the stop string
    t = StopText(ascii_decode, stop=["END"])
    assert push_all(t, [[ord(c)] for c in "abENx"]) == "abENx" and not t.stopped  # released once it cannot match


def test_stop_text_takes_the_earliest_stop_and_stop_tokens_are_not_text():
    t = StopText(ascii_decode, stop=["cd", "bcdef"])
    assert push_all(t, [[ord(c) for c in "abcdefg"]]) == "ab" and t.stopped
    t = StopText(ascii_decode, stop_ids=[0])
    assert push_all(t, [[ord("h"), ord("i"), 0, ord("x")]]) == "hi" and t.tokens == [104, 105, 0]


def test_stop_text_never_splits_a_multibyte_character():
    data = "é😀 ok".encode()
    t = StopText(utf8_bytes_decode)
    pieces = [t.push([b]) for b in data]
    assert "".join(pieces) == "é😀 ok" and all("\ufffd" not in p for p in pieces)
    t = StopText(utf8_bytes_decode, stop=["😀"])
    assert push_all(t, [[b] for b in data]) == "é" and t.stopped


# --- the official client against the daemon ---------------------------------------------------------


def test_models_list_the_served_pair(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["draft_model"] == "tiny"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["param"] == "model"


def test_a_seed_reproduces_the_answer_whatever_the_plan(client, http):
    """With a seed (and no reproducible: false) the answer is plain decoding's for that seed at T = 1,
    whatever draft length the request asks for."""
    plain = generate(http, max_new_tokens=20, temperature=1.0, seed=11, draft_len=0)["token_ids"]
    for draft_len in (1, 3, "auto"):
        got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=1.0, seed=11,
                                        extra_body={"draft_len": draft_len, "return_token_ids": True})
        assert got.choices[0].model_extra["token_ids"] == plain, draft_len


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 7)])
def test_completion_equals_generate_token_for_token(client, http, temperature, seed):
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=temperature, seed=seed,
                                    extra_body={**FIXED, "return_token_ids": True})
    # A seed makes the route reproducible (the invariant scheme): compare with /v1/generate asked the same.
    ref = generate(http, max_new_tokens=24, temperature=temperature, seed=seed or 0, reproducible=seed is not None,
                   **FIXED)
    choice = got.choices[0]
    assert choice.model_extra["token_ids"] == ref["token_ids"]
    assert choice.text == ref["text"] and choice.finish_reason == "length"
    assert got.model_extra["prompt_token_ids"] == [ord(c) for c in PROMPT]
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (19, 24, 43)
    assert got.object == "text_completion" and got.id.startswith("cmpl-") and got.model == "tiny"
    timings = got.model_extra["timings"]
    assert timings["rounds"] == ref["stats"]["rounds"] and timings["accepted"] == ref["stats"]["accepted"]
    assert timings["uplink_wire_bytes_per_token"] > 0 and timings["time_to_first_token_ms"] > 0


def test_streamed_chunks_concatenate_to_the_whole_text(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0.0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    *texts, last = chunks
    assert "".join(c.choices[0].text for c in texts) == whole.choices[0].text
    assert all(c.usage is None for c in texts) and len(texts) >= 2
    assert texts[-1].choices[0].finish_reason == "length" and "timings" in texts[-1].model_extra
    assert last.choices == [] and last.usage.completion_tokens == 30 and last.usage.total_tokens == 49
    assert len({c.id for c in chunks}) == 1


def _round_boundaries(http, **body) -> tuple[str, list[int]]:
    """The text of a streamed /v1/generate and the token counts after each round."""
    ends, n, text = [], 0, ""
    with http.stream("POST", "/v1/generate/stream", json={"prompt": PROMPT, **body}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                d = json.loads(line[6:])
                if "token_ids" in d and "stats" not in d:
                    n += len(d["token_ids"])
                    text += d["text"]
                    ends.append(n)
    return text, ends


@pytest.mark.parametrize("stream", [False, True])
def test_stop_cuts_across_a_round_boundary(client, http, stream):
    body = dict(max_new_tokens=40, temperature=0.0, **FIXED)
    text, ends = _round_boundaries(http, **body)
    # a 2-character stop string whose first character ends one round and second starts the next
    b = next(b for b in ends[:-1] if text.find(text[b - 1:b + 1]) == b - 1)
    stop = text[b - 1:b + 1]
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0.0, stop=[stop, "never here"],
              extra_body=FIXED)
    if stream:
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        got = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
    else:
        r = client.completions.create(**kw)
        got, finish, usage = r.choices[0].text, r.choices[0].finish_reason, r.usage
    assert got == text[:b - 1] and finish == "stop"
    assert usage.completion_tokens == b + 1  # up to the token that completed the stop string


def test_max_tokens_is_honoured(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0.7, seed=3)
    assert r.usage.completion_tokens == 5 and len(r.choices[0].text) == 5 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("kw,field", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"logprobs": 1}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"extra_body": {"k": 500}}, "k"),
    ({"extra_body": {"sparsifier": "magic"}}, "sparsifier"),
    ({"extra_body": {"top_k": -5}}, "top_k"),
])
def test_bad_values_are_400_naming_the_field(client, kw, field):
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.status_code == 400 and field in e.value.message
    assert set(e.value.body) == {"message", "type", "param", "code"} and e.value.body["type"] == "invalid_request_error"


def test_chat_on_a_model_without_a_template_is_400_saying_so(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert "tools" in e.value.message


def test_errors_are_openai_shaped_never_fastapi_422(http):
    for r, status in [(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400),
                      (http.post("/v1/chat/completions", json={"messages": []}), 400),
                      (http.post("/v1/completions", json={"prompt": "x", "temperature": "hot"}), 400),
                      (http.get("/v1/embeddings"), 404),
                      (http.get("/v1/completions"), 405)]:
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    assert http.post("/v1/generate", json={}).status_code == 422  # the edge's own route keeps its behaviour


def test_raw_sse_bytes(http):
    """`data: ` lines, events separated by one blank line, `[DONE]` last, nothing else on the wire."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    raw = b""
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for piece in r.iter_raw():
            raw += piece
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    objects = []
    for ev in events[:-2]:
        assert ev.startswith(b"data: ") and b"\n" not in ev, ev
        objects.append(json.loads(ev[len(b"data: "):]))
    assert all(o["object"] == "text_completion" for o in objects)
    assert objects[-1]["choices"] == [] and objects[-1]["usage"]["completion_tokens"] == 12
    assert objects[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(o["choices"][0]["text"] for o in objects[:-1]) == \
        http.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]["text"]


def test_a_client_that_disconnects_mid_stream_frees_the_cloud_session(client, cloud, daemon):
    wait_until(lambda: cloud.running.verifier.active_sessions == 0, 10, "no session left from other tests")
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4096, temperature=1.0, stream=True)
    next(iter(stream))
    assert cloud.running.verifier.active_sessions == 1
    stream.close()
    wait_until(lambda: cloud.running.verifier.active_sessions == 0, 10, "the edge closes the cloud session")


def test_the_daemon_at_its_limit_is_503_with_retry_after(cloud, draft_engine):
    http = HttpServer(create_app(EdgeServerConfig(cloud=cloud.address, max_generations=1), engine=draft_engine))
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="x", max_retries=0)
    try:
        stream = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4096, stream=True)
        next(iter(stream))
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        stream.close()
        wait_until(lambda: cloud.running.verifier.active_sessions == 0, 10, "the stream's session closed")
        assert c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    finally:
        http.stop()


def test_an_unreachable_cloud_is_503_with_retry_after(free_port, draft_engine):
    dead = f"127.0.0.1:{free_port()}"
    http = HttpServer(create_app(EdgeServerConfig(cloud=dead, connect_timeout_s=0.5, retries=0), engine=draft_engine))
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="x", max_retries=0)
    try:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as e:
                c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, stream=stream)
            assert e.value.status_code == 503 and "retry-after" in e.value.response.headers
            assert "does not answer" in e.value.message
    finally:
        http.stop()


def test_an_api_key_guards_every_v1_route(cloud, draft_engine):
    http = HttpServer(create_app(EdgeServerConfig(cloud=cloud.address, api_key="s3cret"), engine=draft_engine))
    url = f"http://127.0.0.1:{http.port}"
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="Hi", max_tokens=3).usage.completion_tokens == 3
        assert httpx.post(url + "/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2}).status_code == 401
        assert httpx.get(url + "/healthz").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
    finally:
        http.stop()


def test_serve_takes_the_key_the_model_name_and_the_limit(monkeypatch):
    import edge.api
    from edge import cli

    seen = {}
    monkeypatch.setattr(edge.api, "serve", lambda config: seen.setdefault("config", config))
    monkeypatch.setenv("SQS_API_KEY", "from-env")
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--served-model-name", "pair", "--max-generations", "3"])
    assert e.value.code == 0
    c = seen["config"]
    assert (c.api_key, c.served_model_name, c.max_generations) == ("from-env", "pair", 3)
    assert "from-env" not in repr(c)  # the key stays out of logs


def test_top_p_through_the_http_route_keeps_the_target_distribution(client, draft_model):
    """The first token of completions at T = 1, top_p = 0.6 (drafts speculated and verified) is
    distributed as the target's top-p distribution: chi-square p > 1e-3 over 240 seeds."""
    from cloud.server import load_target
    from common.rejection import target_probs
    from tests.test_rejection_stats import pooled_chisquare_pvalue

    temperature, top_p, n = 1.0, 0.6, 240
    _, new_lm = load_target("tiny")
    p = target_probs(new_lm().logits(draft_model.tokenizer.encode(PROMPT), want=1)[0].astype(np.float64),
                     temperature, top_p=top_p)
    assert 3 <= (p > 0).sum() < p.size  # top-p cut something, and something is left to test
    counts = np.zeros(p.size)
    drafted = 0
    for seed in range(n):
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=temperature, top_p=top_p,
                                      seed=seed, extra_body={"draft_len": 2, "return_token_ids": True})
        counts[r.choices[0].model_extra["token_ids"][0]] += 1
        drafted += r.model_extra["timings"]["drafted"]
    assert drafted >= n  # the speculative path ran
    assert pooled_chisquare_pvalue(counts, p) > 1e-3


# --- chat with the real Qwen instruct pair ------------------------------------------------------


@pytest.mark.slow
def test_chat_with_the_qwen_pair_uses_its_template_and_ends_the_turn():
    from sqs_models.registry import is_installed

    draft, target = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"
    missing = [m for m in (draft, target) if not is_installed(m)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (sqs-models install {draft} {target})")
    from cloud.inprocess import LocalCloud
    from sqs_models.engines import load_engine

    # torch on both sides (llama.cpp is another test's subject), bf16: no dtype probe at load
    engine = load_engine(draft, "draft", engine="torch", dtype="bfloat16")
    messages = [{"role": "system", "content": "You answer with one word."},
                {"role": "user", "content": "Is water wet? Answer yes or no."}]
    with LocalCloud(target, engine="torch", dtype="bfloat16") as cloud:
        http = HttpServer(create_app(EdgeServerConfig(cloud=cloud.address), engine=engine))
        try:
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="x", max_retries=0)
            r = c.chat.completions.create(model=draft, messages=messages, temperature=0, max_tokens=24,
                                          extra_body={"return_token_ids": True})
            streamed = list(c.chat.completions.create(model=draft, messages=messages, temperature=0, max_tokens=24,
                                                      stream=True))
        finally:
            http.stop()
    want = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
    assert r.model_extra["prompt_token_ids"] == list(want) and r.usage.prompt_tokens == len(want)
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["token_ids"][-1] == 151645  # <|im_end|>
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert "<|im_end|>" not in choice.message.content
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(s.choices[0].delta.content or "" for s in streamed) == choice.message.content
    assert streamed[-1].choices[0].finish_reason == "stop"
