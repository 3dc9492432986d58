"""sqs-loadtest: N concurrent edge clients against one cloud verifier, on loopback only.

  sqs-loadtest --clients 1 4 16 32 --requests 32 --duration-s 30 --max-new-tokens 32 \\
      [--cloud 127.0.0.1:50051 | --target-model tiny] [--draft-model tiny] [--json-out F] [--csv-out F]

Without --cloud a verifier is started in this process on 127.0.0.1 (any free port) with
--target-model. Each level runs --warmup unmeasured requests per client, then measured requests
until --requests (all clients together) or --duration-s, whichever comes first. Prints one table
row per level. Exit status: 0, 1 if a level had no successful request (or llama-server could not
run), 2 for bad usage, 130 when interrupted (the levels measured so far are still printed and written).

llama.cpp's llama-server side by side (--llama-server; the binary: `make llama-server`): after our
levels, one level per N against `llama-server --parallel N` (the target's GGUF), N client threads, the
same prompts, --max-new-tokens, --temperature and request/duration/warm-up rules; a second table.

Pinning for a capacity comparison on one machine (our cloud and llama-server on CPU 1, the edges'
drafting on CPU 0), e.g. N = 8:

  taskset -c 1 sqs-cloud --model qwen2.5-coder-1.5b --engine llama --torch-threads 1 --port 50051 \\
      --metrics-port 0 &
  taskset -c 0 sqs-loadtest --cloud 127.0.0.1:50051 --draft-model qwen2.5-coder-0.5b \\
      --target-model qwen2.5-coder-1.5b --clients 8 --requests 32 --duration-s 900 \\
      --max-new-tokens 48 --torch-threads 1 --llama-server --llama-server-cpus 1 --llama-server-threads 1

N edges drafting on one core step N times slower than real edges (each on its own device) would;
--edge-batch-window-ms 5 batches their draft steps into shared passes of one draft model
(loadtest/edge_batching.py), which brings them much closer. The cloud CPU per committed token
column (from /proc of the cloud's processes and of llama-server) is the capacity figure that does
not depend on how many edges this machine can simulate.

(taskset pins a process and the threads it starts; llama-server is pinned to --llama-server-cpus
whatever this process's own affinity. An in-process cloud is stopped before llama-server's levels;
an external one idles through them.)

Many clouds behind Envoy: `--cloud <envoy address> --cloud-metrics HOST:PORT ...` (each replica's
/metrics) adds per-replica rounds and sessions to the report, so affinity and spread show.

Cloud CPU per committed token (column cloud_cpu_ms/tok, both systems): utime + stime of the serving
processes (/proc/<pid>/stat) over each level's measured phase, per committed token. Our in-process
cloud shares this process with the edges' drafting, so its figure includes them (scope "process incl.
edges"); an external cloud is --cloud-pid PID ..., or else the processes listening on the
--cloud-metrics ports, or else on --cloud's port (not Envoy: then the column stays empty and the
record says why); llama-server is the process it starts. Every record also says what ran: commit,
CPU flags, load average per level, the cloud's engine, weight type and batching as the cloud reports
them (an in-process cloud always; an external one on its --cloud-metrics /metrics: sqs_cloud_info;
"not reported" without them), the edges' options, llama-server's version and arguments.

Which side limits (columns cloud_busy, edge_busy): the cores each side kept busy on average over the
measured phase (CPU seconds / wall_s). With an external cloud this process holds only the edges, and
its CPU is measured apart; a one-core side near 1.00 is the one that bounds tokens/s. Per level the
record also has the cloud's passes (sess/pass: from an external cloud's sqs_pass_* histograms on
--cloud-metrics) and, with --edge-batch-window-ms, the simulated edges' draft passes.

The soak (--soak, loadtest/soak.py): --clients N for --soak-minutes against --cloud, or against
--replicas sqs-cloud processes behind Envoy that it starts itself, a replica killed every
--kill-every-s (by --kill-cmd, or SIGKILL to its own and a restart); latency p50/p95 per --window-s,
resyncs, errors, per-replica counts, and --verify-tokens requests re-run alone to check their tokens:

  sqs-loadtest --soak --clients 16 --soak-minutes 10 --replicas 3 --kill-every-s 60 --draft-len 4 \
      --k 4 --ell 100 --no-pipeline --temperature 1 --verify-tokens 64

Exit status of a soak: 0, or 1 when a request failed, a token differed or a kill failed.
"""

from __future__ import annotations

import argparse
import os
import sys

from edge.options import OPTIONS
from loadtest.runner import DEFAULT_PROMPTS, LoadTestConfig, check_loopback


