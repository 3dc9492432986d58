"""Per-replica counts of cloud replicas behind a router, from each replica's /metrics: `scrape`
reads one endpoint, `ReplicaMeter` samples them through a run (rounds, sessions, active sessions;
restarts counted as Prometheus' increase() does), `replica_table` prints them. Used by
`sqs-loadtest --cloud-metrics` (loadtest/runner.py), the soak (loadtest/soak.py) and the tests."""

from __future__ import annotations

import http.client
import urllib.request
from collections import defaultdict


def _samples(address: str, timeout_s: float):
    """Every sample of a /metrics endpoint (prometheus_client's parser); OSError when it does not answer,
    ValueError when the text is not Prometheus' format."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
    except http.client.HTTPException as exc:  # a replica killed mid-answer (IncompleteRead): not an OSError
        raise OSError(f"{address}/metrics: {exc!r}") from exc
    for family in text_string_to_metric_families(text):
        yield from family.samples


def scrape(address: str, timeout_s: float = 3.0) -> dict[str, float]:
    """A /metrics endpoint as {sample name: value summed over labels} (counters' _total included)."""
    out: dict[str, float] = defaultdict(float)
    for s in _samples(address, timeout_s):
        out[s.name] += s.value
    return dict(out)


def scrape_labels(address: str, name: str, timeout_s: float = 3.0) -> list[dict[str, str]]:
    """The label sets of the samples called `name` at a /metrics endpoint (an info gauge such as
    sqs_cloud_info: the facts are in the labels); [] when it exports none."""
    return [dict(s.labels) for s in _samples(address, timeout_s) if s.name == name]


COUNTERS = {"rounds": "sqs_batches_total", "sessions": "sqs_sessions_opened_total"}
# the verification passes' histograms (common/metrics.py): count = passes, sums = sessions and rows
PASS_SAMPLES = {"passes": "sqs_pass_sessions_count", "rounds": "sqs_pass_sessions_sum", "rows": "sqs_pass_rows_sum"}


def pass_totals(addresses: list[str] | tuple[str, ...], timeout_s: float = 3.0) -> dict[str, float] | None:
    """Verification passes, the rounds they served and their rows so far, summed over the replicas'
    /metrics; None when one does not answer or exports no pass histogram (a sum over part of the
    replicas would understate the load they shared)."""
    out = dict.fromkeys(PASS_SAMPLES, 0.0)
    for address in addresses:
        try:
            now = scrape(address, timeout_s)
        except (OSError, ValueError):
            return None
        if any(name not in now for name in PASS_SAMPLES.values()):
            return None
        for key, name in PASS_SAMPLES.items():
            out[key] += now[name]
    return out


class ReplicaMeter:
    """Per-replica counts over a run, from each replica's /metrics (HOST:PORT), sampled every
    interval_s in a thread: rounds (sqs_batches_total), sessions opened (sqs_sessions_opened_total,
    None where the cloud does not export it), and sqs_active_sessions (peak and mean of the
    samples). Counters are summed as Prometheus' increase() does: a replica restarted (its counters
    back at 0) adds what it counted since. A scrape that fails (a dead replica) is counted."""

    def __init__(self, addresses: list[str] | tuple[str, ...], interval_s: float = 0.5) -> None:
        import threading

        self.addresses = list(addresses)
        self.interval_s = interval_s
        self._last: list[dict[str, float] | None] = [None] * len(self.addresses)
        self._sum = [{k: 0.0 for k in COUNTERS} for _ in self.addresses]
        self._seen = [set() for _ in self.addresses]  # counters a replica exported at least once
        self._active: list[list[float]] = [[] for _ in self.addresses]
        self._failed = [0] * len(self.addresses)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-meter", daemon=True)

    def start(self) -> "ReplicaMeter":
        self.sample()  # the baseline
        self._thread.start()
        return self

    def sample(self) -> None:
        for i, address in enumerate(self.addresses):
            try:
                now = scrape(address, timeout_s=2.0)
            except OSError:
                self._failed[i] += 1
                continue
            prev = self._last[i]
            for key, name in COUNTERS.items():
                if name not in now:
                    continue
                self._seen[i].add(key)
                if prev is not None:
                    before = prev.get(name, 0.0)
                    self._sum[i][key] += now[name] - before if now[name] >= before else now[name]
            self._active[i].append(now.get("sqs_active_sessions", 0.0))
            self._last[i] = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> list[dict]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.sample()
        out = []
        for i, address in enumerate(self.addresses):
            active = self._active[i]
            out.append({
                "metrics": address,
                "rounds": int(self._sum[i]["rounds"]),
                "sessions": int(self._sum[i]["sessions"]) if "sessions" in self._seen[i] else None,
                "active_sessions_peak": max(active, default=0.0),
                "active_sessions_mean": sum(active) / len(active) if active else 0.0,
                "failed_scrapes": self._failed[i],
            })
        return out


def replica_table(rows: list[dict]) -> str:
    """The per-replica counts as a small table (shares of the rounds and of the sessions)."""
    rounds = sum(r["rounds"] for r in rows) or 1
    in_logs = all(r["sessions"] is None and r.get("sessions_in_log") is not None for r in rows)
    if in_logs:  # replicas this process started: their logs name every session they opened
        rows = [{**r, "sessions": r["sessions_in_log"]} for r in rows]
    known = [r["sessions"] for r in rows if r["sessions"] is not None]
    sessions = sum(known) or 1
    lines = [f"{'replica':<22} {'rounds':>7} {'share':>6} {'sessions':>8} {'share':>6} {'active_peak':>11} "
             f"{'failed_scrapes':>14}"]
    for r in rows:
        s = r["sessions"]
        lines.append(f"{r['metrics']:<22} {r['rounds']:>7d} {r['rounds'] / rounds:>6.1%} "
                     f"{'-' if s is None else s:>8} {'-' if s is None else f'{s / sessions:.1%}':>6} "
                     f"{r['active_sessions_peak']:>11.0f} {r['failed_scrapes']:>14d}")
    if in_logs:
        lines.append("sessions: opened or re-opened there, from the replicas' logs (the clouds export no "
                     "sqs_sessions_opened_total)")
    elif len(known) < len(rows):
        lines.append("sessions: '-' where the cloud exports no sqs_sessions_opened_total")
    return "\n".join(lines)
