"""The generation options, declared once: name, type, default, range and help of each.

`sqs-edge generate|serve`, the HTTP request body, `sqs-loadtest` and `sqs-bench` derive their
options from OPTIONS (argparse arguments, the pydantic request model, the checks); adding an
option means adding one row here and reading it where it is used (edge/drafter.DraftConfig).
Non-finite numbers are refused everywhere (argparse error, HTTP 422, ValueError).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, make_dataclass
from typing import Annotated, Any, Literal

from common.lm import ENGINES
from common.schemes import MAX_RANKED_SUPPORT, Scheme

AUTO = "auto"
SPARSIFIERS = tuple(s.value for s in Scheme)


@dataclass(frozen=True)
class Option:
    name: str
    kind: type  # int, float, str or bool
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is refused
    choices: tuple[str, ...] | None = None
    auto: bool = False  # also takes "auto" (the planner decides per round)

    def check(self, value: Any) -> Any:
        """The value converted to the option's type, or ValueError with the reason."""
        if self.auto and value == AUTO:
            return AUTO
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
            return value
        if self.kind is str:
            if self.choices and value not in self.choices:
                raise ValueError(f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        try:
            number = self.kind(value)
        except (TypeError, ValueError):
            kind = "an integer" if self.kind is int else "a number"
            raise ValueError(f"{self.name} must be {kind}{' or auto' if self.auto else ''}, got {value!r}") from None
        if isinstance(value, float) and self.kind is int and number != value:
            raise ValueError(f"{self.name} must be an integer, got {value!r}")
        if not math.isfinite(number):
            raise ValueError(f"{self.name} must be a finite number, got {value!r}")
        too_low = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        too_high = self.high is not None and number > self.high
        if too_low or too_high:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            raise ValueError(f"{self.name} must lie in {'(' if self.low_open else '['}{lo}, {hi}], got {value!r}")
        return number


OPTIONS: tuple[Option, ...] = (
    Option("max_new_tokens", int, 64, "tokens to generate", 1, 4096),
    Option("temperature", float, 0.0, "sampling temperature of draft and target (0 = greedy)", 0.0, 100.0),
    Option("top_k", int, 0, "target/draft sampling top-k (0 = off)", 0, 2**32 - 1),  # uint32 on the wire
    Option("top_p", float, 1.0, "target/draft sampling top-p (1 = off)", 0.0, 1.0, low_open=True),
    Option("sparsifier", str, "topk", "topk (K-SQS), conformal (C-SQS), dense (dense QS), token (K = 1), the "
           "baselines fp16-topk and fp32, or none (plain target decoding)", choices=SPARSIFIERS),
    Option("k", int, AUTO, "support size for topk / fp16-topk; auto: the planner picks K per round",
           1, MAX_RANKED_SUPPORT, auto=True),
    Option("ell", int, AUTO, "lattice resolution; auto: the planner picks ell per round", 1, 1 << 16, auto=True),
    Option("drop_zeros", bool, False, "leave zero-count entries out of the support (same q_hat, fewer bits)"),
    Option("beta0", float, 0.01, "C-SQS initial threshold", -1.0, 2.0),
    Option("eta", float, 0.001, "C-SQS learning rate", 0.0, 1.0),
    Option("alpha", float, 0.0005, "C-SQS target dropped mass", 0.0, 1.0),
    Option("budget_bits", float, 5000.0, "uplink bit budget B per batch", 0.0, 1e9, low_open=True),
    Option("budget_accounting", str, "honest", "honest: the packed bits; formula: the paper's eq. 1 bits",
           choices=("honest", "formula")),
    Option("draft_len", int, AUTO, "drafts per batch: auto plans each round from measured costs (0..32 drafts, or "
           "plain target steps when speculation does not pay); N = a fixed plan of up to N; 0 = plain target "
           "decoding", 0, 256, auto=True),
    Option("seed", int, 0, "seed of the draws of both sides (keyed by position)", 0, 2**63 - 1),
    Option("reproducible", bool, False, "the seed fixes the tokens whatever the plan, engine or load: drafts use "
           "the invariant scheme (token ids verified by Gumbel-max agreement) in place of --sparsifier; plain "
           "steps and bonus tokens are Gumbel-max draws at their positions"),
    Option("lookahead", int, 3, "while the cloud streams plain tokens, drafts the edge sends ahead of them (the "
           "first ones guess the tokens the cloud is sampling, the rest continue them) for its next steps to verify "
           "without ending the stream; 0 = off", 0, 16),
    Option("no_pipeline", bool, False, "do not draft the next batch while one is in flight (with it off, a seed "
           "fixes the tokens of a fixed plan at T > 0 either way; the auto plan depends on measured costs)"),
)
BY_NAME = {o.name: o for o in OPTIONS}

GenerationOptions = make_dataclass(
    "GenerationOptions",
    [(o.name, Any, field(default=o.default)) for o in OPTIONS],
    frozen=True,
    namespace={"__doc__": "Validated generation options (see OPTIONS); build them with options_from()."},
)
GenerationOptions.__module__ = __name__


def options_from(source: Any, **overrides: Any) -> Any:
    """GenerationOptions from a mapping or any object with the option names as attributes
    (argparse namespace, pydantic request, load-test config); missing names take their default.
    Raises ValueError with the reason for the first bad value."""
    get = source.get if isinstance(source, dict) else (lambda n, d: getattr(source, n, d))
    values = {o.name: o.check(overrides.get(o.name, get(o.name, o.default))) for o in OPTIONS}
    return GenerationOptions(**values)


def arg_type(name: str):
    """argparse type of one option: converts, checks the range, one-line error."""
    o = BY_NAME[name]

    def parse(text: str):
        value: Any = text
        if not (o.auto and text == AUTO) and o.kind is not str:
            try:
                value = o.kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected {'an integer' if o.kind is int else 'a number'}{' or auto' if o.auto else ''}, "
                    f"got {text!r}") from None
        try:
            return o.check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, skip: tuple[str, ...] = (),
                  defaults: dict[str, Any] | None = None) -> None:
    """One --flag per option (bools as switches), with the table's ranges, choices and help."""
    defaults = defaults or {}
    for o in OPTIONS:
        if o.name in skip:
            continue
        flag = "--" + o.name.replace("_", "-")
        default = defaults.get(o.name, o.default)
        if o.kind is bool:
            parser.add_argument(flag, action="store_true", default=default, help=o.help)
        else:
            parser.add_argument(flag, type=arg_type(o.name), default=default, choices=o.choices, help=o.help)


