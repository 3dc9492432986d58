"""sqs_cloud_info: the cloud says what it runs, as applied (engine, weight type, batching), on its
/metrics and on RunningCloud.info; the load test reads it back (loadtest/provenance.py)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import pytest

from cloud.config import TargetInfo, VerifierConfig
from cloud.server import cloud_info
from cloud.verifier import Verifier
from loadtest.provenance import REPORTED, reported_cloud, scrape_cloud_reports


@contextmanager
def metrics_http(registry, port: int) -> Iterator[str]:
    """The registry on http://127.0.0.1:port/metrics, as sqs-cloud --metrics-port serves it."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("window_ms, batching", [(2.0, "on"), (0.0, "off")])
def test_tiny_cloud_reports_its_engine_and_batching(window_ms, batching, free_port):
    from cloud.inprocess import LocalCloud

    with LocalCloud("tiny", calibrate=False, batch_window_ms=window_ms) as cloud:
        info = cloud.running.info
        assert info is not None and info.engine == "torch" and info.model == "tiny"
        assert info.batching is (batching == "on") and info.batch_window_ms == window_ms
        assert info.weight_type == info.dtype and info.dtype and info.threads and info.threads >= 1
        labels = info.labels()
        assert labels["engine"] == "torch" and labels["batching"] == batching
        assert labels["batch_window_ms"] == f"{window_ms:g}" and labels["batch_max_rows"] == "64"
        assert labels["batch_rejoin"] == "1"
        registry = cloud.running.metrics.registry
        assert registry.get_sample_value("sqs_cloud_info", labels) == 1.0
        samples = [s for m in registry.collect() for s in m.samples if s.name == "sqs_cloud_info"]
        assert len(samples) == 1  # one set of facts: a scrape never has to choose

        # over HTTP, as the load test reads an external cloud's (--cloud-metrics)
        with metrics_http(registry, free_port()) as address:
            got, reports, note = scrape_cloud_reports([address])
        assert got == labels and reports == {address: labels} and address in note
        record = reported_cloud(got, note)
        assert record["engine"] == "torch" and record["engine_source"] == REPORTED
        assert record["batching"] == {"on": batching == "on", "window_ms": window_ms if batching == "on" else None,
                                      "max_rows": 64 if batching == "on" else None,
                                      "rejoin": 1.0 if batching == "on" else None, "source": REPORTED}


class _PlainLM:
    """An LM with no batched pass (as llama.cpp's unbatched LlamaLM): the verifier runs it alone."""

    def logits(self, context: Sequence[int], want: int) -> np.ndarray:
        return np.zeros((want, 8), np.float32)


class _BatchLM(_PlainLM):
    @staticmethod
    def logits_batch(lms, contexts, wants) -> list[np.ndarray]:
        return [np.zeros((w, 8), np.float32) for w in wants]


@pytest.mark.parametrize("lm, window_ms, on", [(_BatchLM, 2.0, True), (_PlainLM, 2.0, False), (_BatchLM, 0.0, False)])
def test_batching_is_on_only_with_a_window_and_lms_with_a_batched_pass(lm, window_ms, on):
    verifier = Verifier(TargetInfo("fake", 8, "fp", ()), lm, VerifierConfig(batch_window_ms=window_ms))
    info = cloud_info(verifier, None, workers=3)
    assert info.batching is on and info.batch_window_ms == window_ms
    # a verifier handed to the server: its engine is not known, and the labels say so with ""
    assert info.engine is None and info.labels()["engine"] == "" and info.labels()["workers"] == "3"
    assert info.labels()["batching"] == ("on" if on else "off")


def test_replicas_that_disagree_or_do_not_answer_report_nothing(free_port):
    from prometheus_client import CollectorRegistry

    from common.metrics import Metrics

    def metrics(batching: str) -> CollectorRegistry:
        m = Metrics()
        m.set_cloud_info({"model": "tiny", "engine": "torch", "batching": batching})
        return m.registry

    dead = f"127.0.0.1:{free_port()}"
    with metrics_http(metrics("on"), free_port()) as a, metrics_http(metrics("off"), free_port()) as b, \
            metrics_http(Metrics().registry, free_port()) as edge_like:
        got, reports, note = scrape_cloud_reports([a, b])
        assert got is None and "different" in note and reports[a]["batching"] == "on"
        got, reports, note = scrape_cloud_reports([a, dead, edge_like])
        assert got is not None and got["batching"] == "on"  # the one that reported, named as such
        assert reports[dead].startswith("scrape failed") and "no sqs_cloud_info" in reports[edge_like]
        assert dead in note and edge_like in note
        got, _, note = scrape_cloud_reports([dead])
        assert got is None and "no sqs_cloud_info" in note
