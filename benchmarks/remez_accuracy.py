"""How far the shipped Remez fits' errors reach between the points of their 4001-point fitting grid.

For every fit in `rsae/rational/remez_tables.json`: the maximum error outside the gap on the fitting grid
(`max_error`, what the tables quote) against the same on the fine check grid (`fine_max_error`: 1,000,001
uniform points plus 200,000 clustered at the kink or jump), and their ratio. Writes
`benchmarks/results/remez_accuracy.{json,md}`. Then every ReLU degree fitted again with `refine=True` (the fine
grid's local maxima join the fitting points until the fine-grid error is within 0.5% of the level on them): its
fine-grid error, the ratio to its level on the uniform grid (a lower bound of the true minimax error, so the
ratio bounds how far the fit is from it), and the fit's time.

    python benchmarks/remez_accuracy.py
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
from timing import cpu_model

from rsae.rational.remez import FINE_GRID_POINTS, TABLE_SPECS, fit_gate, lookup_fit

OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    rows = []
    for target, degree in TABLE_SPECS:
        fit = lookup_fit(target, degree)
        assert fit is not None, (target, degree)
        start = time.perf_counter()
        fine = fit.fine_max_error()
        rows.append({"target": target, "degree": list(degree), "grid_points": fit.grid_points,
                     "max_error": fit.max_error, "fine_max_error": fine, "ratio": fine / fit.max_error,
                     "check_seconds": round(time.perf_counter() - start, 3)})
        print(f"{target:9} {degree}: grid {fit.max_error:.4e}, fine {fine:.4e}, ratio {fine / fit.max_error:.4f}")
    refined = []
    for target, degree in TABLE_SPECS:
        if target != "relu":
            continue
        fit = fit_gate(target, degree, refine=True)
        fine = fit.fine_max_error()
        refined.append({"target": target, "degree": list(degree), "fine_max_error": fine, "level": fit.level,
                        "ratio_to_lower_bound": fine / fit.level, "seconds": round(fit.seconds, 2)})
        print(f"refined {degree}: fine {fine:.4e}, within {fine / fit.level - 1:.2%} of the minimax, "
              f"{fit.seconds:.1f} s")
    machine = {"cpu": cpu_model(), "python": platform.python_version(), "numpy": np.__version__,
               "fine_grid_points": FINE_GRID_POINTS}
    OUT.mkdir(exist_ok=True)
    report = {"machine": machine, "fits": rows, "refined": refined}
    (OUT / "remez_accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# Remez fits: error on the fitting grid vs the fine check grid", "",
             f"Shipped fits (`rsae/rational/remez_tables.json`, 4001-point grid), checked on {FINE_GRID_POINTS:,} "
             "uniform points plus 200,000 clustered at the kink / jump (`python benchmarks/remez_accuracy.py`; "
             f"{machine['cpu']}, numpy {machine['numpy']}).", "",
             "| target | degree | grid max error | fine-grid max error | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['target']} | ({r['degree'][0]},{r['degree'][1]}) | {r['max_error']:.4e} | "
              f"{r['fine_max_error']:.4e} | {r['ratio']:.4f} |" for r in rows]
    lines += ["", "Refined ReLU fits (`fit_gate(..., refine=True)`, `rsae remez --refine`): the fine-grid error, and "
              "how far above the true minimax error it can be at most: its ratio to its level on the 4001 uniform "
              "points, which (the fit being minimax on a superset of them) is at most the true minimax error.", "",
              "| degree | fine-grid max error | at most above the minimax | fit time (s) |", "|---|---|---|---|"]
    lines += [f"| ({r['degree'][0]},{r['degree'][1]}) | {r['fine_max_error']:.4e} | "
              f"{r['ratio_to_lower_bound'] - 1:.2%} | {r['seconds']} |" for r in refined]
    (OUT / "remez_accuracy.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
