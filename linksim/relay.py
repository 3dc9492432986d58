"""A user-space TCP relay that delays each direction of a connection and counts its bytes.

    python -m linksim.relay --listen HOST:PORT --target HOST:PORT --delay-ms 25 [--jitter-ms 5]

Delay is applied per chunk with timestamps: a chunk read at time t is written at t + delay (+ jitter),
by a writer thread that works through a FIFO of (due time, bytes). The pipe keeps reading while
earlier chunks wait, so a fixed delay adds latency without reducing throughput (up to --max-buffer
bytes in flight per direction, like a bandwidth-delay product). Byte order is always preserved:
with jitter a chunk is never written before the one read before it (due times are made monotone).

Optional loss emulation (--loss P): with probability P a chunk is held back for an extra
--loss-penalty-ms, as a TCP retransmission after a lost segment would be; chunks behind it wait too
(head-of-line blocking, as in TCP). No byte is dropped: the relay sits above TCP.

The kernel has tbf but no netem here; rate shaping is left to tbf (see linksim/netns.py).

Counts: bytes forwarded per direction (uplink = listen side -> target, downlink = target -> listen
side), in total and per connection. --stats-file gets a JSON snapshot (written atomically) when a
connection closes, on SIGUSR1 and at exit; the same JSON is printed on stdout at exit.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass

from edge.tcp_relay import CHUNK, TcpRelay, shutdown_both


def parse_hostport(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {s!r}")
    return host.strip("[]"), int(port)


@dataclass
class DirectionDelay:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0  # uniform in [-jitter, +jitter], clipped so the delay never goes below 0
    loss: float = 0.0  # probability that a chunk is held back as if retransmitted
    loss_penalty_ms: float = 200.0

    def sample_s(self, rng: random.Random) -> tuple[float, bool]:
        """(delay in seconds, whether the chunk is held back as if lost)."""
        d = self.delay_ms
        if self.jitter_ms:
            d += rng.uniform(-self.jitter_ms, self.jitter_ms)
        held = bool(self.loss) and rng.random() < self.loss
        if held:
            d += self.loss_penalty_ms
        return max(d, 0.0) / 1e3, held


@dataclass
class ConnStats:
    id: int
    peer: str
    opened_unix: float
    closed_unix: float | None = None
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    uplink_chunks: int = 0
    downlink_chunks: int = 0
    held_back_chunks: int = 0  # loss emulation events


class _DelayedPipe:
    """One direction: a reader thread queues (due, data); a writer thread writes each when due."""

    def __init__(self, conn: "_Connection", src: socket.socket, dst: socket.socket, uplink: bool,
                 delay: DirectionDelay, rng: random.Random, max_buffer: int) -> None:
        self.conn, self.src, self.dst, self.uplink = conn, src, dst, uplink
        self.delay, self.rng, self.max_buffer = delay, rng, max_buffer
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued_bytes = 0
        self.cond = threading.Condition()
        self.last_due = 0.0
        self.done = threading.Event()
        name = "up" if uplink else "down"
        self.reader = threading.Thread(target=self._read, name=f"relay-{conn.stats.id}-{name}-r", daemon=True)
        self.writer = threading.Thread(target=self._write, name=f"relay-{conn.stats.id}-{name}-w", daemon=True)

    def start(self) -> None:
        self.reader.start()
        self.writer.start()

    def _push(self, data: bytes) -> None:
        now = time.monotonic()
        extra, held = self.delay.sample_s(self.rng)
        if data and held:
            with self.conn.relay.lock:
                self.conn.stats.held_back_chunks += 1
        due = max(now + extra, self.last_due)  # monotone: order is preserved whatever the jitter
        self.last_due = due
        with self.cond:
            while data and self.queued_bytes >= self.max_buffer and not self.conn.closing.is_set():
                self.cond.wait(0.5)
            self.queue.append((due, data))
            self.queued_bytes += len(data)
            self.cond.notify_all()

    def _read(self) -> None:
        try:
            while not self.conn.closing.is_set():
                data = self.src.recv(CHUNK)
                self._push(data)
                if not data:
                    return
        except OSError:
            self.conn.abort()
            with self.cond:
                self.cond.notify_all()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.conn.closing.is_set():
                        self.cond.wait(0.5)
                    if not self.queue:
                        return  # aborted
                    due, data = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if self.conn.closing.is_set():
                    return
                with self.cond:
                    self.queue.popleft()
                    self.queued_bytes -= len(data)
                    self.cond.notify_all()
                if not data:  # EOF from the source, delayed like data: half-close the destination
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                self.dst.sendall(data)
                self.conn.relay._count(self.conn.stats, self.uplink, len(data))
        except OSError:
            self.conn.abort()
        finally:
            self.done.set()
            self.conn._pipe_done()


class _Connection:
    def __init__(self, relay: "DelayRelay", client: socket.socket, upstream: socket.socket, stats: ConnStats) -> None:
        self.relay, self.client, self.upstream, self.stats = relay, client, upstream, stats
        self.closing = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self.pipes = [
            _DelayedPipe(self, client, upstream, True, relay.uplink_delay, random.Random(relay._seed_for(stats.id, 0)),
                         relay.max_buffer),
            _DelayedPipe(self, upstream, client, False, relay.downlink_delay,
                         random.Random(relay._seed_for(stats.id, 1)), relay.max_buffer),
        ]

    def start(self) -> None:
        for p in self.pipes:
            p.start()

    def abort(self) -> None:
        self.closing.set()
        shutdown_both(self.client, self.upstream)

    def _pipe_done(self) -> None:
        if not all(p.done.is_set() for p in self.pipes):
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.closing.set()
        for s in (self.client, self.upstream):
            try:
                s.close()
            except OSError:
                pass
        self.relay._closed_conn(self)


class DelayRelay(TcpRelay):
    """Accepts on listen, connects each client to target, delays and counts both directions."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *,
                 uplink_delay: DirectionDelay = DirectionDelay(), downlink_delay: DirectionDelay = DirectionDelay(),
                 seed: int | None = None, max_buffer: int = 4 * 1024 * 1024, stats_file: str | None = None,
                 connect_timeout_s: float = 10.0) -> None:
        super().__init__(listen, target, backlog=64, connect_timeout_s=connect_timeout_s, thread_name="relay-accept")
        self.uplink_delay, self.downlink_delay = uplink_delay, downlink_delay
        self.max_buffer = max_buffer
        self.stats_file = stats_file
        self._seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self.lock = threading.Lock()
        self.uplink_bytes = 0
        self.downlink_bytes = 0
        self.conns: list[ConnStats] = []
        self._live: set[_Connection] = set()
        self._next_id = 0

    def start(self) -> "DelayRelay":
        super().start()
        self.write_stats()
        return self

    def _seed_for(self, conn_id: int, direction: int) -> int:
        return (self._seed * 1_000_003 + conn_id * 2 + direction) % 2**63

    def _connect_failed(self, exc: OSError) -> None:
        print(f"linksim-relay: cannot connect to {self.target[0]}:{self.target[1]}: {exc}", file=sys.stderr, flush=True)

    def _connected(self, client: socket.socket, upstream: socket.socket, peer: tuple) -> None:
        self._next_id += 1  # only the accept thread gets here
        st = ConnStats(self._next_id, f"{peer[0]}:{peer[1]}", time.time())
        conn = _Connection(self, client, upstream, st)
        with self.lock:
            self.conns.append(st)
            self._live.add(conn)
        conn.start()

    def _count(self, st: ConnStats, uplink: bool, n: int) -> None:
        with self.lock:
            if uplink:
                self.uplink_bytes += n
                st.uplink_bytes += n
                st.uplink_chunks += 1
            else:
                self.downlink_bytes += n
                st.downlink_bytes += n
                st.downlink_chunks += 1

    def _closed_conn(self, conn: _Connection) -> None:
        with self.lock:
            conn.stats.closed_unix = time.time()
            self._live.discard(conn)
        self.write_stats()

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "listen": self.address,
                "target": f"{self.target[0]}:{self.target[1]}",
                "uplink_delay": asdict(self.uplink_delay),
                "downlink_delay": asdict(self.downlink_delay),
                "uplink_bytes": self.uplink_bytes,
                "downlink_bytes": self.downlink_bytes,
                "connections": len(self.conns),
                "open_connections": len(self._live),
                "per_connection": [asdict(c) for c in self.conns],
                "unix_time": time.time(),
            }

    def write_stats(self) -> None:
        if not self.stats_file:
            return
        tmp = f"{self.stats_file}.tmp{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "w") as f:
            json.dump(self.snapshot(), f)
        os.replace(tmp, self.stats_file)

    def close(self) -> None:
        self.stop_accepting()
        with self.lock:
            live = list(self._live)
        for c in live:
            c.abort()
        self.write_stats()


