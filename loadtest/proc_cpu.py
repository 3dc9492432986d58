"""CPU seconds of other processes from /proc, for the load test's "cloud CPU per committed token".

    meter = CpuMeter([pid], scope="process")    # the processes that serve (cloud, llama-server)
    meter.start(); ...; meter.stop()           # {"cpu_s": ..., "pids": ..., "reason": ...}

utime + stime of /proc/<pid>/stat (every thread of the process; clock ticks of SC_CLK_TCK). Nothing
here raises for a process that is gone or unreadable: the figure is None and `reason` says why, so a
level is never lost to its CPU accounting. ``listener_pids(port)`` finds the processes that listen
on a TCP port (/proc/net/tcp{,6} LISTEN sockets, matched to /proc/*/fd links): the pids of an
external cloud given only by its address. Linux only; elsewhere every reading is None with a reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

PROC = Path("/proc")
_TCP_LISTEN = "0A"  # st column of /proc/net/tcp


def clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcTimes:
    """One reading of a process: its CPU seconds and its start time (in ticks since boot), which
    tells a process from a later one that got the same pid."""

    pid: int
    cpu_s: float
    start_ticks: int
    comm: str


def read_times(pid: int, proc: Path = PROC) -> ProcTimes | str:
    """The process's CPU time so far, or why it cannot be read (one line)."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return f"no process {pid}"
    except OSError as exc:
        return f"cannot read /proc/{pid}/stat: {exc.strerror or exc}"
    # comm (field 2) is in parentheses and may hold spaces or ')': split at the last ')'
    head, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 20:
        return f"/proc/{pid}/stat is not what Linux writes"
    comm = head.partition("(")[2]
    # fields[0] is field 3 (state): utime is field 14, stime 15, starttime 22
    try:
        utime, stime, start = int(fields[11]), int(fields[12]), int(fields[19])
    except ValueError:
        return f"/proc/{pid}/stat is not what Linux writes"
    return ProcTimes(pid, (utime + stime) / clock_ticks(), start, comm)


def cpu_seconds(pid: int) -> tuple[float | None, str]:
    """(utime + stime in seconds, "") or (None, why)."""
    t = read_times(pid)
    return (t.cpu_s, "") if isinstance(t, ProcTimes) else (None, t)


def listening_inodes(port: int, proc: Path = PROC) -> set[int]:
    """Socket inodes of TCP sockets in LISTEN on `port` (any local address, IPv4 and IPv6), as this
    process's network namespace sees them."""
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != _TCP_LISTEN:
                continue
            local_port = cols[1].rpartition(":")[2]
            if int(local_port, 16) == port:
                inodes.add(int(cols[9]))
    return inodes


def pids_holding(inodes: Iterable[int], proc: Path = PROC) -> tuple[list[int], int]:
    """(pids whose open files include one of these sockets, processes whose fds could not be read:
    another user's, or gone while scanned)."""
    wanted = {f"socket:[{i}]" for i in inodes}
    found, unreadable = [], 0
    if not wanted:
        return found, unreadable
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # permission, or the process exited
            unreadable += 1
            continue
        if wanted.intersection(_links(fds)):
            found.append(int(entry.name))
    return sorted(found), unreadable


def _links(fds: Iterable[Path]) -> set[str]:
    """Targets of fd links; an fd closed since it was listed (the listing's own, say) is skipped."""
    out = set()
    for fd in fds:
        try:
            out.add(os.readlink(fd))
        except OSError:
            continue
    return out


def listener_pids(port: int, proc: Path = PROC) -> tuple[list[int], str]:
    """(pids listening on TCP `port`, "") or ([], why none were found)."""
    inodes = listening_inodes(port, proc)
    if not inodes:
        return [], f"no TCP socket listens on port {port} in this network namespace"
    pids, unreadable = pids_holding(inodes, proc)
    if not pids:
        return [], (f"port {port} listens, but no readable process holds the socket "
                    f"({unreadable} processes' fds unreadable: another user's or another container's)")
    return pids, ""


@dataclass
class CpuMeter:
    """CPU seconds of `pids` (summed) between start() and stop().

    scope says what the figure covers ("process incl. edges" for a cloud in the load test's own
    process); reason, when no pids are known, why (it becomes the result's reason). A process that
    exits or restarts between the readings makes the figure None: a partial sum would understate it.
    """

    pids: Sequence[int]
    scope: str = "process"
    reason: str = ""
    proc: Path = PROC
    _start: dict[int, ProcTimes] = field(default_factory=dict, repr=False)
    _started: bool = field(default=False, repr=False)
    _start_error: str = field(default="", repr=False)

    def start(self) -> None:
        """Never raises: it may run as a threading.Barrier action, where an exception breaks the barrier."""
        self._started = True
        try:
            for pid in self.pids:
                t = read_times(pid, self.proc)
                if isinstance(t, str):
                    self._start_error = self._start_error or t
                else:
                    self._start[pid] = t
        except Exception as exc:  # a /proc we cannot parse: the level runs on, without a figure
            self._start_error = f"reading /proc failed: {exc!r}"

    def stop(self) -> dict:
        """{"cpu_s", "resolution_s" (one clock tick), "pids", "processes" (their names), "scope",
        "reason"}; cpu_s None with a reason."""
        out = {"cpu_s": None, "resolution_s": 1 / clock_ticks(), "pids": list(self.pids), "processes": [],
               "scope": self.scope, "reason": self.reason}
        if not self.pids:
            out["reason"] = self.reason or "no process to measure"
            return out
        if not self._started:
            out["reason"] = "no measured phase"
            return out
        if self._start_error:
            out["reason"] = self._start_error
            return out
        total = 0.0
        for pid in self.pids:
            t = read_times(pid, self.proc)
            if isinstance(t, str):
                out["reason"] = f"{t} at the end of the measured phase"
                return out
            if t.start_ticks != self._start[pid].start_ticks:
                out["reason"] = f"process {pid} restarted during the measured phase"
                return out
            out["processes"].append(t.comm)
            total += t.cpu_s - self._start[pid].cpu_s
        out["cpu_s"] = round(total, 6)  # whole ticks: the float sum's noise is no information
        return out
