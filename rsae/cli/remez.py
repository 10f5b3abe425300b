"""`rsae remez`: fit the pole-free rational to a gate by relaxed Remez exchange, print it, plot it."""

from __future__ import annotations

import argparse
import json

import numpy as np

from rsae.rational.remez import (
    CANONICAL_THRESHOLD,
    DEFAULT_GAP,
    DEFAULT_GRID_POINTS,
    TARGETS,
    GateFit,
    fit_gate,
    gate_target,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, choices=TARGETS, help="gate to fit")
    parser.add_argument(
        "--degree", required=True, nargs=2, type=int, metavar=("P", "Q"), help="numerator and denominator degree"
    )
    parser.add_argument(
        "--threshold", type=float, default=None, help=f"jump location in (0, 1) (default {CANONICAL_THRESHOLD})"
    )
    parser.add_argument(
        "--gap", type=float, default=None, help=f"half-width excluded around the jump (default {DEFAULT_GAP})"
    )
    parser.add_argument(
        "--smoothing", type=float, default=None, help="half-width of a C1 smoothstep instead of the jump"
    )
    parser.add_argument("--grid-points", type=int, default=DEFAULT_GRID_POINTS, help="uniform grid size on [-1, 1]")
    parser.add_argument("--refine", action="store_true",
                        help="refine the points with the local maxima of the error on a fine check grid until the "
                             "fit is within 0.5%% of the true minimax error")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write target, fit and error curve to this PNG")


def run(args: argparse.Namespace) -> int:
    """Fit as the parsed arguments say and print the result (bad input raises ValueError: exit 2 in `rsae`)."""
    fit = fit_gate(args.target, tuple(args.degree), threshold=args.threshold, gap=args.gap,
                   smoothing=args.smoothing, grid_points=args.grid_points, refine=args.refine)
    if args.plot:
        plot_fit(fit, args.plot)
    if args.json:
        print(json.dumps(fit.to_json()))
    else:
        p, q = fit.degree
        print(
            f"{fit.target} ({p},{q}) threshold={fit.threshold:g} gap={fit.gap:g} smoothing={fit.smoothing:g}: "
            f"max_error={fit.max_error:.4e} (outside the gap; {fit.fine_max_error():.4e} on the fine check grid), "
            f"gap_overshoot={fit.gap_overshoot:.2e}, "
            f"min_q={fit.min_q:.4g}, {fit.iterations} LPs, {fit.seconds:.2f} s"
        )
    return 0


def plot_fit(fit: GateFit, path: str) -> None:
    """Two panels: target and fit, then the error curve; the gap shaded in both."""
    from rsae.eval.plots import pyplot

    plt = pyplot()
    x = fit.grid
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(x, gate_target(x, fit.threshold, fit.smoothing), label="target", color="black", lw=1)
    top.plot(x, fit(x), label=f"fit {fit.degree}", color="tab:red", lw=1)
    top.legend()
    top.set_title(f"{fit.target}: max error {fit.max_error:.3e} outside the gap")
    error = np.where(fit.in_gap, np.nan, fit.error_curve)
    bottom.plot(x, error, color="tab:blue", lw=0.8)
    bottom.axhline(fit.max_error, color="gray", ls=":")
    bottom.axhline(-fit.max_error, color="gray", ls=":")
    bottom.set_ylabel("fit - target")
    bottom.set_xlabel("t")
    if fit.gap > 0:
        for ax in (top, bottom):
            ax.axvspan(fit.threshold - fit.gap, fit.threshold + fit.gap, color="gold", alpha=0.3, label="gap")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
