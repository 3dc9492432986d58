"""sqs-bench: benchmarks that print their figures.

  sqs-bench codec [--quick]      time and bits per draft token for every scheme
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sqs-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("codec", help="codec microbenchmark (time and bits per draft token)")
    c.add_argument("--quick", action="store_true", help="fewer distributions, V = 50257 only")
    c.add_argument("--n", type=int, default=64, help="distributions per setting")
    a = ap.parse_args(argv)
    if a.cmd == "codec":
        from bench.codec_bench import format_table, run

        rows = run(vocabs=(50257,), n=16) if a.quick else run(n=a.n)
        print(format_table(rows))
    sys.exit(0)


if __name__ == "__main__":
    main()
