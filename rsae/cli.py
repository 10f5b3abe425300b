"""The `rsae` command: one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

# Nothing rsae does needs the Hub at run time; without this every failed lookup retries for ~23 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LIGHTNING_COMMANDS = ("fit", "validate", "test")

# Lightning's generic advice that does not apply here: ActivationDataModule is single-process and resumes
# mid-epoch through its own state; the treespec notice is Lightning's own deprecation.
for _message in ("Your `IterableDataset` has `__len__` defined", "You're resuming from a checkpoint that ended before",
                 r".*isinstance\(treespec, LeafSpec\)"):
    warnings.filterwarnings("ignore", message=_message)
# ... and its advertisements for cloud services, printed by every Trainer.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.getMessage()).startswith("💡 Tip")
)


def build_parser() -> argparse.ArgumentParser:
    from rsae import cache, quickstart, remez, report

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

    lightning_help = ("train a stage from a YAML config (LightningCLI; see configs/)",
                      "validate a model on held-out activations (LightningCLI)",
                      "evaluate and write a report: metrics, spliced CE, probing, plots (LightningCLI)")
    for name, what in zip(LIGHTNING_COMMANDS, lightning_help, strict=True):
        # Listed for --help only: main() hands these to LightningCLI before argparse sees them.
        commands.add_parser(name, help=what, add_help=False)

    side_by_side = commands.add_parser("compare", help="print the reports of several runs side by side")
    report.add_compare_arguments(side_by_side)
    side_by_side.set_defaults(handler=report.run_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from rsae.lightning_cli import main as lightning_main

        return lightning_main(argv)
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
