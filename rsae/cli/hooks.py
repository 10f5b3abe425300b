"""`rsae hooks MODEL`: every hook point of a language model, blocks in layer order."""

from __future__ import annotations

import argparse

from rsae.data.lm import DEFAULT_MODEL, load_lm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"'{DEFAULT_MODEL}' (built in), a local Hugging Face folder or a Hub name")
    parser.add_argument("--grep", default=None, metavar="TEXT", help="only hook points containing TEXT")


def run(args: argparse.Namespace) -> int:
    lm = load_lm(args.model, verbose=False)
    for name in lm.hook_names():
        if args.grep is None or args.grep in name:
            print(name)
    return 0
