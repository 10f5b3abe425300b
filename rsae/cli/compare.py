"""`rsae compare`: the reports of several runs side by side, and an MSE-vs-L0 plot."""

from __future__ import annotations

import argparse
import sys

from rsae.eval.report import REPORT_FILE, compare, plot_mse_vs_l0, read_report, run_labels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help=f"{REPORT_FILE} files, or folders holding one")
    parser.add_argument("--metrics", default=None, help="comma-separated metrics to show (default: all)")
    parser.add_argument("--plot", default=None, metavar="PATH", help="also write an MSE-vs-L0 scatter to PATH")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead of plain text")
    parser.add_argument("--l0-reference", type=int, default=None, metavar="N",
                        help="mark the runs whose L0 is not within 10%% of run N's (0: the first) as not comparable")


def run(args: argparse.Namespace) -> int:
    """Print the comparison of `args.runs` (an unreadable report raises: exit 2 in `rsae`)."""
    reports = [read_report(run) for run in args.runs]
    labels = run_labels(reports, args.runs)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    print(compare(reports, metrics, markdown=args.markdown, labels=labels, l0_reference=args.l0_reference), end="")
    if args.plot:
        print(f"wrote {plot_mse_vs_l0(reports, args.plot, labels=labels)}", file=sys.stderr)
    return 0
