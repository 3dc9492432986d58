"""What ran, for every load-test record: the code's commit, the machine (CPU flags as every benchmark
records them: bench/machine.py, and the fingerprint the pass tables are keyed by), the load average,
which processes are "the cloud" whose CPU a level charges to its tokens (loadtest/proc_cpu.py), and
the cloud's engine and batching as the cloud reports them (sqs_cloud_info: cloud/server.py CloudInfo)."""

from __future__ import annotations

import os
import platform
from typing import Mapping, Sequence

from bench.machine import code_commit
from loadtest.proc_cpu import listener_pids, read_times

SCOPE_IN_PROCESS = "process incl. edges"  # the in-process cloud shares this process with the edges' drafting
CLOUD_INFO = "sqs_cloud_info"  # the cloud's info gauge (common/metrics.py)
REPORTED = "reported by the cloud"


def machine() -> dict:
    """The CPU as the benchmarks record it, and what this process may use."""
    from bench.machine import cpu_flags
    from sqs_models.pass_table import cpu_fingerprint

    return {"cpu_flags": cpu_flags(), "cpu_fingerprint": cpu_fingerprint(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "python": platform.python_version()}


def run_info() -> dict:
    """Run-level "what ran": commit and machine."""
    return {"commit": code_commit(), **machine()}


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _is_router(pid: int) -> bool:
    """Envoy listens in front of the replicas: its CPU is not the verifier's."""
    t = read_times(pid)
    return not isinstance(t, str) and t.comm == "envoy"


def external_cloud_pids(address: str, given: tuple[int, ...], metrics: tuple[str, ...]) -> dict:
    """Which processes are the external cloud: {"pids", "source", "reason"}.

    --cloud-pid when given; else the listeners of the --cloud-metrics ports (each replica serves its
    own /metrics, while --cloud may be a router in front of them); else the listener of --cloud's
    port (loopback only, so it is a process on this machine, unless it is in another container).
    """
    if given:
        return {"pids": sorted(set(given)), "source": "--cloud-pid", "reason": ""}
    ports = [_port(m) for m in metrics] if metrics else [_port(address)]
    source = "listeners of --cloud-metrics ports" if metrics else f"listener of port {ports[0]}"
    pids: set[int] = set()
    for port in ports:
        found, why = listener_pids(port)
        if not found:
            return {"pids": [], "source": source, "reason": f"{why}; give --cloud-pid"}
        pids.update(found)
    routers = sorted(p for p in pids if _is_router(p))
    if routers:
        return {"pids": [], "source": source,
                "reason": f"the listener is envoy (pid {', '.join(map(str, routers))}), a router, not the verifier; "
                          "give --cloud-pid or --cloud-metrics (each replica's /metrics)"}
    return {"pids": sorted(pids), "source": source, "reason": ""}


def reported_cloud(labels: Mapping[str, str], where: str) -> dict:
    """The cloud record's engine and batching fields from sqs_cloud_info's labels (CloudInfo.labels for
    an in-process cloud: one reading for both). "" is "not known" there, None here; a window and a
    row limit are recorded only with batching on, as the record has always had them."""
    def text(key: str) -> str | None:
        return labels.get(key) or None

    def number(key: str, kind: type) -> int | float | None:
        try:
            return kind(labels[key]) if labels.get(key) else None
        except ValueError:  # a cloud of another version: the fact is unknown, not the record broken
            return None

    on = {"on": True, "off": False}.get(labels.get("batching", ""))
    return {
        "engine": text("engine"), "weight_type": text("weight_type"), "dtype": text("dtype"),
        "detail": text("detail"), "threads": number("threads", int), "workers": number("workers", int),
        "engine_source": REPORTED, "engine_note": where,
        "batching": {"on": on, "window_ms": number("batch_window_ms", float) if on else None,
                     "max_rows": number("batch_max_rows", int) if on else None,
                     "rejoin": number("batch_rejoin", float) if on else None, "source": REPORTED},
    }


def scrape_cloud_reports(addresses: Sequence[str], timeout_s: float = 3.0) -> tuple[dict[str, str] | None, dict, str]:
    """sqs_cloud_info of each /metrics endpoint (HOST:PORT): (the labels they all report, or None;
    {address: labels, or why there are none}; a note saying which reported, or why nothing is used).
    Replicas that report different facts give None: one record cannot say which served a level."""
    from loadtest.replica_counts import scrape_labels

    reports: dict[str, dict[str, str] | str] = {}
    for address in addresses:
        try:
            found = scrape_labels(address, CLOUD_INFO, timeout_s)
        except (OSError, ValueError) as exc:  # no answer, or not Prometheus' text
            reports[address] = f"scrape failed: {exc}"
            continue
        reports[address] = found[0] if len(found) == 1 else (
            f"{len(found)} {CLOUD_INFO} samples" if found else f"no {CLOUD_INFO} (a cloud of an older version?)")
    got = {a: r for a, r in reports.items() if isinstance(r, dict)}
    distinct = {tuple(sorted(r.items())) for r in got.values()}
    if len(distinct) == 1:
        missing = [a for a in reports if a not in got]
        note = (f"{CLOUD_INFO} on {', '.join(f'{a}/metrics' for a in got)}"
                + (f"; not from {', '.join(missing)} (see cloud_reports)" if missing else ""))
        return next(iter(got.values())), reports, note
    if distinct:
        return None, reports, f"the replicas report different {CLOUD_INFO} (see cloud_reports)"
    return None, reports, f"no {CLOUD_INFO} from {', '.join(addresses)} (see cloud_reports)"
