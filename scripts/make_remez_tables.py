"""Regenerate rsae/rational/remez_tables.json: minimax gate fits at the standard targets and degrees.

Run from the repository root: `python scripts/make_remez_tables.py`. The fits are deterministic
(HiGHS is), so tests/rational/test_remez.py re-runs some of them and compares with the table.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import scipy

from rsae.rational.remez import CANONICAL_THRESHOLD, DEFAULT_GAP, DEFAULT_GRID_POINTS, TABLE_FORMAT_VERSION, table_fits

OUTPUT = Path(__file__).resolve().parent.parent / "rsae" / "rational" / "remez_tables.json"


def main() -> int:
    fits = table_fits()
    for fit in fits:
        print(f"{fit.target:9s} {fit.degree}: max_error {fit.max_error:.4e}, min_q {fit.min_q:.3g}, "
              f"{fit.seconds:.2f} s")
    table = {
        "format_version": TABLE_FORMAT_VERSION,
        "generator": "scripts/make_remez_tables.py",
        "settings": {
            "grid_points": DEFAULT_GRID_POINTS,
            "canonical_threshold": CANONICAL_THRESHOLD,
            "default_gap": DEFAULT_GAP,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "python": platform.python_version(),
        },
        "fits": [fit.to_json() for fit in fits],
    }
    OUTPUT.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
