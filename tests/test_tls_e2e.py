"""The whole stack over TLS (issue 23): sqs-cloud with TLS, mutual TLS or bearer tokens, the edge's
CloudClient and runtime through its byte-counting relay, the tiny pair.

How a refused client sees it: a client the TLS handshake refuses (no certificate under mutual TLS,
one of another CA, an expired one) never reaches the service: the edge reports UNAVAILABLE ("does
not answer") once its connect timeout passes. A client that completes the handshake without a valid
bearer token (none, unknown, revoked) gets UNAUTHENTICATED at open. Neither changes the cloud's
sessions. An identity using another identity's session id gets PERMISSION_DENIED.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

import grpc
import pytest

from cloud import auth, tls
from cloud.inprocess import LocalCloud
from cloud.quotas import QuotaConfig
from common import codec
from common.pb.v1 import sqs_pb2 as pb
from common.pb.v1 import sqs_pb2_grpc
from edge.client import ClientConfig, CloudClient, CloudError
from edge.runtime import EdgeRuntime

PROMPT = "The quick brown fox"
PLAN = {"draft_len": 4, "k": 4, "ell": 100, "no_pipeline": True, "sparsifier": "topk"}
TOKENS = 24


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    paths = tls.gen_certs(d, client_cn="edge-a", more_clients=["edge-b"])
    ca = tls.load_issued(paths.ca, paths.ca_key)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    for name, issued in (("expired", tls.issue(ca, "edge-late", days=1, not_before=past)),
                         ("foreign", tls.issue(tls.new_ca(cn="another CA"), "edge-a"))):
        issued.write(d / f"{name}.pem", d / f"{name}-key.pem")
    return d, paths


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """{name: token} and the token file listing them; "revoked" is not listed (any more)."""
    names = ("edge-a", "edge-b", "greedy", "polite", "revoked")
    table = {n: auth.new_token() for n in names}
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text("".join(f"{n} {auth.hash_token(t)}\n" for n, t in table.items() if n != "revoked"))
    return table, path


@pytest.fixture(scope="module")
def mtls_cloud(pki):
    _, p = pki
    with LocalCloud("tiny", calibrate=False, tls=tls.ServerTLS(p.server, p.server_key, client_ca=p.ca)) as c:
        yield c


@pytest.fixture(scope="module")
def token_cloud(pki, tokens):
    _, p = pki
    with LocalCloud("tiny", calibrate=False, tls=tls.ServerTLS(p.server, p.server_key), token_file=tokens[1]) as c:
        yield c


def _mtls(pki, name: str = "client") -> dict:
    d, p = pki
    return {"tls_ca": str(p.ca), "tls_cert": str(d / f"{name}.pem"), "tls_key": str(d / f"{name}-key.pem")}


def _generate(draft_engine, address: str, temperature: float, seed: int = 0, tokens: int = TOKENS, **link):
    runtime = EdgeRuntime(draft_engine, ClientConfig(address, retries=8, backoff_s=0.1, **link))
    config = runtime.draft_config({**PLAN, "temperature": temperature, "seed": seed})
    return runtime.generate(runtime.encode(PROMPT), config, max_new_tokens=tokens)


def _open_request(draft_engine) -> codec.OpenRequest:
    runtime = EdgeRuntime(draft_engine, None)
    cfg = runtime.draft_config({**PLAN, "temperature": 1.0, "seed": 3})
    return codec.OpenRequest(runtime.encode(PROMPT), codec.Sampling(1.0, 0, 1.0, 3), cfg.scheme,
                             draft_engine.fingerprint, 8)


def _failures(cloud) -> dict[str, float]:
    reg = cloud.running.metrics.registry
    return {r: reg.get_sample_value("sqs_auth_failures_total", {"reason": r}) or 0.0
            for r in ("missing", "malformed", "invalid", "certificate")}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_authenticated_edges_get_the_plaintext_tokens(cloud, mtls_cloud, token_cloud, draft_engine, pki, tokens,
                                                      temperature):
    """Same seed and fixed plan: plaintext, mutual TLS and TLS + token give identical tokens."""
    ref = _generate(draft_engine, cloud.address, temperature, seed=5)
    assert len(ref.token_ids) == TOKENS and ref.stats.drafted > 0
    over_mtls = _generate(draft_engine, mtls_cloud.address, temperature, seed=5, **_mtls(pki))
    over_token = _generate(draft_engine, token_cloud.address, temperature, seed=5, tls_ca=str(pki[1].ca),
                           token=tokens[0]["edge-a"])
    assert over_mtls.token_ids == ref.token_ids
    assert over_token.token_ids == ref.token_ids
    # The relay counted TLS records: more bytes than the plaintext run, for the same messages.
    assert over_mtls.stats.uplink_wire_bytes > ref.stats.uplink_wire_bytes
    assert over_mtls.stats.uplink_message_bytes == ref.stats.uplink_message_bytes


def test_refused_clients_leave_the_cloud_and_other_sessions_untouched(mtls_cloud, token_cloud, draft_engine, pki,
                                                                      tokens):
    d, p = pki
    names, token_file = tokens
    request = _open_request(draft_engine)
    batch = codec.Batch(position=len(request.context), num_drafts=0)
    for c, link in ((mtls_cloud, _mtls(pki)), (token_cloud, {"tls_ca": str(p.ca), "token": names["edge-a"]})):
        with CloudClient(ClientConfig(c.address, **link)) as live:  # a session that must not notice anything
            live.open(request)
            first = live.round(batch, lambda: request).verdict
            held, failures = c.running.verifier.active_sessions, _failures(c)
            refused = []
            if c is mtls_cloud:
                for who in ({"tls_ca": str(p.ca)}, _mtls(pki, "foreign"), _mtls(pki, "expired")):
                    refused.append((ClientConfig(c.address, connect_timeout_s=1.0, **who), grpc.StatusCode.UNAVAILABLE))
                # a token does not replace the certificate under mutual TLS
                refused.append((ClientConfig(c.address, connect_timeout_s=1.0, tls_ca=str(p.ca), token="x"),
                                grpc.StatusCode.UNAVAILABLE))
            else:
                for token in (None, "not-a-token", names["revoked"]):
                    refused.append((ClientConfig(c.address, tls_ca=str(p.ca), token=token),
                                    grpc.StatusCode.UNAUTHENTICATED))
            for config, code in refused:
                with CloudClient(config) as stranger, pytest.raises(CloudError) as e:
                    stranger.open(request)
                assert e.value.code == code, (config, e.value)
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    assert str(e.value).endswith(auth.REFUSED)  # no word on which part failed
            assert c.running.verifier.active_sessions == held
            second = live.round(codec.Batch(position=first.position, num_drafts=0), lambda: request).verdict
            assert second.position == first.position + 1  # the live session went on
            after = _failures(c)
            if c is mtls_cloud:
                assert after == failures  # refused in the handshake: the service never saw them
            else:
                assert after["missing"] == failures["missing"] + 1 and after["invalid"] == failures["invalid"] + 2


def test_a_revoked_token_is_refused_after_reload(token_cloud, draft_engine, pki, tokens):
    names, token_file = tokens
    link = {"tls_ca": str(pki[1].ca)}
    assert len(_generate(draft_engine, token_cloud.address, 0.0, token=names["edge-b"], **link).token_ids) == TOKENS
    text = token_file.read_text()
    try:
        token_file.write_text("".join(ln + "\n" for ln in text.splitlines() if not ln.startswith("edge-b ")))
        assert token_cloud.running.auth.tokens.reload()  # what SIGHUP does in sqs-cloud
        with pytest.raises(CloudError) as e:
            _generate(draft_engine, token_cloud.address, 0.0, token=names["edge-b"], **link)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert len(_generate(draft_engine, token_cloud.address, 0.0, token=names["edge-a"], **link).token_ids) == TOKENS
    finally:
        token_file.write_text(text)
        token_cloud.running.auth.tokens.reload()


def test_one_identity_cannot_use_another_identitys_session(mtls_cloud, draft_engine, pki):
    d, p = pki

    def stub(name: str):
        creds = grpc.ssl_channel_credentials(p.ca.read_bytes(), (d / f"{name}-key.pem").read_bytes(),
                                             (d / f"{name}.pem").read_bytes())
        ch = grpc.secure_channel(mtls_cloud.address, creds)
        return ch, sqs_pb2_grpc.VerifierStub(ch)

    (ch_a, a), (ch_b, b) = stub("client"), stub("client-edge-b")
    try:
        request = codec.encode_open(_open_request(draft_engine))
        sid = a.OpenSession(request, timeout=10).session_id
        position = len(request.context_token_ids)
        session = mtls_cloud.running.verifier.sessions.get(sid)
        assert session.owner == "edge-a"
        take_over = pb.OpenSessionRequest()
        take_over.CopyFrom(request)
        take_over.client_session_id = sid
        attempts = {
            "close": lambda: b.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=5),
            "verify batch": lambda: b.VerifyBatch(pb.DraftBatch(session_id=sid, position=position), timeout=5),
            "verify stream": lambda: list(b.Verify(iter([pb.DraftBatch(session_id=sid, position=position)]),
                                                   timeout=5)),
            "re-open": lambda: b.OpenSession(take_over, timeout=5),
        }
        for name, attempt in attempts.items():
            with pytest.raises(grpc.RpcError) as e:
                attempt()
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
            assert "another identity" in e.value.details(), name
        assert session.rounds == 0 and session.streams == 0 and session.context == list(request.context_token_ids)
        verdict = a.VerifyBatch(pb.DraftBatch(session_id=sid, position=position), timeout=5)
        assert verdict.position == position + 1  # the owner's session is intact and serves it
        a.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=5)
    finally:
        ch_a.close()
        ch_b.close()


def test_quotas_refuse_the_greedy_identity_and_serve_the_other(pki, tokens, draft_engine):
    """greedy: its second session is refused, and its rounds beyond 20/s get RESOURCE_EXHAUSTED with a
    retry-after hint; meanwhile polite's generations complete with their solo tokens. An edge over
    its rate quota waits the hints out (CloudClient) and still gets its tokens."""
    names, token_file = tokens
    _, p = pki
    short = 8  # tokens per generation: at most 8 rounds (3-5 seen), well inside one identity's bucket of 20
    quotas = QuotaConfig(max_sessions=1, rounds_per_s=20, burst_s=1.0)
    with LocalCloud("tiny", calibrate=False, tls=tls.ServerTLS(p.server, p.server_key), token_file=token_file,
                    quotas=quotas) as c:
        link = lambda who: {"tls_ca": str(p.ca), "token": names[who]}  # noqa: E731
        t0 = time.monotonic()
        solo = [_generate(draft_engine, c.address, t, seed=7, tokens=short, **link("polite")) for t in (0.0, 1.0)]
        solo_s = time.monotonic() - t0
        ch = grpc.secure_channel(c.address, grpc.ssl_channel_credentials(p.ca.read_bytes()))
        greedy = sqs_pb2_grpc.VerifierStub(ch)
        md = (("authorization", f"Bearer {names['greedy']}"),)
        request = codec.encode_open(_open_request(draft_engine))
        sid = greedy.OpenSession(request, timeout=10, metadata=md).session_id
        with pytest.raises(grpc.RpcError) as e:
            greedy.OpenSession(request, timeout=10, metadata=md)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "session quota" in e.value.details()
        served, hints, stop = [], [], threading.Event()

        def hammer() -> None:  # as fast as it can, ignoring the hints
            position = len(request.context_token_ids)
            while not stop.is_set():
                try:
                    position = greedy.VerifyBatch(pb.DraftBatch(session_id=sid, position=position), timeout=5,
                                                  metadata=md).position
                    served.append(position)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    hints.append(float(dict(exc.trailing_metadata())["retry-after"]))

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            # polite runs while greedy is being refused: its streamed generations of 8 tokens can
            # end before the hammer has emptied its bucket of 20 rounds (t0 counts the wait: the
            # bound on what the hammer got served covers all of its time)
            t0 = time.monotonic()
            while not hints and time.monotonic() < t0 + 10:
                time.sleep(0.01)
            during = [_generate(draft_engine, c.address, t, seed=7, tokens=short, **link("polite")) for t in (0.0, 1.0)]
            during_s = time.monotonic() - t0
        finally:
            stop.set()
            thread.join(10)
        assert [r.token_ids for r in during] == [r.token_ids for r in solo]
        # The bucket holds 20 rounds (burst 1 s at 20/s) and refills at 20/s: however fast the machine
        # runs the hammer, what it got served is bounded by that, and the rest was refused with a hint.
        assert hints and all(0 < h <= 0.051 for h in hints), (hints[:3], len(served))
        assert len(served) <= 20 * (1.0 + during_s) + 5, (len(served), during_s)
        reg = c.running.metrics.registry
        assert reg.get_sample_value("sqs_quota_refusals_total", {"limit": "rounds"}) == len(hints)
        assert reg.get_sample_value("sqs_quota_refusals_total", {"limit": "sessions"}) == 1
        print(f"polite alone {solo_s:.2f} s, beside a greedy identity {during_s:.2f} s "
              f"(greedy: {len(served)} rounds served, {len(hints)} refused)")
        position = served[-1] if served else len(request.context_token_ids)
        while True:  # empty greedy's bucket (the hammer may have stopped just after a refill)
            try:
                position = greedy.VerifyBatch(pb.DraftBatch(session_id=sid, position=position), timeout=5,
                                              metadata=md).position
            except grpc.RpcError:
                break
        refused = reg.get_sample_value("sqs_quota_refusals_total", {"limit": "rounds"})
        greedy.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=5, metadata=md)
        ch.close()
        # greedy's bucket is empty: its edge is refused at first, waits the hints out, same tokens.
        slow = _generate(draft_engine, c.address, 1.0, seed=7, tokens=short, **link("greedy"))
        assert slow.token_ids == solo[1].token_ids
        assert reg.get_sample_value("sqs_quota_refusals_total", {"limit": "rounds"}) > refused


def test_malformed_requests_over_tls_get_no_unknown_or_internal(token_cloud, draft_engine, draft_model, pki, tokens,
                                                                monkeypatch):
    """tests/test_e2e_grpc.py's malformed-request test, every channel of it TLS with a token."""
    from tests import test_e2e_grpc

    names, _ = tokens
    ca = pki[1].ca

    class SecureGrpc:  # the test module's `grpc`, with insecure_channel made a TLS channel with the token
        def __getattr__(self, name):
            return getattr(grpc, name)

        @staticmethod
        def insecure_channel(target, options=None):
            creds = grpc.composite_channel_credentials(grpc.ssl_channel_credentials(ca.read_bytes()),
                                                       grpc.access_token_call_credentials(names["edge-a"]))
            return grpc.secure_channel(target, creds, options=options)

    monkeypatch.setattr(test_e2e_grpc, "grpc", SecureGrpc())

    def run_generation(address, prompt, max_new_tokens=16, **_):
        runtime = EdgeRuntime(draft_engine, ClientConfig(address, tls_ca=str(ca), token=names["edge-a"]))
        config = runtime.draft_config({**PLAN, "temperature": 0.0})
        return runtime.generate(runtime.encode(prompt), config, max_new_tokens=max_new_tokens)

    before = _failures(token_cloud)
    test_e2e_grpc.test_malformed_requests_get_invalid_argument_and_server_keeps_serving(
        token_cloud, run_generation, draft_model)
    assert _failures(token_cloud) == before  # every call of it was authenticated


def test_plaintext_outside_loopback_must_be_asked_for(pki):
    with pytest.raises(ValueError, match="--insecure"):
        ClientConfig("cloud.example:50051")
    ClientConfig("cloud.example:50051", insecure=True)
    ClientConfig("cloud.example:50051", tls_ca=str(pki[1].ca))
    ClientConfig("[::1]:50051")
    with pytest.raises(ValueError, match="together"):
        ClientConfig("127.0.0.1:1", tls_ca=str(pki[1].ca), tls_cert=str(pki[1].client))
    assert "s3cret" not in repr(ClientConfig("127.0.0.1:1", token="s3cret"))