def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m linksim.relay", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, help="HOST:PORT to accept on (port 0: any free port)")
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="uniform jitter +- this, order preserved")
    ap.add_argument("--uplink-delay-ms", type=float, default=None, help="overrides --delay-ms for listen->target")
    ap.add_argument("--downlink-delay-ms", type=float, default=None, help="overrides --delay-ms for target->listen")
    ap.add_argument("--loss", type=float, default=0.0, help="probability a chunk is held back (retransmit emulation)")
    ap.add_argument("--loss-penalty-ms", type=float, default=200.0, help="extra delay of a held-back chunk")
    ap.add_argument("--seed", type=int, default=None, help="seed for jitter and loss draws")
    ap.add_argument("--max-buffer", type=int, default=4 * 1024 * 1024, help="bytes in flight per direction")
    ap.add_argument("--stats-file", default=None, help="JSON counters, rewritten when a connection closes")
    ap.add_argument("--quiet", action="store_true", help="do not print the stats JSON at exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_arg_parser().parse_args(argv)
    try:
        listen, target = parse_hostport(a.listen), parse_hostport(a.target)
        for v, name in ((a.delay_ms, "--delay-ms"), (a.jitter_ms, "--jitter-ms"), (a.loss_penalty_ms, "--loss-penalty-ms")):
            if v < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 0.0 <= a.loss < 1.0:
            raise ValueError("--loss must be in [0, 1)")
    except ValueError as exc:
        print(f"linksim-relay: error: {exc}", file=sys.stderr)
        return 2

    def direction(override: float | None) -> DirectionDelay:
        return DirectionDelay(a.delay_ms if override is None else override, a.jitter_ms, a.loss, a.loss_penalty_ms)

    try:
        relay = DelayRelay(listen, target, uplink_delay=direction(a.uplink_delay_ms),
                           downlink_delay=direction(a.downlink_delay_ms), seed=a.seed, max_buffer=a.max_buffer,
                           stats_file=a.stats_file)
    except OSError as exc:
        print(f"linksim-relay: error: cannot listen on {a.listen}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: relay.write_stats())
    relay.start()
    print(f"linksim-relay: listening on {relay.address} -> {a.target} "
          f"(delay {relay.uplink_delay.delay_ms:g}/{relay.downlink_delay.delay_ms:g} ms up/down, "
          f"jitter {a.jitter_ms:g} ms, loss {a.loss:g})", flush=True)
    while not stop.wait(1.0):
        pass
    relay.close()
    if not a.quiet:
        print(json.dumps(relay.snapshot()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
