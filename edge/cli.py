"""sqs-edge: the edge side from the shell.

  sqs-edge generate --cloud HOST:PORT --prompt TEXT [--sparsifier topk --k 8 ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from common.logs import setup_logging
from edge import options
ENGINES = ["auto", "torch", "llama"]  # sqs_models.engines.ENGINE_CHOICES (not imported: keeps --help light)


def finite_float(text: str) -> float:
    """argparse type: a finite float (NaN and infinities are refused with a one-line error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


int_or_auto = options.arg_type("draft_len")  # argparse type: an integer in range, or auto


def add_generation_args(ap: argparse.ArgumentParser) -> None:
    env = os.environ.get
    ap.add_argument("--cloud", default=env("SQS_CLOUD", "127.0.0.1:50051"), help="HOST:PORT of sqs-cloud")
    ap.add_argument("--draft-model", default=env("SQS_DRAFT_MODEL", "tiny"))
    ap.add_argument("--dtype", default=env("SQS_DTYPE"), choices=[None, "float32", "bfloat16"],
                    help="torch engine dtype (default: the cheaper one-token step of bf16 and fp32, measured at start)")
    ap.add_argument("--engine", default=env("SQS_ENGINE", "auto"), choices=ENGINES,
                    help="draft engine: auto (default) = llama.cpp where llama-cpp-python and the model's GGUF "
                         "exist, else torch")
    options.add_arguments(ap)  # the generation options, declared once in edge/options.py
    ap.add_argument("--wait-for-cloud", type=finite_float, default=0.0, metavar="S",
                    help="at the start, keep waiting this many seconds for a cloud that does not answer yet "
                         "(default 0: say at once that HOST:PORT does not answer)")
    ap.add_argument("--outage-window", type=finite_float, default=180.0, metavar="S",
                    help="a running generation rides out a cloud outage this long (restart, stall, lost verdicts)")
    ap.add_argument("--transport", choices=["stream", "unary"], default="stream",
                    help="one gRPC stream per session (default) or one unary call per round")


def cmd_generate(a: argparse.Namespace) -> int:
    from edge.client import ClientConfig, CloudClient, CloudError
    from edge.drafter import DraftConfig, Drafter
    from edge.generate import generate
    from sqs_models.engines import EngineUnavailable, load_engine
    from sqs_models.registry import ModelNotInstalled

    try:
        model = load_engine(a.draft_model, "draft", engine=a.engine, dtype=a.dtype)
    except (ModelNotInstalled, EngineUnavailable) as exc:
        return _fail(str(exc), code=2)
    except ValueError as exc:
        return _fail(str(exc))
    prompt_ids = list(model.tokenizer.encode(a.prompt))
    if not prompt_ids:
        return _fail("the prompt encodes to no tokens")
    try:
        dcfg = DraftConfig.from_options(a, model.vocab_size)
    except ValueError as exc:
        return _fail(str(exc))
    drafter = Drafter(model.new_lm(), dcfg, model.eos_token_ids)
    printed = [""]
    out_ids: list[int] = []

    def stream(new: list[int]) -> None:
        if a.json:
            return
        out_ids.extend(new)
        text = model.tokenizer.decode(out_ids)
        sys.stdout.write(text[len(printed[0]):])
        sys.stdout.flush()
        printed[0] = text

    try:
        cc = ClientConfig(a.cloud, transport=a.transport, connect_wait_s=a.wait_for_cloud,
                          outage_window_s=a.outage_window)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        with CloudClient(cc) as client:
            if not a.json:
                sys.stdout.write(a.prompt)
            result = generate(
                prompt_ids, drafter, client, max_new_tokens=a.max_new_tokens,
                vocab_fingerprint=model.fingerprint, on_tokens=stream,
            )
    except CloudError as exc:
        return _fail(str(exc))
    s = result.stats
    summary = s.summary()
    if a.json:
        print(json.dumps({
            "text": model.tokenizer.decode(result.token_ids),
            "token_ids": result.token_ids,
            "prompt_tokens": len(prompt_ids),
            "stop_reason": result.stop_reason,
            "sparsifier": dcfg.scheme.scheme.value,
            "draft_model": model.name,
            "draft_engine": model.detail,
            "target_model": result.target_model,
            "vocab_size": model.vocab_size,
            "final_beta": drafter.beta,
            "mean_dropped_mass": result.mean_dropped_mass,
            "theorem2_bound": result.theorem2_bound,
            "draft_len": a.draft_len,
            "plans": s.plans(),
            **summary,
        }))
    else:
        print()
        print(
            f"[{s.generated} tokens, {s.tokens_per_s:.1f} tok/s | {s.rounds} rounds, acceptance "
            f"{s.acceptance_rate:.1%} (accepted/drafted), resampling {s.resampling_rate:.1%} (per round) | "
            f"{summary['formula_bits_per_accepted_token']:.1f} formula bits, "
            f"{summary['wire_bytes_per_accepted_token']:.1f} wire bytes per token]",
            file=sys.stderr,
        )
    return 0


def _fail(msg: str, code: int = 1) -> int:
    print(f"sqs-edge: error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sqs-edge", description="SQS-SD edge: draft locally, verify in the cloud")
    ap.add_argument("--log-level", default=os.environ.get("SQS_LOG_LEVEL", "WARNING"))
    ap.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("SQS_LOG_FORMAT", "text"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate one continuation of a prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_generation_args(g)
    sv = sub.add_parser("serve", help="serve the HTTP API (POST /v1/generate, /healthz, /metrics, /docs)")
    env = os.environ.get
    sv.add_argument("--cloud", default=env("SQS_CLOUD", "127.0.0.1:50051"), help="HOST:PORT of sqs-cloud")
    sv.add_argument("--draft-model", default=env("SQS_DRAFT_MODEL", "tiny"))
    sv.add_argument("--dtype", default=env("SQS_DTYPE"), choices=[None, "float32", "bfloat16"])
    sv.add_argument("--engine", default=env("SQS_ENGINE", "auto"), choices=ENGINES,
                    help="draft engine: auto (default) = llama.cpp where installed and the model has a GGUF, else torch")
    sv.add_argument("--host", default=env("SQS_EDGE_HOST", "0.0.0.0"))
    sv.add_argument("--port", type=int, default=int(env("SQS_EDGE_PORT", "8080")))
    sv.add_argument("--max-concurrency", type=int, default=int(env("SQS_EDGE_CONCURRENCY", "4")))
    sv.add_argument("--draft-len", type=int_or_auto, default=env("SQS_DRAFT_LEN", "auto"),
                    help="draft length for requests that name none: auto (planned per round), N, or 0")
    a = ap.parse_args(argv)
    setup_logging(a.log_level, a.log_format)
    if a.cmd == "serve":
        import dataclasses

        from edge.api import EdgeServerConfig, serve

        extra = {"engine": a.engine} if "engine" in {f.name for f in dataclasses.fields(EdgeServerConfig)} else {}
        serve(EdgeServerConfig(cloud=a.cloud, draft_model=a.draft_model, dtype=a.dtype, host=a.host,
                               port=a.port, max_concurrency=a.max_concurrency, draft_len=a.draft_len, **extra))
        sys.exit(0)
    sys.exit(cmd_generate(a))


if __name__ == "__main__":
    main()
