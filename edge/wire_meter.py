"""A loopback TCP relay that counts the bytes of the edge's gRPC connection.

The edge's channel connects to this relay, which forwards to the cloud. What it counts is exactly
what the gRPC/HTTP2 stack wrote to the TCP connection (frames, headers, gRPC prefixes, pings,
window updates), in each direction: the measured "wire bytes" (TCP/IP headers excluded).
"""

from __future__ import annotations

import socket
import threading


class ByteCountingRelay:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, 0))
        self._listener.listen(16)
        self.address = f"{listen_host}:{self._listener.getsockname()[1]}"
        self.uplink_bytes = 0  # edge -> cloud
        self.downlink_bytes = 0  # cloud -> edge
        self.last_error = ""  # why the last connection to the target failed ("" after one succeeds)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept_loop, name="wire-meter", daemon=True).start()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.uplink_bytes, self.downlink_bytes

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=10)
                upstream.settimeout(None)
                self.last_error = ""
            except OSError as exc:
                self.last_error = exc.strerror or str(exc)  # for the edge's message naming the cloud
                client.close()  # the channel sees UNAVAILABLE, as without the relay
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, uplink: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:  # count before forwarding: the reply can never overtake the count
                    if uplink:
                        self.uplink_bytes += len(data)
                    else:
                        self.downlink_bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()
            self._sockets.clear()
