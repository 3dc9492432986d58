"""The routing key (edge/routing.py): every RPC of one generation carries the same x-sqs-route
metadata, and two generations carry different keys (what a proxy's ring hash routes on).

A byte-forwarding gRPC proxy in this process (the role Envoy plays in deploy/) records the
metadata of every call on its way to a real tiny cloud."""

from __future__ import annotations

from concurrent import futures

import grpc

from edge.client import ClientConfig
from edge.routing import ROUTE_HEADER
from edge.runtime import EdgeRuntime


class _RecordingProxy(grpc.GenericRpcHandler):
    def __init__(self, upstream: str) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.seen: list[tuple[str, str | None]] = []

    def service(self, details):
        method = details.method
        key = dict(details.invocation_metadata).get(ROUTE_HEADER)
        self.seen.append((method.rsplit("/", 1)[-1], key))
        if method.endswith("/Verify"):
            call = self.channel.stream_stream(method)
            return grpc.stream_stream_rpc_method_handler(lambda requests, ctx: call(requests))
        call = self.channel.unary_unary(method)
        return grpc.unary_unary_rpc_method_handler(lambda request, ctx: call(request))


def test_every_rpc_of_a_generation_carries_its_route_key(cloud, draft_engine):
    proxy = _RecordingProxy(cloud.address)
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[proxy])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        runtime = EdgeRuntime(draft_engine, ClientConfig(f"127.0.0.1:{port}"))
        config = runtime.draft_config({"draft_len": 2, "k": 4, "ell": 100})
        by_generation = []
        for _ in range(2):
            proxy.seen.clear()
            runtime.generate(runtime.encode("Hello"), config, max_new_tokens=6)
            by_generation.append(list(proxy.seen))
    finally:
        server.stop(0)
        proxy.channel.close()
    for seen in by_generation:
        methods = [m for m, _ in seen if m != "Check"]  # the connect probe is not the session's
        assert methods[0] == "OpenSession" and "Verify" in methods and methods[-1] == "CloseSession", seen
        keys = {k for m, k in seen if m != "Check"}
        assert len(keys) == 1 and None not in keys, seen
    assert by_generation[0][1][1] != by_generation[1][1][1]
