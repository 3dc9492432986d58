"""Is a sqs-cloud serving? The standard grpc.health.v1 Check, answered in one line.

`check` is what `sqs-cloud check HOST:PORT` runs (compose and Dockerfile healthchecks, demo.sh): the
answer of sqs_rpc.service.probe said for a person. `wait_serving` polls a probe until the cloud
serves (bench, linksim, tests). Imports grpc only: no torch, no model, so a healthcheck costs a
fraction of a second.
"""

from __future__ import annotations

import subprocess
import time
from typing import Callable

from sqs_rpc.service import SERVICE_NAME, probe

Probe = Callable[[str, float], "str | None"]  # (address, timeout_s) -> None when serving, else a reason


def check(address: str, timeout_s: float = 3.0, service: str = SERVICE_NAME, credentials=None) -> str | None:
    """None when `address` (HOST:PORT) reports `service` SERVING within timeout_s, else why not,
    in one line for an operator (sqs_rpc.service.probe asks; this says what its answer means).
    credentials: grpc.ChannelCredentials for a cloud that speaks TLS (None: plaintext)."""
    if credentials is None:
        serving, status = probe(address, timeout_s, service=service)
    else:
        import grpc

        with grpc.secure_channel(address, credentials) as channel:
            serving, status = probe(channel, timeout_s, service=service)
    if serving:
        return None
    code, failed, details = status.partition(": ")  # "CODE: details" when the Check itself failed
    if not failed:
        return f"{address}: {service} is {status}"
    if code == "DEADLINE_EXCEEDED":
        return f"{address} does not answer within {timeout_s:g} s"
    if code == "UNAVAILABLE":
        return f"{address} does not answer ({(details or 'unavailable').splitlines()[0]})"
    if code == "NOT_FOUND":
        return f"{address} answers but reports no health status for {service} (not a sqs-cloud?)"
    if code == "UNIMPLEMENTED":
        return f"{address} answers but has no grpc.health.v1 service (not a sqs-cloud?)"
    return f"{address}: health check failed: {code} {details}".rstrip()


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
