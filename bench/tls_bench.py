"""sqs-bench tls: what TLS costs on the wire, per committed token (issue 23 item 4).

One run, one target model loaded once, served by three gRPC servers in this process on loopback:
plaintext, TLS (server certificate; the edge sends a bearer token) and mutual TLS (the edge's
certificate is its identity). The same generations (same prompts, seeds and fixed plan: draft_len
4, K 4, ell 100, no pipelining; and plain target decoding) go through each, and the edge's
byte-counting relay (edge/wire_meter.py) counts what is on the connection: with TLS those are TLS
records (5-byte header, 16-byte AEAD tag and a content-type byte each, on top of the HTTP/2 and gRPC
framing they carry). Certificates come from cloud/tls.py in a temporary directory.

Columns, per (mode, scheme, temperature), summed over prompts:
  up_round_B_per_tok, down_round_B_per_tok   bytes of the rounds alone per committed token
  up_conn_B_per_tok, down_conn_B_per_tok     the whole connection per committed token: TCP
                                             connect, TLS handshake, health probe, open, rounds, close
  handshake_B                                the connection's bytes outside the rounds, per generation
  *_overhead_pct                             vs the plaintext row of the same scheme and temperature
  same_tokens                                tokens equal to the plaintext run's (they must be)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import threading
from pathlib import Path
from typing import Any

MODES = ("plaintext", "tls-token", "mtls")
COLUMNS = ["mode", "scheme", "temperature", "prompts", "tokens", "rounds", "up_round_B_per_tok",
           "down_round_B_per_tok", "up_conn_B_per_tok", "down_conn_B_per_tok", "handshake_B", "up_round_overhead_pct",
           "down_round_overhead_pct", "up_conn_overhead_pct", "down_conn_overhead_pct", "same_tokens"]
PLAN = {"draft_len": 4, "k": 4, "ell": 100, "no_pipeline": True}


class Servers:
    """One Verifier behind a plaintext, a TLS and a mutual-TLS server on 127.0.0.1 (own event loop)."""

    def __init__(self, target_model: str, target_engine: str, certs: Path, token_file: Path) -> None:
        from cloud.config import VerifierConfig
        from cloud.server import CloudConfig, load_target_engine
        from cloud.tls import ServerTLS, gen_certs
        from cloud.verifier import Verifier

        self.paths = gen_certs(certs, client_cn="bench-edge")
        info, engine = load_target_engine(target_model, engine=target_engine)
        vc = VerifierConfig(batch_window_ms=0)
        self.verifier = Verifier(info, engine.lm_factory(0), vc)
        base = CloudConfig(model=target_model, host="127.0.0.1", port=0, metrics_port=0, calibrate=False, verifier=vc)
        p = self.paths
        self.configs = {
            "plaintext": base,
            "tls-token": dataclasses.replace(base, tls=ServerTLS(p.server, p.server_key), token_file=token_file),
            "mtls": dataclasses.replace(base, tls=ServerTLS(p.server, p.server_key, client_ca=p.ca)),
        }
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-cloud", daemon=True)
        self._thread.start()
        self.running = {mode: self._call(self._start(cfg)) for mode, cfg in self.configs.items()}

    async def _start(self, cfg):
        from cloud.server import create_server

        return await create_server(cfg, self.verifier)

    def _call(self, coro, timeout: float = 600.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def address(self, mode: str) -> str:
        return f"127.0.0.1:{self.running[mode].port}"

    def stop(self) -> None:
        for r in self.running.values():
            self._call(r.stop(0), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def client_config(servers: Servers, mode: str, token: str):
    from edge.client import ClientConfig

    p = servers.paths
    tls: dict[str, Any] = {}
    if mode == "tls-token":
        tls = {"tls_ca": str(p.ca), "token": token}
    elif mode == "mtls":
        tls = {"tls_ca": str(p.ca), "tls_cert": str(p.client), "tls_key": str(p.client_key)}
    return ClientConfig(servers.address(mode), **tls)


def run(draft_model: str, target_model: str, *, engine: str = "torch", prompts: int = 2, max_new_tokens: int = 32,
        temperatures: tuple[float, ...] = (0.0, 1.0), schemes: tuple[str, ...] = ("topk", "none"),
        seed: int = 0) -> list[dict]:
    from bench.prompts import CODE_PROMPTS
    from cloud.auth import hash_token, new_token
    from edge.runtime import EdgeRuntime
    from sqs_models.engines import load_engine

    draft = load_engine(draft_model, "draft", engine=engine)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sqs-tls-bench-") as tmp:
        token = new_token()
        token_file = Path(tmp) / "tokens"
        token_file.write_text(f"bench-edge {hash_token(token)}\n")
        servers = Servers(target_model, engine, Path(tmp) / "certs", token_file)
        try:
            reference: dict[tuple, list[int]] = {}
            for mode in MODES:
                clients: list[Any] = []
                runtime = EdgeRuntime(draft, client_config(servers, mode, token)).wrapped(
                    lambda c: clients.append(c) or c)
                for scheme in schemes:
                    for t in temperatures:
                        opts = {**PLAN, "sparsifier": scheme, "temperature": t, "seed": seed,
                                **({"draft_len": 0} if scheme == "none" else {})}
                        config = runtime.draft_config(opts)
                        row = {"mode": mode, "scheme": scheme, "temperature": t, "prompts": 0, "tokens": 0,
                               "rounds": 0, "up_round": 0, "down_round": 0, "up_conn": 0, "down_conn": 0,
                               "same_tokens": True}
                        for i, prompt in enumerate(CODE_PROMPTS[:prompts]):
                            clients.clear()
                            res = runtime.generate(runtime.encode(prompt), config, max_new_tokens=max_new_tokens)
                            up, down = clients[0].wire_counts()
                            s = res.stats
                            row["prompts"] += 1
                            row["tokens"] += s.generated
                            row["rounds"] += s.rounds
                            row["up_round"] += s.uplink_wire_bytes
                            row["down_round"] += s.downlink_wire_bytes
                            row["up_conn"] += up
                            row["down_conn"] += down
                            key = (scheme, t, i)
                            ref = reference.setdefault(key, res.token_ids)
                            row["same_tokens"] &= res.token_ids == ref
                        rows.append(_finish(row))
        finally:
            servers.stop()
    plain = {(r["scheme"], r["temperature"]): r for r in rows if r["mode"] == "plaintext"}
    for r in rows:
        base = plain[(r["scheme"], r["temperature"])]
        for d in ("up", "down"):
            for part in ("round", "conn"):
                b = base[f"{d}_{part}_B_per_tok"]
                r[f"{d}_{part}_overhead_pct"] = round(100.0 * (r[f"{d}_{part}_B_per_tok"] / b - 1.0), 1) if b else 0.0
    return rows


def _finish(row: dict) -> dict:
    n = max(row["tokens"], 1)
    out = {k: row[k] for k in ("mode", "scheme", "temperature", "prompts", "tokens", "rounds", "same_tokens")}
    for d in ("up", "down"):
        out[f"{d}_round_B_per_tok"] = round(row[f"{d}_round"] / n, 2)
        out[f"{d}_conn_B_per_tok"] = round(row[f"{d}_conn"] / n, 2)
    out["handshake_B"] = round((row["up_conn"] + row["down_conn"] - row["up_round"] - row["down_round"])
                               / max(row["prompts"], 1))
    return out


def format_table(rows: list[dict]) -> str:
    head = ("mode", "scheme", "T", "tokens", "rounds", "up B/tok", "down B/tok", "up +%", "down +%",
            "up conn B/tok", "down conn B/tok", "up conn +%", "down conn +%", "setup B/gen", "same tokens")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join(str(x) for x in (
            r["mode"], r["scheme"], f"{r['temperature']:g}", r["tokens"], r["rounds"], r["up_round_B_per_tok"],
            r["down_round_B_per_tok"], r["up_round_overhead_pct"], r["down_round_overhead_pct"],
            r["up_conn_B_per_tok"], r["down_conn_B_per_tok"], r["up_conn_overhead_pct"], r["down_conn_overhead_pct"],
            r["handshake_B"], "yes" if r["same_tokens"] else "NO")))
    return "\n".join(lines)


def register(subparsers) -> None:
    """Add `tls` to sqs-bench's subcommands (bench/cli.py)."""
    p = subparsers.add_parser("tls", help="wire bytes per committed token with TLS off, on, and mutual (one run)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft-model", default="tiny")
    p.add_argument("--target-model", default="tiny")
    p.add_argument("--engine", default="torch", choices=["torch", "llama", "auto"], help="both sides' engine")
    p.add_argument("--prompts", type=int, default=2, help="code prompts (bench.prompts.CODE_PROMPTS)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument("--schemes", nargs="+", default=["topk", "none"], choices=["topk", "none"],
                   help="topk: the fixed SQS plan (draft_len 4, K 4, ell 100); none: plain target decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="directory for tls.csv")


def main(a: argparse.Namespace) -> int:
    from bench.machine import write_csv

    rows = run(a.draft_model, a.target_model, engine=a.engine, prompts=a.prompts, max_new_tokens=a.max_new_tokens,
               temperatures=tuple(a.temperatures), schemes=tuple(a.schemes), seed=a.seed)
    print(f"draft {a.draft_model}, target {a.target_model}, {a.prompts} prompt(s) x {a.max_new_tokens} tokens, "
          f"plan {PLAN}; wire bytes counted by the edge's relay on loopback")
    print(format_table(rows))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, a.out / "tls.csv", COLUMNS)
        print(f"wrote {a.out / 'tls.csv'}")
    return 0 if all(r["same_tokens"] for r in rows) else 1