def request_fields() -> dict[str, tuple[Any, Any]]:
    """pydantic field definitions (type, Field) for an HTTP request model, same ranges."""
    from pydantic import Field

    out: dict[str, tuple[Any, Any]] = {}
    for o in OPTIONS:
        if o.kind is bool:
            out[o.name] = (bool, Field(o.default, description=o.help))
            continue
        if o.choices:
            out[o.name] = (Literal[o.choices], Field(o.default, description=o.help))  # type: ignore[valid-type]
            continue
        bounds: dict[str, Any] = {}
        if o.low is not None:
            bounds["gt" if o.low_open else "ge"] = o.kind(o.low)
        if o.high is not None:
            bounds["le"] = o.kind(o.high)
        if o.kind is float:
            bounds["allow_inf_nan"] = False
        number: Any = Annotated[o.kind, Field(**bounds)]
        out[o.name] = (number | Literal["auto"] if o.auto else number, Field(o.default, description=o.help))
    return out


# --- the command-line options every program that runs generations shares ----------------------


def finite_float(text: str) -> float:
    """argparse type: a finite float (NaN and infinities are refused with a one-line error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


int_or_auto = arg_type("draft_len")  # argparse type: an integer in range, or auto


def add_runtime_args(ap: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Where the cloud is and which draft engine runs (edge/runtime.py: DraftSpec, ClientConfig);
    the same flags and environment variables in sqs-edge generate|serve, sqs-loadtest and sqs-bench."""
    env = os.environ.get
    ap.add_argument("--cloud", default=env("SQS_CLOUD", "127.0.0.1:50051"), help="HOST:PORT of sqs-cloud")
    ap.add_argument("--draft-model", default=env("SQS_DRAFT_MODEL", "tiny"))
    ap.add_argument("--dtype", default=env("SQS_DTYPE"), choices=[None, "float32", "bfloat16"],
                    help="torch engine dtype (default: the cheaper one-token step of bf16 and fp32, measured at start)")
    ap.add_argument("--engine", default=env("SQS_ENGINE", "auto"), choices=ENGINES,
                    help="draft engine: auto (default) = llama.cpp where llama-cpp-python and the model's GGUF "
                         "exist, else torch")
    ap.add_argument("--wait-for-cloud", type=finite_float, default=0.0, metavar="S",
                    help="at the start, keep waiting this many seconds for a cloud that does not answer yet "
                         "(default 0: say at once that HOST:PORT does not answer)")
    ap.add_argument("--outage-window", type=finite_float, default=180.0, metavar="S",
                    help="a running generation rides out a cloud outage this long (restart, stall, lost verdicts)")
    ap.add_argument("--transport", choices=["stream", "unary"], default="stream",
                    help="one gRPC stream per session (default) or one unary call per round")
    ap.add_argument("--tls-ca", default=env("SQS_TLS_CA"), metavar="F",
                    help="TLS to the cloud: trust this CA (`sqs-cloud gen-certs DIR` writes ca.pem)")
    ap.add_argument("--tls-cert", default=env("SQS_EDGE_TLS_CERT"), metavar="F",
                    help="mutual TLS: this edge's certificate (its CN is the edge's identity at the cloud)")
    ap.add_argument("--tls-key", default=env("SQS_EDGE_TLS_KEY"), metavar="F", help="mutual TLS: its key")
    ap.add_argument("--token", default=env("SQS_TOKEN"), metavar="TOKEN",
                    help="bearer token for a cloud with --token-file (prefer SQS_TOKEN: a flag shows in ps)")
    ap.add_argument("--token-file", default=env("SQS_EDGE_TOKEN_FILE"), metavar="F",
                    help="read the bearer token from this file (a mounted secret; SQS_EDGE_TOKEN_FILE)")
    ap.add_argument("--insecure", action="store_true", default=env("SQS_INSECURE", "") == "1",
                    help="allow plaintext to a cloud outside loopback (SQS_INSECURE=1)")


def add_generation_args(ap: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The runtime flags and one --flag per generation option."""
    add_runtime_args(ap)
    add_arguments(ap)


def token_of(a: Any) -> str | None:
    """The bearer token of add_runtime_args' flags: --token, else the first line of --token-file;
    ValueError (one line) for a file that cannot be read."""
    if a.token or not getattr(a, "token_file", None):
        return a.token
    try:
        with open(a.token_file, encoding="utf-8") as f:
            return f.readline().strip() or None
    except OSError as exc:
        raise ValueError(f"--token-file: {exc.strerror}: {a.token_file}") from None
