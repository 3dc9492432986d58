"""loadtest/proc_cpu.py and loadtest/provenance.py: CPU seconds of a process from /proc, the processes
listening on a port, and what a load-test record says ran (commit, which pids are the cloud)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest import proc_cpu
from loadtest.proc_cpu import CpuMeter, cpu_seconds, listener_pids, listening_inodes, read_times
from bench.machine import code_commit
from loadtest.provenance import external_cloud_pids

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc")


@pytest.fixture
def busy_child():
    """A child that spins on one CPU until killed."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_busy_childs_cpu_seconds_grow(busy_child):
    first, why = cpu_seconds(busy_child.pid)
    assert first is not None and why == ""
    meter = CpuMeter([busy_child.pid], scope="process")
    meter.start()
    time.sleep(0.5)
    out = meter.stop()
    later, _ = cpu_seconds(busy_child.pid)
    assert later > first
    # a spinning process gets CPU while it is runnable; 0.1 s of 0.5 leaves room for a loaded machine
    assert out["cpu_s"] >= 0.1 and out["reason"] == "", out
    assert out["pids"] == [busy_child.pid] and out["processes"] and out["resolution_s"] > 0


def test_a_process_that_ended_reads_none_with_a_reason(busy_child):
    meter = CpuMeter([busy_child.pid])
    meter.start()
    busy_child.kill()
    busy_child.wait()
    out = meter.stop()
    assert out["cpu_s"] is None and f"no process {busy_child.pid}" in out["reason"]
    assert cpu_seconds(busy_child.pid) == (None, f"no process {busy_child.pid}")


def test_bad_pids_read_none_with_a_reason():
    value, why = cpu_seconds(2**31 - 1)  # above any pid_max
    assert value is None and why == f"no process {2**31 - 1}"
    out = CpuMeter([2**31 - 1]).stop()
    assert out["cpu_s"] is None and out["reason"] == "no measured phase"
    meter = CpuMeter([2**31 - 1])
    meter.start()
    assert meter.stop()["cpu_s"] is None and "no process" in meter.stop()["reason"]
    empty = CpuMeter([], reason="nothing listens").stop()
    assert empty["cpu_s"] is None and empty["reason"] == "nothing listens"


def _fake_stat(proc: Path, pid: int, comm: str, utime: int, stime: int, start: int) -> None:
    fields = ["S", "1", "1", "1", "0", "-1", "4194304", "0", "0", "0", "0", str(utime), str(stime), "0", "0", "20",
              "0", "3", "0", str(start), "0", "0"]
    (proc / str(pid)).mkdir(parents=True, exist_ok=True)
    (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")


def test_stat_parsing_a_comm_with_spaces_and_parentheses(tmp_path):
    ticks = os.sysconf("SC_CLK_TCK")
    _fake_stat(tmp_path, 7, "odd) name (x", utime=3 * ticks, stime=ticks, start=1234)
    t = read_times(7, tmp_path)
    assert t.comm == "odd) name (x" and t.cpu_s == pytest.approx(4.0) and t.start_ticks == 1234
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "stat").write_text("8 (short) S 1\n")
    assert read_times(8, tmp_path) == "/proc/8/stat is not what Linux writes"


def test_a_restarted_process_reads_none(tmp_path):
    """The same pid with another start time is another process: its CPU is not a difference."""
    _fake_stat(tmp_path, 9, "sqs-cloud", utime=100, stime=0, start=50)
    meter = CpuMeter([9], proc=tmp_path)
    meter.start()
    _fake_stat(tmp_path, 9, "sqs-cloud", utime=120, stime=5, start=50)
    assert meter.stop()["cpu_s"] == pytest.approx(25 / os.sysconf("SC_CLK_TCK"))
    _fake_stat(tmp_path, 9, "sqs-cloud", utime=10, stime=0, start=900)
    out = meter.stop()
    assert out["cpu_s"] is None and "restarted" in out["reason"]


def test_the_listener_lookup_finds_a_socket_this_test_opens():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        connected = socket.socket()  # a bound, not listening socket on another port is not a listener
        try:
            assert listener_pids(port)[0] == []  # bound, not yet listening
            s.listen()
            connected.connect(("127.0.0.1", port))
            pids, why = listener_pids(port)
            assert pids == [os.getpid()] and why == ""
            assert len(listening_inodes(port)) == 1  # the accepted connection's socket is no LISTEN
        finally:
            connected.close()
    pids, why = listener_pids(port)
    assert pids == [] and f"no TCP socket listens on port {port}" in why


def test_the_listener_lookup_reads_ipv6_and_ignores_other_states(tmp_path):
    (tmp_path / "net").mkdir()
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    row = "   0: {local} 00000000:0000 {st} 00000000:00000000 00:00000000 00000000  1000        0 {inode} 1 0 0 10 0\n"
    (tmp_path / "net" / "tcp").write_text(head + row.format(local="0100007F:C351", st="01", inode=11)
                                          + row.format(local="0100007F:1F90", st="0A", inode=12))
    (tmp_path / "net" / "tcp6").write_text(head + row.format(local="00000000000000000000000001000000:C351", st="0A",
                                                             inode=13))
    assert listening_inodes(0xC351, tmp_path) == {13}
    assert listening_inodes(0x1F90, tmp_path) == {12}
    assert listening_inodes(1, tmp_path) == set()


def test_which_pids_are_the_external_cloud():
    with socket.socket() as s, socket.socket() as m:
        for sock in (s, m):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        address, metrics = f"127.0.0.1:{s.getsockname()[1]}", f"127.0.0.1:{m.getsockname()[1]}"
        assert external_cloud_pids(address, (5, 5, 3), ())["pids"] == [3, 5]
        by_port = external_cloud_pids(address, (), ())
        assert by_port["pids"] == [os.getpid()] and by_port["source"].startswith("listener of port")
        by_metrics = external_cloud_pids(address, (), (metrics,))
        assert by_metrics["pids"] == [os.getpid()] and "--cloud-metrics" in by_metrics["source"]


def test_a_router_is_not_the_cloud(monkeypatch):
    monkeypatch.setattr("loadtest.provenance.listener_pids", lambda port: ([4242], ""))
    monkeypatch.setattr("loadtest.provenance.read_times",
                        lambda pid: proc_cpu.ProcTimes(pid, 1.0, 1, "envoy"))
    out = external_cloud_pids("127.0.0.1:10000", (), ())
    assert out["pids"] == [] and "envoy (pid 4242)" in out["reason"] and "--cloud-pid" in out["reason"]


def test_code_commit_inside_and_outside_a_git_tree(tmp_path):
    commit = code_commit()
    if commit is not None:  # this checkout is a git tree (an unpacked sdist is not)
        assert re.fullmatch(r"[0-9a-f]{4,40}(-dirty)?", commit), commit
    assert code_commit(tmp_path) is None
