"""End-to-end runs of the real stack, side by side in one run: a sqs-cloud process and the edge
library path (draft model loaded once), one row per (scheme, temperature), printed as a table.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from common.schemes import SchemeConfig
from common.stats import GenerationStats


@dataclass(frozen=True)
class Setting:
    scheme: str
    k: int = 8
    beta0: float = 0.01
    eta: float = 0.001
    temperature: float = 0.0

    @property
    def label(self) -> str:
        if self.scheme in ("topk", "fp16-topk"):
            return f"{self.scheme} K={self.k}"
        if self.scheme == "conformal":
            return f"conformal b0={self.beta0} eta={self.eta}"
        return self.scheme


def parse_scheme(spec: str) -> dict:
    """'topk:8' -> {scheme: topk, k: 8}; 'conformal:0.01' -> beta0 0.01; 'none', 'dense', ..."""
    name, _, arg = spec.partition(":")
    if not arg:
        return {"scheme": name}
    return {"scheme": name, "k": int(arg)} if name in ("topk", "fp16-topk") else {"scheme": name, "beta0": float(arg)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cloud(model: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud", "--model", model, "--port", str(port), "--metrics-port", "0",
         "--host", "127.0.0.1", "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sqs-cloud exited: {proc.stderr.read()[-500:]}")
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            if health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                return proc
        except grpc.RpcError:
            time.sleep(0.5)
        finally:
            ch.close()
    proc.kill()
    raise RuntimeError("sqs-cloud did not become healthy")


def run_settings(draft_model: str, target_model: str, settings: list[Setting], prompts: list[str],
                 max_new_tokens: int, seed: int = 0, max_draft_len: int = 8, budget_bits: float = 5000.0,
                 progress=None) -> list[tuple[Setting, GenerationStats]]:
    from edge.client import ClientConfig, CloudClient
    from edge.drafter import DraftConfig, Drafter
    from edge.generate import generate
    from sqs_models.cached_lm import CachedLM
    from sqs_models.registry import load_model

    m = load_model(draft_model, role="draft")
    port = free_port()
    cloud = start_cloud(target_model, port)
    out = []
    try:
        for st in settings:
            total = GenerationStats()
            for i, prompt in enumerate(prompts):
                cfg = DraftConfig(
                    scheme=SchemeConfig(st.scheme, m.vocab_size, k=st.k, beta0=st.beta0, eta=st.eta),
                    max_draft_len=max_draft_len, budget_bits=budget_bits, temperature=st.temperature,
                    seed=seed + i,
                )
                drafter = Drafter(CachedLM(m.model, m.vocab_size), cfg, m.eos_token_ids)
                with CloudClient(ClientConfig(f"127.0.0.1:{port}")) as client:
                    res = generate(m.tokenizer.encode(prompt), drafter, client, max_new_tokens=max_new_tokens,
                                   vocab_fingerprint=m.fingerprint)
                _merge(total, res.stats)
                if progress:
                    progress()
            out.append((st, total))
    finally:
        cloud.terminate()
        cloud.wait(30)
    return out


def _merge(acc: GenerationStats, s: GenerationStats) -> None:
    for f in ("rounds", "drafted", "accepted", "resampled", "bonus", "generated", "formula_bits", "honest_bits",
              "uplink_payload_bytes", "uplink_message_bytes", "uplink_wire_bytes", "downlink_wire_bytes",
              "setup_wire_bytes", "wall_s", "reopens"):
        setattr(acc, f, getattr(acc, f) + getattr(s, f))
    for k, v in s.latency_ms.items():
        acc.latency_ms[k] += v


def format_rows(rows: list[tuple[Setting, GenerationStats]]) -> str:
    head = (f"{'T':>4} {'scheme':<30} {'tokens':>6} {'rounds':>6} {'accept':>7} {'resamp':>7} {'acc/rnd':>7} "
            f"{'tok/s':>6} {'fbits/tok':>9} {'wireB/tok':>9} {'payB/rnd':>8} {'draft ms':>8} {'verify ms':>9} {'net ms':>7}")
    lines = [head, "-" * len(head)]
    for st, s in rows:
        per_tok = max(s.accepted + s.rounds, 1)
        r = max(s.rounds, 1)
        lines.append(
            f"{st.temperature:>4.2f} {st.label:<30} {s.generated:>6} {s.rounds:>6} {s.acceptance_rate:>7.1%} "
            f"{s.resampling_rate:>7.1%} {s.accepted / r:>7.2f} {s.tokens_per_s:>6.2f} {s.formula_bits / per_tok:>9.1f} "
            f"{s.uplink_wire_bytes / per_tok:>9.1f} {s.uplink_payload_bytes / r:>8.1f} "
            f"{s.latency_ms['draft'] / r:>8.1f} {s.latency_ms['verify'] / r:>9.1f} "
            f"{(s.latency_ms['uplink'] + s.latency_ms['downlink']) / r:>7.1f}"
        )
    lines.append("accept = accepted/drafted; resamp = rounds ending in a resampled token / rounds; per-token columns "
                 "divide by committed tokens (accepted + 1 per round); ms columns are per round; loopback link")
    return "\n".join(lines)