def build_parser() -> argparse.ArgumentParser:
    from edge.options import add_generation_args

    ap = argparse.ArgumentParser(
        prog="sqs-loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load = ap.add_argument_group("load")
    load.add_argument("--clients", type=int, nargs="+", default=[1], metavar="N",
                      help="concurrency levels, run in turn (one table row each)")
    load.add_argument("--requests", type=int, default=32, help="measured requests per level, all clients together")
    load.add_argument("--duration-s", type=float, default=30.0, help="measured seconds per level at most")
    load.add_argument("--warmup", type=int, default=1, help="unmeasured requests per client before each level")
    load.add_argument("--prompt", action="append", default=None,
                      help=f"prompt (repeat for several; default: {len(DEFAULT_PROMPTS)} built-in short prompts)")
    load.add_argument("--target-model", default="tiny", help="target model of the in-process cloud (without --cloud)")
    load.add_argument("--cloud-workers", type=int, default=2, help="torch worker threads of the in-process cloud")
    load.add_argument("--batch-window-ms", type=float, default=2.0, metavar="MS",
                      help="in-process cloud: cross-session batched verification window (0 disables), as sqs-cloud")
    load.add_argument("--batch-max-rows", type=int, default=64, help="in-process cloud: rows of one batched pass at most")
    load.add_argument("--edge-batch-window-ms", type=float, default=0.0, metavar="MS",
                      help="> 0: the simulated edges' draft steps that are ready within MS share one batched pass "
                           "of the draft model (N edges on one core then step about as fast as one; real edges "
                           "draft on their own devices); 0: each edge drafts alone")
    load.add_argument("--connect-timeout-s", type=float, default=10.0)
    load.add_argument("--round-timeout-s", type=float, default=60.0)
    load.add_argument("--retries", type=int, default=0, help="client retries per call (0: every failure counts)")
    load.add_argument("--meter", action="store_true", help="count wire bytes through a relay per client")
    load.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    load.add_argument("--json-out", metavar="FILE", help="write the report as JSON")
    load.add_argument("--csv-out", metavar="FILE", help="write one CSV row per measured request")
    load.add_argument("--no-progress", action="store_true", help="no progress bar")
    load.add_argument("--log-level", default=os.environ.get("SQS_LOG_LEVEL", "WARNING"))
    load.add_argument("--cloud-metrics", nargs="+", default=[], metavar="HOST:PORT",
                      help="each cloud replica's /metrics (loopback): per-replica rounds and sessions in the report")
    load.add_argument("--cloud-pid", type=int, nargs="+", default=[], metavar="PID",
                      help="with --cloud: the cloud's process(es), CPU summed, for the cloud CPU per token column "
                           "(default: the processes listening on the --cloud-metrics ports, else on --cloud's port)")
    soak = ap.add_argument_group("soak (loadtest/soak.py)")
    soak.add_argument("--soak", action="store_true", help="one long run with replica kills instead of levels")
    soak.add_argument("--soak-minutes", type=float, default=10.0, metavar="D")
    soak.add_argument("--replicas", type=int, default=3,
                      help="without --cloud: sqs-cloud replicas (--target-model) and Envoy started on loopback")
    soak.add_argument("--kill-every-s", type=float, default=0.0, metavar="S", help="kill a replica every S s (0: never)")
    soak.add_argument("--kill-cmd", metavar="CMD",
                      help="with --cloud: shell command that kills a replica (SQS_KILL_INDEX=0, 1, ... in its env)")
    soak.add_argument("--restart-after-s", type=float, default=0.0, metavar="S",
                      help="own replicas: restart a killed replica after S s (on its port)")
    soak.add_argument("--window-s", type=float, default=30.0, metavar="S", help="report latency per S s")
    soak.add_argument("--verify-tokens", type=int, default=0, metavar="N",
                      help="re-run N requests alone (resynced ones first; -1: all) and compare their tokens")
    ls = ap.add_argument_group("llama-server side by side")
    ls.add_argument("--llama-server", action="store_true",
                    help="after our levels, the same levels against llama.cpp's llama-server --parallel N")
    ls.add_argument("--llama-server-binary", metavar="PATH", help="default: the one `make llama-server` built")
    ls.add_argument("--llama-server-model", metavar="NAME|FILE.gguf",
                    help="default: --target-model's GGUF (tiny: written on the fly)")
    ls.add_argument("--llama-server-cpus", metavar="CPUS",
                    help="pin llama-server to these CPUs (taskset -c syntax: 1 or 0,2 or 2-3; default: this process's)")
    ls.add_argument("--llama-server-threads", type=int, default=0,
                    help="llama-server --threads (default: one per --llama-server-cpus CPU)")
    gen = ap.add_argument_group("generation (as sqs-edge generate)")
    add_generation_args(gen)
    # A load test never picks up $SQS_CLOUD: without --cloud it starts its own verifier.
    ap.set_defaults(cloud=None, max_new_tokens=32)
    return ap


def config_from_args(a: argparse.Namespace) -> LoadTestConfig:
    return LoadTestConfig(
        clients=tuple(a.clients), requests=a.requests, duration_s=a.duration_s, warmup=a.warmup, cloud=a.cloud,
        target_model=a.target_model, draft_model=a.draft_model, dtype=a.dtype, engine=a.engine,
        prompts=tuple(a.prompt) if a.prompt else DEFAULT_PROMPTS,
        **{o.name: getattr(a, o.name) for o in OPTIONS},
        cloud_pids=tuple(a.cloud_pid),
        connect_timeout_s=a.connect_timeout_s, round_timeout_s=a.round_timeout_s, retries=a.retries,
        meter=a.meter, cloud_workers=a.cloud_workers,
        batch_window_ms=a.batch_window_ms, batch_max_rows=a.batch_max_rows, edge_batch_window_ms=a.edge_batch_window_ms, progress=not a.no_progress,
        llama_server=a.llama_server, llama_server_binary=a.llama_server_binary,
        llama_server_model=a.llama_server_model, llama_server_threads=a.llama_server_threads,
        llama_server_cpus=_cpus(a.llama_server_cpus), cloud_metrics=tuple(a.cloud_metrics),
        soak=a.soak, soak_minutes=a.soak_minutes, replicas=a.replicas, kill_every_s=a.kill_every_s,
        kill_cmd=a.kill_cmd, restart_after_s=a.restart_after_s, window_s=a.window_s, verify_tokens=a.verify_tokens,
    )


def _cpus(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    from bench.llama_server import parse_cpus

    return parse_cpus(text)


def _fail(msg: str, code: int) -> int:
    print(f"sqs-loadtest: error: {msg}", file=sys.stderr)
    return code


def run(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cloud is not None:
        try:
            check_loopback(a.cloud)  # before anything is loaded
        except ValueError as exc:
            return _fail(str(exc), 2)
    try:
        config = config_from_args(a)
        config.validate()
    except ValueError as exc:
        return _fail(str(exc), 2)
    if config.llama_server:
        from bench.llama_server import LlamaServerError, resolve_binary

        try:
            resolve_binary(config.llama_server_binary)  # before anything is loaded
        except LlamaServerError as exc:
            return _fail(str(exc), 2)

    # gRPC core logs at INFO (e.g. a GOAWAY when the in-process cloud stops); keep its errors only.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from common.logs import setup_logging

    setup_logging(a.log_level)
    if a.torch_threads > 0:
        import torch

        torch.set_num_threads(a.torch_threads)

    from loadtest.runner import run_load_test
    from sqs_models.engines import EngineUnavailable
    from sqs_models.registry import ModelNotInstalled

    if config.soak:
        return _soak(config, a.json_out)
    try:
        report = run_load_test(config)
    except KeyboardInterrupt:
        return _fail("interrupted before any level was measured", 130)
    except (ModelNotInstalled, EngineUnavailable) as exc:
        return _fail(str(exc), 2)
    except ValueError as exc:
        return _fail(str(exc), 2)
    except OSError as exc:  # e.g. the in-process cloud could not bind
        return _fail(str(exc), 1)

    print(report.header())
    print(report.table(), flush=True)
    for path, write in ((a.json_out, report.write_json), (a.csv_out, report.write_csv)):
        if path:
            try:
                write(path)
            except OSError as exc:
                return _fail(f"cannot write {path}: {exc}", 1)
    if report.interrupted:
        return 130
    if report.llama_server is not None and report.llama_server.get("error"):
        return 1
    if any(lv.summary()["ok"] == 0 for lv in report.levels + report.llama_levels):
        return 1
    return 0


def _soak(config, json_out: str | None) -> int:
    from loadtest.replicas import EnvoyUnavailable
    from loadtest.soak import run_soak
    from sqs_models.engines import EngineUnavailable
    from sqs_models.registry import ModelNotInstalled

    try:
        report = run_soak(config)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except (ModelNotInstalled, EngineUnavailable, EnvoyUnavailable, ValueError) as exc:
        return _fail(str(exc), 2)
    except (OSError, RuntimeError) as exc:  # a replica or Envoy that would not start
        return _fail(str(exc), 1)
    print(report.text(), flush=True)
    if json_out:
        try:
            report.write_json(json_out)
        except OSError as exc:
            return _fail(f"cannot write {json_out}: {exc}", 1)
    s = report.summary()
    if report.interrupted:
        return 130
    return 1 if s["errors"] or s["token_mismatches"] or s["failed_kills"] or not s["ok"] else 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
