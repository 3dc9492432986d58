"""TLS and the auth interceptor on a bare grpc.aio server (no model): who gets in, and with which status.

A client the TLS handshake refuses (no certificate under mutual TLS, a certificate of another CA,
an expired one, a server it does not trust) never reaches the server's methods: grpc reports that
to the client as UNAVAILABLE (the connection failed). A client that completes the handshake but
lacks a valid token gets UNAUTHENTICATED, with the same detail whatever was wrong. The health
service answers without credentials.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from cloud import auth, tls

WHO = "/test.Who/Me"
WHO_STREAM = "/test.Who/Stream"


class Server:
    """An aio server with the interceptor: /test.Who/Me answers the caller's identity."""

    def __init__(self, server_tls: tls.ServerTLS, authenticator: auth.Authenticator) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(server_tls, authenticator), self.loop).result(30)

    async def _start(self, server_tls, authenticator) -> int:
        async def me(request: bytes, context) -> bytes:
            return auth.identity().encode()

        async def stream(requests, context):
            async for r in requests:
                yield auth.identity().encode() + r

        self.server = grpc.aio.server(interceptors=[auth.AuthInterceptor(authenticator)])
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Who", {
            "Me": grpc.unary_unary_rpc_method_handler(me),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        }),))
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, self.server)
        port = self.server.add_secure_port("127.0.0.1:0", server_tls.credentials())
        await self.server.start()
        return port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    paths = tls.gen_certs(d, client_cn="edge-a")
    ca = tls.load_issued(paths.ca, paths.ca_key)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    return {
        "paths": paths,
        "expired": tls.issue(ca, "edge-late", days=1, not_before=past),
        "foreign": tls.issue(tls.new_ca(cn="another CA"), "edge-a"),
        "foreign_ca": tls.new_ca(cn="yet another CA"),
    }


def _channel(port: int, ca: bytes, key: bytes | None = None, cert: bytes | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def _call(channel: grpc.Channel, metadata=()) -> bytes:
    return channel.unary_unary(WHO)(b"", timeout=5, metadata=metadata)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_mutual_tls_admits_our_edges_only(pki):
    p = pki["paths"]
    failures: list[str] = []
    server = Server(tls.ServerTLS(p.server, p.server_key, client_ca=p.ca),
                    auth.Authenticator(mtls=True, on_failure=failures.append))
    ca = p.ca.read_bytes()
    try:
        with _channel(server.port, ca, p.client_key.read_bytes(), p.client.read_bytes()) as ch:
            assert _call(ch) == b"edge-a"  # the certificate's CN is the identity
            replies = list(ch.stream_stream(WHO_STREAM)(iter([b"1", b"2"]), timeout=5))
            assert replies == [b"edge-a1", b"edge-a2"]
        refused = {
            "no certificate": (None, None),
            "another CA": (pki["foreign"].key_pem(), pki["foreign"].cert_pem()),
            "expired": (pki["expired"].key_pem(), pki["expired"].cert_pem()),
        }
        for name, (key, cert) in refused.items():
            with _channel(server.port, ca, key, cert) as ch:
                assert _code(lambda: _call(ch)) == grpc.StatusCode.UNAVAILABLE, name  # the handshake failed
        with _channel(server.port, pki["foreign_ca"].cert_pem(), p.client_key.read_bytes(),
                      p.client.read_bytes()) as ch:  # the edge does not trust this server
            assert _code(lambda: _call(ch)) == grpc.StatusCode.UNAVAILABLE
        assert failures == []  # none of them reached the interceptor
    finally:
        server.stop()


def test_tokens_over_tls(pki, tmp_path):
    p = pki["paths"]
    a, b = auth.new_token(), auth.new_token()
    token_file = tmp_path / "tokens"
    token_file.write_text(f"edge-a {auth.hash_token(a)}\nedge-b {auth.hash_token(b)}\n")
    table = auth.TokenTable(token_file)
    failures: list[str] = []
    server = Server(tls.ServerTLS(p.server, p.server_key), auth.Authenticator(tokens=table, on_failure=failures.append))
    bearer = lambda t: (("authorization", f"Bearer {t}"),)  # noqa: E731
    try:
        with _channel(server.port, p.ca.read_bytes()) as ch:  # server-only TLS: no client certificate
            assert _call(ch, bearer(a)) == b"edge-a"
            assert _call(ch, bearer(b)) == b"edge-b"
            details = set()
            for metadata in ((), bearer("x" * 43), (("authorization", a),)):
                with pytest.raises(grpc.RpcError) as e:
                    _call(ch, metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                details.add(e.value.details())
            assert details == {auth.REFUSED}  # nothing says which part failed
            stream = ch.stream_stream(WHO_STREAM)
            assert _code(lambda: list(stream(iter([b"1"]), timeout=5))) == grpc.StatusCode.UNAUTHENTICATED
            token_file.write_text(f"edge-a {auth.hash_token(a)}\n")  # b revoked
            table.reload()
            assert _code(lambda: _call(ch, bearer(b))) == grpc.StatusCode.UNAUTHENTICATED
            assert _call(ch, bearer(a)) == b"edge-a"
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # open to probes
        assert failures == ["missing", "invalid", "malformed", "missing", "invalid"]
    finally:
        server.stop()
