"""The routing key: one stable value per generation, sent as gRPC metadata on every RPC of it.

A proxy in front of several cloud replicas (Envoy's ring_hash / maglev on the header, deploy/)
keeps all of a generation's RPCs (OpenSession, the Verify stream, CloseSession, and a re-open
after a replica died) on one replica, which holds the session's KV cache. The key is random per
generation and means nothing else: the cloud never trusts it for anything but routing.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable

import grpc

ROUTE_HEADER = "x-sqs-route"


def new_route_key() -> str:
    return secrets.token_hex(12)


class RouteKeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds (ROUTE_HEADER, key) to the metadata of every unary and bidi-streaming call."""

    def __init__(self, key: str) -> None:
        self.key = key

    def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or ()) + [(ROUTE_HEADER, self.key)]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation: Callable, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
