"""The `rsae` command: one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys

# Nothing rsae does needs the Hub at run time; without this every failed lookup retries for ~23 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    from rsae import cache, quickstart, remez

    parser = argparse.ArgumentParser(prog="rsae", description="Rational Sparse Autoencoders")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quick = commands.add_parser("quickstart", help="run the whole pipeline on built-in data and print a table")
    quickstart.add_quickstart_arguments(quick)
    quick.set_defaults(handler=quickstart.run_quickstart)

    fit = commands.add_parser("remez", help="fit the pole-free rational to a gate by relaxed Remez exchange")
    remez.add_remez_arguments(fit)
    fit.set_defaults(handler=remez.run_remez)

    activations = commands.add_parser("cache", help="cache LM activations (resumable, checksummed shards)")
    cache.add_cache_arguments(activations)
    activations.set_defaults(handler=cache.run_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
