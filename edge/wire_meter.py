"""A loopback TCP relay that counts the bytes of the edge's gRPC connection.

The edge's channel connects to this relay, which forwards to the cloud. What it counts is exactly
what the gRPC/HTTP2 stack wrote to the TCP connection (frames, headers, gRPC prefixes, pings,
window updates), in each direction: the measured "wire bytes" (TCP/IP headers excluded).
"""

from __future__ import annotations

import socket
import threading

from edge.tcp_relay import TcpRelay, pump


class ByteCountingRelay(TcpRelay):
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        super().__init__((listen_host, 0), (target_host, target_port), backlog=16, thread_name="wire-meter")
        self.uplink_bytes = 0  # edge -> cloud
        self.downlink_bytes = 0  # cloud -> edge
        self.last_error = ""  # why the last connection to the target failed ("" after one succeeds)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.start()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.uplink_bytes, self.downlink_bytes

    def _connect_failed(self, exc: OSError) -> None:
        self.last_error = exc.strerror or str(exc)  # for the edge's message naming the cloud

    def _connected(self, client: socket.socket, upstream: socket.socket, peer: tuple) -> None:
        self.last_error = ""
        with self._lock:
            self._sockets += [client, upstream]
        threading.Thread(target=pump, args=(client, upstream, self._count_uplink), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, self._count_downlink), daemon=True).start()

    # Counted before forwarding: the reply can never overtake the count.
    def _count_uplink(self, n: int) -> None:
        with self._lock:
            self.uplink_bytes += n

    def _count_downlink(self, n: int) -> None:
        with self._lock:
            self.downlink_bytes += n

    def close(self) -> None:
        self.stop_accepting()
        with self._lock:
            for s in self._sockets:
                s.close()
            self._sockets.clear()
