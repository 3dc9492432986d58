"""Is a sqs-cloud serving? The standard grpc.health.v1 Check, answered in one line.

`check` is what `sqs-cloud check HOST:PORT` runs (compose and Dockerfile healthchecks, demo.sh);
`wait_serving` polls a probe until the cloud serves (bench, linksim, tests). Imports grpc only: no
torch, no model, so a healthcheck costs a fraction of a second.
"""

from __future__ import annotations

import subprocess
import time
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb.v1 import sqs_pb2

VERIFIER_SERVICE = sqs_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name  # "sqs.v1.Verifier"

Probe = Callable[[str, float], "str | None"]  # (address, timeout_s) -> None when serving, else a reason


def check(address: str, timeout_s: float = 3.0, service: str = VERIFIER_SERVICE) -> str | None:
    """None when `address` (HOST:PORT) reports `service` SERVING within timeout_s, else why not."""
    # A direct connection: an http_proxy in the environment must not carry a health probe.
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"{address} does not answer within {timeout_s:g} s"
            if code == grpc.StatusCode.UNAVAILABLE:
                return f"{address} does not answer ({(exc.details() or 'unavailable').splitlines()[0]})"
            if code == grpc.StatusCode.NOT_FOUND:
                return f"{address} answers but reports no health status for {service} (not a sqs-cloud?)"
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return f"{address} answers but has no grpc.health.v1 service (not a sqs-cloud?)"
            return f"{address}: health check failed: {code.name} {exc.details() or ''}".rstrip()
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {service} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


class NotServing(RuntimeError):
    """The cloud did not serve in time, or its process exited first (the message says which)."""


def wait_serving(address: str, timeout_s: float, *, process: subprocess.Popen | None = None,
                 probe: Probe = check, interval_s: float = 0.25, probe_timeout_s: float = 2.0) -> None:
    """Return once `probe(address)` reports SERVING; NotServing after timeout_s or when `process`
    (the cloud, if this caller started it) exits first. The last probe's reason is in the message."""
    deadline = time.monotonic() + timeout_s
    while True:
        reason = probe(address, min(probe_timeout_s, max(0.1, deadline - time.monotonic())))
        if reason is None:
            return
        if process is not None and process.poll() is not None:
            raise NotServing(f"sqs-cloud exited with status {process.returncode} before serving ({reason})")
        if time.monotonic() >= deadline:
            raise NotServing(f"sqs-cloud not serving within {timeout_s:g} s: {reason}")
        time.sleep(interval_s)
