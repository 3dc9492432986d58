"""sqs-cloud inside this process, for tests and the load test: `LocalCloud("tiny")`.

The gRPC aio server of cloud.server runs on its own event-loop thread, so the caller stays
synchronous; the constructor blocks until the model is loaded and the server serves. Binds
127.0.0.1, port 0 (any free port) unless told otherwise, with no metrics HTTP server (the exporter
is `running.metrics`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading

from cloud.server import CloudConfig, create_server

log = logging.getLogger("sqs.cloud")


class LocalCloud:
    """`LocalCloud(model, port=0, batch_window_ms=None, batch_max_rows=None, **config)`: config takes
    the other CloudConfig fields (dtype, workers, verifier, ...); the batch options, when given,
    override those of the verifier config (cross-session batching; 0 ms disables it). `address` is
    HOST:PORT to connect to; stop() (or `with`) shuts it down."""

    def __init__(self, model: str = "tiny", *, port: int = 0, start_timeout_s: float = 600.0,
                 batch_window_ms: float | None = None, batch_max_rows: int | None = None, **config) -> None:
        cfg = dataclasses.replace(CloudConfig(host="127.0.0.1", metrics_port=0), model=model, port=port, **config)
        batch = {k: v for k, v in (("batch_window_ms", batch_window_ms), ("batch_max_rows", batch_max_rows))
                 if v is not None}
        if batch:
            cfg = dataclasses.replace(cfg, verifier=dataclasses.replace(cfg.verifier, **batch))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cloud-loop", daemon=True)
        self._thread.start()
        try:
            self.running = asyncio.run_coroutine_threadsafe(create_server(cfg), self.loop).result(start_timeout_s)
        except BaseException:
            self._stop_loop()
            raise
        self.port = self.running.port
        self.address = f"{cfg.host}:{self.port}"
        self.target_model = self.running.verifier.target.name
        self._stopped = False

    def stop(self, grace_s: float = 0.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            asyncio.run_coroutine_threadsafe(self.running.stop(grace_s), self.loop).result(grace_s + 10)
        except Exception as exc:  # shutting down anyway
            log.debug("in-process cloud stop: %s", exc)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> LocalCloud:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
