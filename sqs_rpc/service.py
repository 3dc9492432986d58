"""The cloud's gRPC service, named once, and the one way to ask whether a cloud serves it.

The cloud registers `SERVICE_NAME` ("sqs.v1.Verifier", taken from the proto's descriptor) beside
the standard grpc.health.v1 service and reports it SERVING once it can verify (docs/DESIGN.md
section 8). Whoever asks whether a cloud serves (`sqs-cloud check`, the edge's /healthz and its
client, benchmarks, tests) asks through `probe`. It knows gRPC, so it is not in common/.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb.v1 import sqs_pb2

SERVICE = sqs_pb2.DESCRIPTOR.services_by_name["Verifier"]  # the descriptor: its RPCs and their types
SERVICE_NAME: str = SERVICE.full_name  # "sqs.v1.Verifier"


def probe(target: str | grpc.Channel, timeout_s: float, *, service: str = SERVICE_NAME,
          wait_for_ready: bool = False) -> tuple[bool, str]:
    """(serving, status) of `service` at `target` by one grpc.health.v1 Check within timeout_s seconds.

    target: "HOST:PORT" (a direct plaintext connection, opened and closed here; an http_proxy in
    the environment never carries it), or a channel the caller owns (TLS, its own options; left
    open). service: "" asks about the server as a whole. wait_for_ready: wait up to timeout_s for
    the connection instead of failing at once while the cloud is not listening yet.

    serving is True exactly when the answer is SERVING. status is the answer's ServingStatus name
    ("SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", "UNKNOWN"), or, when the Check itself failed,
    "CODE: details" with the gRPC status code's name ("UNAVAILABLE: failed to connect ...",
    "DEADLINE_EXCEEDED: ...", "NOT_FOUND: ..." for a server that has no status for `service`).
    """
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) if isinstance(target, str) \
        else target
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=timeout_s, wait_for_ready=wait_for_ready)
    except grpc.RpcError as exc:
        return False, f"{exc.code().name}: {exc.details() or ''}"
    finally:
        if channel is not target:
            channel.close()
    return (reply.status == health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
