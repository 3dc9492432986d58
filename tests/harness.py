"""Test helpers: a cloud verifier on a loopback port in a background event loop, and generation."""

from __future__ import annotations

import asyncio
import threading

from cloud.server import CloudConfig, create_server
from cloud.verifier import VerifierConfig
from edge.client import ClientConfig, CloudClient
from edge.drafter import DraftConfig, Drafter
from edge.generate import generate
from common.schemes import SchemeConfig
from sqs_models.cached_lm import CachedLM
from sqs_models.registry import load_model


class CloudThread:
    """sqs-cloud serving the tiny target on 127.0.0.1 (port 0 = any free port)."""

    def __init__(self, port: int = 0, verifier_config: VerifierConfig = VerifierConfig(), workers: int = 2):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        cfg = CloudConfig(model="tiny", host="127.0.0.1", port=port, metrics_port=0, workers=workers,
                          verifier=verifier_config)
        self.running = asyncio.run_coroutine_threadsafe(create_server(cfg), self.loop).result(30)
        self.port = self.running.port
        self.address = f"127.0.0.1:{self.port}"

    def stop(self, grace_s: float = 0.0) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(grace_s), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


_DRAFT = None


def draft_model():
    global _DRAFT
    if _DRAFT is None:
        _DRAFT = load_model("tiny", role="draft")
    return _DRAFT


def run_generation(address: str, prompt: str, *, scheme: str = "topk", max_new_tokens: int = 16,
                   temperature: float = 0.0, seed: int = 0, max_draft_len: int = 4, **scheme_kw):
    m = draft_model()
    cfg = DraftConfig(
        scheme=SchemeConfig(scheme, vocab_size=m.vocab_size, **scheme_kw), max_draft_len=max_draft_len,
        temperature=temperature, seed=seed,
    )
    drafter = Drafter(CachedLM(m.model, m.vocab_size), cfg, m.eos_token_ids)
    with CloudClient(ClientConfig(address, retries=8, backoff_s=0.1)) as client:
        return generate(m.tokenizer.encode(prompt), drafter, client, max_new_tokens=max_new_tokens,
                        vocab_fingerprint=m.fingerprint)
