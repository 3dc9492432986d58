"""The core of a TCP relay: accept on one address, connect each client to a target, forward bytes.

Two relays build on it: edge.wire_meter (counts the bytes of the edge's gRPC connection) and
linksim.relay (delays each direction, for the link simulator). It lives in edge/ because the edge
needs it at run time; linksim, a test and bench tool, imports it from here, never the other way.

A subclass says what happens to each connected pair (`_connected`) and to a target that cannot be
reached (`_connect_failed`); `pump` is the plain forwarder of one direction.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

CHUNK = 65536  # bytes read at a time


def shutdown_both(*socks: socket.socket) -> None:
    """Shut both directions of each socket down, ignoring those already gone."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def pump(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> None:
    """Forward src -> dst until EOF or an error; count(n) runs before each chunk is forwarded.

    At the end both sockets are shut down, so the other direction's pump ends too."""
    try:
        while data := src.recv(CHUNK):
            count(len(data))
            dst.sendall(data)
    except OSError:
        pass
    finally:
        shutdown_both(src, dst)


class TcpRelay:
    """Accepts on `listen` (port 0: any free port), connects each client to `target`, with
    TCP_NODELAY on both sides, and hands the pair to `_connected`. `address` is HOST:PORT listened on."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *, backlog: int,
                 connect_timeout_s: float = 10.0, thread_name: str = "tcp-relay") -> None:
        self.target = target
        self.connect_timeout_s = connect_timeout_s
        self._stopped = threading.Event()
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(listen)
        self._listener.listen(backlog)
        host, port = self._listener.getsockname()[:2]
        self.address = f"{host}:{port}"
        self._accept_thread = threading.Thread(target=self._accept_loop, name=thread_name, daemon=True)

    def start(self) -> None:
        self._accept_thread.start()

    def _connected(self, client: socket.socket, upstream: socket.socket, peer: tuple) -> None:
        raise NotImplementedError

    def _connect_failed(self, exc: OSError) -> None:
        pass

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, peer = self._listener.accept()
            except OSError:
                return  # the listener was closed
            try:
                upstream = socket.create_connection(self.target, timeout=self.connect_timeout_s)
                upstream.settimeout(None)
            except OSError as exc:
                self._connect_failed(exc)
                client.close()  # the client sees a reset (gRPC: UNAVAILABLE), as without the relay
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._connected(client, upstream, peer)

    def stop_accepting(self) -> None:
        """No new connections; the ones open are the subclass's to close."""
        self._stopped.set()
        try:
            self._listener.close()
        except OSError:
            pass
