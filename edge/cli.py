"""sqs-edge: the edge side from the shell.

  sqs-edge generate --cloud HOST:PORT --prompt TEXT [--sparsifier topk --k 8 ...] [--json]
  sqs-edge serve --cloud HOST:PORT [--engine auto|torch|llama] [--port 8080]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from common.logs import setup_logging
from edge import options


def cmd_generate(a: argparse.Namespace) -> int:
    from edge.client import CloudError
    from edge.runtime import DraftSpec, EdgeRuntime, client_config_from_args
    from sqs_models.engines import EngineUnavailable
    from sqs_models.registry import ModelNotInstalled

    try:
        runtime = EdgeRuntime.load(DraftSpec.from_args(a), client_config_from_args(a))
    except (ModelNotInstalled, EngineUnavailable) as exc:
        return _fail(str(exc), code=2)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        prompt_ids = runtime.encode(a.prompt)
        config = runtime.draft_config(a)
    except ValueError as exc:
        return _fail(str(exc))
    generation = runtime.start(prompt_ids, config, max_new_tokens=a.max_new_tokens, previews=True)
    text = runtime.text_stream()
    try:
        if not a.json:
            sys.stdout.write(a.prompt)
        for r in generation:
            if not a.json:
                sys.stdout.write(text.push(r.tokens))
                sys.stdout.flush()
        if not a.json:
            sys.stdout.write(text.flush())
    except CloudError as exc:
        return _fail(str(exc))
    result = generation.result
    s = result.stats
    summary = s.summary()
    if a.json:
        engine = runtime.engine
        print(json.dumps({
            "text": runtime.decode(result.token_ids),
            "token_ids": result.token_ids,
            "prompt_tokens": len(prompt_ids),
            "stop_reason": result.stop_reason,
            "sparsifier": config.scheme.scheme.value,
            "draft_model": engine.name,
            "draft_engine": engine.detail,
            "target_model": result.target_model,
            "vocab_size": engine.vocab_size,
            "final_beta": generation.drafter.beta,
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


def cmd_serve(a: argparse.Namespace) -> int:
    from edge.api import EdgeServerConfig, serve

    try:
        config = EdgeServerConfig(
            cloud=a.cloud, draft_model=a.draft_model, engine=a.engine, dtype=a.dtype, host=a.host, port=a.port,
            max_concurrency=a.max_concurrency, draft_len=a.draft_len, transport=a.transport,
            connect_wait_s=a.wait_for_cloud, outage_window_s=a.outage_window,
            api_key=a.api_key or None, served_model_name=a.served_model_name, max_generations=a.max_generations,
            tls_ca=a.tls_ca, tls_cert=a.tls_cert, tls_key=a.tls_key, token=options.token_of(a), insecure=a.insecure,
        )
        config.client_config()  # a link that cannot work (plaintext outside loopback, half a key pair) fails here
    except ValueError as exc:
        return _fail(str(exc))
    serve(config)
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
    options.add_generation_args(g)
    sv = sub.add_parser("serve", help="serve the HTTP API (POST /v1/generate, the OpenAI-compatible "
                        "/v1/models, /v1/completions, /v1/chat/completions, /healthz, /metrics, /docs)")
    env = os.environ.get
    options.add_runtime_args(sv)
    sv.add_argument("--host", default=env("SQS_EDGE_HOST", "0.0.0.0"))
    sv.add_argument("--port", type=int, default=int(env("SQS_EDGE_PORT", "8080")))
    sv.add_argument("--max-concurrency", type=int, default=int(env("SQS_EDGE_CONCURRENCY", "4")))
    sv.add_argument("--draft-len", type=options.int_or_auto, default=env("SQS_DRAFT_LEN", "auto"),
                    help="draft length for requests that name none: auto (planned per round), N, or 0")
    sv.add_argument("--api-key", default=env("SQS_API_KEY"),
                    help="every /v1/* route then needs 'Authorization: Bearer KEY' (prefer the SQS_API_KEY variable: "
                         "arguments show in ps)")
    sv.add_argument("--served-model-name", default=env("SQS_SERVED_MODEL_NAME"),
                    help="model id of the OpenAI routes (default: the draft model's name)")
    sv.add_argument("--max-generations", type=int, default=int(env("SQS_EDGE_MAX_GENERATIONS", "32")),
                    help="OpenAI requests generating at once; more get 503 with Retry-After")
    a = ap.parse_args(argv)
    setup_logging(a.log_level, a.log_format)
    sys.exit(cmd_serve(a) if a.cmd == "serve" else cmd_generate(a))


if __name__ == "__main__":
    main()
