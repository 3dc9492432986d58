#!/usr/bin/env python3
"""One SQS-SD generation over a shaped link built from network namespaces (run as root).

    sudo .venv/bin/python scripts/netns_link.py --uplink-rate 256kbit --downlink-rate 2mbit --delay-ms 25 \\
        --prompt "def fibonacci(n):" --max-new-tokens 32 --sparsifier topk --k 8 [-- EXTRA EDGE ARGS]

Topology (a unique suffix S per run; addresses exist only inside these namespaces):

    sqs-edge-S  veth-e 10.201.0.1/30 <-> 10.201.0.2/30 veth-le  sqs-link-S  veth-lc 10.201.0.5/30 <-> 10.201.0.6/30 veth-c  sqs-cloud-S
                                         tbf --downlink-rate       relay     tbf --uplink-rate

The relay (python -m linksim.relay, in sqs-link) listens on 10.201.0.2:PORT, adds --delay-ms to each
direction and forwards to sqs-cloud (python -m cloud --model MODEL --host 10.201.0.6) in sqs-cloud.
The edge (python -m edge generate --cloud 10.201.0.2:PORT ... --json) runs in sqs-edge.

Prints one JSON object: the link settings, the edge's JSON result, the interface byte/packet counters
of the edge veth and both link veths over the edge run (ip -s link), the tbf stats (tc -s qdisc), the
relay's byte counts, and the uplink-time model (bits / rate + rounds * delay). Namespaces and
processes are always removed at exit, on error and on SIGINT/SIGTERM/SIGHUP.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linksim.netns import (  # noqa: E402
    CLOUD_IP, EDGE_IP, LINK_CLOUD_IP, LINK_EDGE_IP, LinkConfig, NetnsError, NetnsLink, parse_rate, uplink_time_model,
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="netns_link.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    link = ap.add_argument_group("link")
    link.add_argument("--uplink-rate", default="256kbit", help="tbf rate toward the cloud (tc syntax)")
    link.add_argument("--downlink-rate", default="2mbit", help="tbf rate toward the edge (tc syntax)")
    link.add_argument("--delay-ms", type=float, default=10.0, help="relay one-way delay, each direction")
    link.add_argument("--jitter-ms", type=float, default=0.0)
    link.add_argument("--loss", type=float, default=0.0, help="relay: chunk held back with this probability")
    link.add_argument("--loss-penalty-ms", type=float, default=200.0)
    link.add_argument("--burst", type=int, default=None,
                      help="tbf bucket in bytes (default: max(1600, 1 ms at the rate): one full frame)")
    link.add_argument("--tbf-latency-ms", type=float, default=500.0, help="tbf queue limit as waiting time")
    link.add_argument("--port", type=int, default=50051)
    link.add_argument("--suffix", default=None, help="namespace name suffix (default: pid-random)")
    run = ap.add_argument_group("generation")
    run.add_argument("--model", default="tiny", help="target model of sqs-cloud (draft: --draft-model after --)")
    run.add_argument("--prompt", default="def fibonacci(n):")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--sparsifier", default="topk")
    run.add_argument("--k", type=int, default=8)
    run.add_argument("--budget-bits", type=float, default=None)
    run.add_argument("--cloud-timeout-s", type=float, default=120.0)
    run.add_argument("--edge-timeout-s", type=float, default=300.0)
    run.add_argument("--pretty", action="store_true", help="indent the JSON")
    ap.add_argument("edge_args", nargs="*", help="after --: more sqs-edge generate options")
    return ap


def _raise_exit(signum, _frame):
    raise SystemExit(128 + signum)


def run(a: argparse.Namespace) -> dict:
    cfg = LinkConfig(uplink_rate=a.uplink_rate, downlink_rate=a.downlink_rate, delay_ms=a.delay_ms,
                     jitter_ms=a.jitter_ms, loss=a.loss, loss_penalty_ms=a.loss_penalty_ms, burst=a.burst,
                     tbf_latency_ms=a.tbf_latency_ms, port=a.port, suffix=a.suffix)
    edge_args = ["--prompt", a.prompt, "--max-new-tokens", str(a.max_new_tokens), "--sparsifier", a.sparsifier,
                 "--k", str(a.k)]
    if a.budget_bits is not None:
        edge_args += ["--budget-bits", f"{a.budget_bits:g}"]
    edge_args += a.edge_args
    link = NetnsLink(cfg)
    try:
        link.setup()
        link.start_relay()
        link.start_cloud(a.model, timeout_s=a.cloud_timeout_s)
        r = link.run_edge(edge_args, timeout_s=a.edge_timeout_s)
        return {
            "link": {
                "namespaces": link.ns,
                "addresses": {"edge": EDGE_IP, "link_edge_side": LINK_EDGE_IP, "link_cloud_side": LINK_CLOUD_IP,
                              "cloud": CLOUD_IP},
                "uplink_rate_bps": link.uplink_bps, "downlink_rate_bps": link.downlink_bps,
                "uplink_burst_bytes": link.burst_bytes("uplink"), "downlink_burst_bytes": link.burst_bytes("downlink"),
                "delay_ms": a.delay_ms, "jitter_ms": a.jitter_ms, "loss": a.loss,
                "tbf_latency_ms": a.tbf_latency_ms,
            },
            "edge_command": r.command,
            "edge": r.result,
            "edge_wall_s": round(r.wall_s, 3),
            "interfaces": r.interfaces,
            "qdisc": r.qdisc,
            "relay": r.relay,
            "uplink_model": uplink_time_model(r.result, link.uplink_bps, a.delay_ms, link.burst_bytes("uplink")),
        }
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # let the teardown finish
            signal.signal(sig, signal.SIG_IGN)
        link.close()


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        parse_rate(a.uplink_rate), parse_rate(a.downlink_rate)
    except ValueError as exc:
        print(f"netns_link: error: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("netns_link: error: must run as root (network namespaces, veth and tc need CAP_NET_ADMIN)",
              file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the shell started us with it ignored
    try:
        out = run(a)
    except NetnsError as exc:
        print(f"netns_link: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("netns_link: interrupted (namespaces removed)", file=sys.stderr)
        return 130
    print(json.dumps(out, indent=2 if a.pretty else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
