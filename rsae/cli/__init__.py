"""The `rsae` command: one subcommand per job, one line per error.

A failing command prints `rsae <command>: error: <what> (<fix>)` on stderr and exits 2; the traceback is
shown with `--debug` (anywhere on the command line) or `RSAE_DEBUG=1`. `fit`, `validate` and `test` go to
Lightning's CLI (`rsae.cli.lightning`), the others to argparse commands, one module each.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

LIGHTNING_COMMANDS = ("fit", "validate", "test")
LIGHTNING_HELP = {"fit": "train a stage from a YAML config (LightningCLI; see configs/)",
                  "validate": "validate a model on held-out activations (LightningCLI)",
                  "test": "evaluate and write a report: metrics, spliced CE, probing, plots (LightningCLI)"}
COMMANDS: dict[str, str] = {
    "quickstart": "run the whole pipeline on built-in data and print a table",
    "upgrade": "the same pipeline for an SAE you have: import it, calibrate, fine-tune, compare",
    "study": "the reproduction study: a grid of pipelines (families x sparsities x modes x seeds), resumable",
    "import": "import an SAE from a public format (SAELens, sparsify, dictionary_learning, Gemma Scope, OpenAI)",
    "export": "export an rsae checkpoint to another library's format (SAELens)",
    "zoo": "the model zoo: list, card, pull, push, build",
    "remez": "fit the pole-free rational to a gate by relaxed Remez exchange",
    "cache": "cache LM activations (resumable, checksummed shards)",
    "hooks": "list the hook points of a language model",
    "compare": "print the reports of several runs side by side",
}
"""argparse subcommands; each is the module `rsae.cli.<name>` with `add_arguments(parser)` and `run(args)`."""
MODULES = {"import": "import_sae"}
"""Commands whose module name differs (`import` is a Python keyword)."""


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("RSAE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsae", description="Rational Sparse Autoencoders",
                                     epilog="--debug (or RSAE_DEBUG=1) shows the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, what in COMMANDS.items():
        sub = commands.add_parser(name, help=what)
        module = importlib.import_module(f"rsae.cli.{MODULES.get(name, name)}")
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    for name, what in LIGHTNING_HELP.items():
        # Listed for --help only: main() hands these to LightningCLI before argparse sees them.
        commands.add_parser(name, help=what, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv else "rsae"
    if command in LIGHTNING_COMMANDS:
        from rsae.cli.lightning import main as lightning_main

        return run_reporting_errors(command, lambda: lightning_main(argv), debug)
    args = build_parser().parse_args(argv)
    return run_reporting_errors(command, lambda: int(args.handler(args) or 0), debug)


def run_reporting_errors(command: str, run: Callable[[], int], debug: bool) -> int:
    """Run a command; an error becomes one line on stderr and exit status 2 (unless `debug`)."""
    try:
        return run()
    except KeyboardInterrupt:
        print(f"rsae {command}: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every error reaches the user as one line
        if debug:
            raise
        print(f"rsae {command}: error: {one_line(error)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """The error's message on one line, its type named when the message alone would not say what happened."""
    message = " ".join(str(error).split()) or type(error).__name__
    cause = error.__cause__ or error.__context__
    if isinstance(error, (KeyError, AttributeError, TypeError, RuntimeError)) or not str(error).strip():
        message = f"{type(error).__name__}: {message}"
    if isinstance(error, RuntimeError) and cause is not None and str(cause) and str(cause) not in message:
        message += f" (caused by {type(cause).__name__}: {' '.join(str(cause).split())})"
    if "(" not in message and ";" not in message:
        message += " (rerun with --debug for the traceback)"
    return message


if __name__ == "__main__":
    sys.exit(main())
