"""One concurrency level of the load test, whoever the clients are: n client threads, warm-up, a
barrier, then tickets from a shared counter until ``requests`` are issued or ``duration_s`` has
passed (loadtest/runner.py describes the rules). The clients' loop is handed in: our edge's
(loadtest.runner) or llama-server's (loadtest.llama_levels). The serving processes' CPU
(loadtest/proc_cpu.CpuMeter) is read when the measured phase starts and once every client is done,
and the load average when the level starts."""

from __future__ import annotations

import sys
import threading
import time
from typing import IO

from loadtest.config import LoadTestConfig
from loadtest.proc_cpu import CpuMeter
from bench.machine import loadavg
from loadtest.report import RequestRecord


class Level:
    """Shared state of one concurrency level: its tickets (claim), the measured phase's start, the records."""

    def __init__(self, n: int, config: LoadTestConfig, stop: threading.Event, cpu: CpuMeter | None = None,
                 edge_cpu: CpuMeter | None = None) -> None:
        self.n = n
        self.config = config
        self.stop = stop
        self.lock = threading.Lock()
        self.issued = 0
        self.records: list[RequestRecord] = []
        self.warm_done = 0
        self.warm_errors = 0
        self.cancelled = 0
        self.t0: float | None = None  # measured phase start (perf_counter)
        self.deadline = float("inf")
        self.stopped_by = ""
        self.target_model = ""
        self.cpu = cpu  # the serving processes' CPU over the measured phase
        self.cpu_result: dict | None = None
        self.edge_cpu = edge_cpu  # the clients' own process (our edges) over the same phase
        self.edge_cpu_result: dict | None = None
        self.loadavg: list[float] | None = None  # at the level's start, before its clients run

    def start(self) -> None:  # Barrier action: runs once, when the last client arrives
        for meter in (self.cpu, self.edge_cpu):
            if meter is not None:
                meter.start()  # never raises (an exception here would break the barrier)
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + self.config.duration_s

    def claim(self) -> int | None:
        with self.lock:
            if self.stop.is_set():
                self.stopped_by = "interrupted"
                return None
            if self.issued >= self.config.requests:
                self.stopped_by = self.stopped_by or "requests"
                return None
            if time.perf_counter() >= self.deadline:
                self.stopped_by = self.stopped_by or "duration"
                return None
            t = self.issued
            self.issued += 1
            return t


def run_level(sh, config: LoadTestConfig, n: int, progress_file: IO[str] | None, client_loop, *,
              label: str = "", cpu: CpuMeter | None = None, edge_cpu: CpuMeter | None = None) -> Level:
    """One level: n threads running `client_loop(sh, lv, client, barrier, level_t0)` (our edge's:
    loadtest.runner; llama-server's: loadtest.llama_levels); `sh` is the clients' shared state and
    needs a `stop` event. Ctrl-C sets it, and the clients stop at their next ticket. `cpu`: the
    serving processes, read at the measured phase's start and end (lv.cpu_result); `edge_cpu` the
    clients' process, read the same way (lv.edge_cpu_result)."""
    from tqdm import tqdm

    lv = Level(n, config, sh.stop, cpu, edge_cpu)
    lv.loadavg = loadavg()
    barrier = threading.Barrier(n, action=lv.start)
    level_t0 = time.perf_counter()
    threads = [
        threading.Thread(target=client_loop, args=(sh, lv, c, barrier, level_t0), name=f"loadtest-client-{c}",
                         daemon=True)
        for c in range(n)
    ]
    bar = tqdm(total=config.requests, desc=f"{label}N={n:<3d} warm-up", unit="req", file=progress_file or sys.stderr,
               disable=not config.progress, dynamic_ncols=True, leave=True)
    for t in threads:
        t.start()
    shown = 0
    measuring = False
    try:
        try:
            while True:
                alive = [t for t in threads if t.is_alive()]
                if not alive:
                    break
                alive[0].join(0.1)
                if lv.t0 is not None and not measuring:
                    measuring = True
                    bar.set_description(f"{label}N={n:<3d}", refresh=False)
                    bar.reset(total=config.requests)  # the rate counts from the measured phase
                with lv.lock:
                    done = len(lv.records)
                    errors = sum(1 for r in lv.records if not r.ok)
                if done > shown:
                    bar.update(done - shown)
                    shown = done
                    bar.set_postfix(errors=errors, refresh=False)
        except KeyboardInterrupt:
            sh.stop.set()
            barrier.abort()
            bar.write(f"sqs-loadtest: interrupted; waiting for the {n} client(s) to stop (Ctrl-C again to quit)",
                      file=progress_file or sys.stderr)
            for t in threads:
                while t.is_alive():
                    t.join(0.1)
    finally:
        bar.close()
    if cpu is not None:  # every client is done: the measured phase has ended
        lv.cpu_result = cpu.stop()
    if edge_cpu is not None:
        lv.edge_cpu_result = edge_cpu.stop()
    if sh.stop.is_set():
        lv.stopped_by = "interrupted"
    return lv
