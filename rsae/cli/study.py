"""`rsae study CONFIG`: the reproduction study, a grid of quickstart pipelines with the control in every cell.

A study config (`configs/study/*.yaml`) names the pipeline shared by every cell (LM, layer, corpora, token budget,
width, epochs: the `rsae quickstart` flags) and the grid: per family the sparsities (`k` for TopK, `target_l0`
for ReLU and JumpReLU, whose teachers the L0 controller holds there), the gate modes, the seeds per mode, and
teacher budgets (multiples of the teacher's epochs) for chosen cells. Every cell runs the four quickstart runs
(teacher, RSAE-init, RSAE, control) through the quickstart's stages and configs, so the control gets exactly the
RSAE's fine-tuning steps, data order, schedule and optimiser.

Shared work is done once: one training cache and one evaluation cache for the whole study, and one teacher per
(family, sparsity, seed, budget), linked into each mode's cell. The study is resumable at every level: a finished
cell is skipped, a finished stage reused, an interrupted one resumed. `OUT/results.json` and `OUT/results.md`
hold every cell's table and the verdicts: RSAE minus control per cell, and per family and mode the RSAE's MSE
against the control's MSE-vs-L0 frontier (interpolated in log-log between the sparsities) at the RSAE's own L0.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rsae.cli.quickstart import STAGES

CELL_FILE = "cell.json"
"""What a cell's folder holds besides its pipeline: the cell itself, so results never parse folder names."""
CONFIG_KEYS = {"out", "pipeline", "grid", "modes", "seeds", "budgets"}
FAMILY_SPARSITY = {"topk": "k", "relu": "target_l0", "jumprelu": "target_l0"}
"""The flag each family's sparsity is set by."""


@dataclasses.dataclass(frozen=True)
class Cell:
    family: str
    sparsity: float
    mode: str
    seed: int
    budget: float = 1.0
    """Multiple of the pipeline's teacher epochs."""

    @property
    def teacher(self) -> str:
        """The teacher's name: cells that differ only in mode share it."""
        budget = "" if self.budget == 1 else f"-x{self.budget:g}"
        sparsity = f"k{self.sparsity:g}" if self.family == "topk" else f"l0-{self.sparsity:g}"
        return f"{self.family}-{sparsity}-s{self.seed}{budget}"

    @property
    def name(self) -> str:
        return f"{self.teacher}-{self.mode}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="a study config (see configs/study/)")
    parser.add_argument("--only", default=None, help="run only the cells whose name contains this text")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and stop")


def read_config(path: Path) -> dict[str, Any]:
    """The study config, refusing unknown keys, families and modes in one line each."""
    if not path.is_file():
        raise ValueError(f"no study config {path} (see configs/study/ for the shipped ones)")
    config = yaml.safe_load(path.read_text()) or {}
    unknown = set(config) - CONFIG_KEYS
    if unknown or "grid" not in config:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} or no 'grid'; a study config has {sorted(CONFIG_KEYS)}")
    for family in config["grid"]:
        if family not in FAMILY_SPARSITY:
            raise ValueError(f"{path}: grid family {family!r} is not one of {sorted(FAMILY_SPARSITY)}")
    for mode in config.get("modes", ["masked"]):
        if mode not in ("masked", "pure", "thresholded"):
            raise ValueError(f"{path}: mode {mode!r} is not masked, pure or thresholded")
    return config


def cells(config: dict[str, Any]) -> list[Cell]:
    """Every cell of the grid: families x sparsities x modes x that mode's seeds, plus the budget cells."""
    modes = config.get("modes", ["masked"])
    seeds = config.get("seeds", {})
    grid = [Cell(family, float(sparsity), mode, int(seed))
            for family, sparsities in config["grid"].items() for sparsity in sparsities
            for mode in modes for seed in seeds.get(mode, [0])]
    for spec in config.get("budgets", []):
        for budget in spec["budgets"]:
            if budget != 1:
                grid += [Cell(spec["family"], float(spec["sparsity"]), "masked", int(seed), float(budget))
                         for seed in seeds.get("masked", [0])]
    return grid


def cell_args(base: argparse.Namespace, cell: Cell, out: Path) -> argparse.Namespace:
    """The quickstart arguments of one cell."""
    args = copy.copy(base)
    args.out = out / "cells" / cell.name
    args.family, args.mode, args.seed = cell.family, cell.mode, cell.seed
    setattr(args, FAMILY_SPARSITY[cell.family], int(cell.sparsity) if cell.family == "topk" else cell.sparsity)
    args.teacher_epochs = base.teacher_epochs * cell.budget
    return args


def _link(link: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(target.resolve(), target_is_directory=True)


def run(args: argparse.Namespace) -> int:
    from rsae.cli import quickstart

    config = read_config(args.config)
    out = Path(config.get("out", "runs/study"))
    parser = argparse.ArgumentParser()
    quickstart.add_arguments(parser)
    base = parser.parse_args([])
    for key, value in (config.get("pipeline") or {}).items():
        if not hasattr(base, key):
            raise ValueError(f"{args.config}: pipeline key {key!r} is not a quickstart flag")
        setattr(base, key, value)
    base.out = out
    todo = [cell for cell in cells(config) if args.only is None or args.only in cell.name]
    if args.dry_run:
        for cell in todo:
            print(f"{cell.name}: teacher {cell.teacher}, {base.teacher_epochs * cell.budget:g} teacher epochs")
        return 0
    start = time.perf_counter()
    quickstart.with_flushed_denormals(lambda a: _run_cells(a, todo, out, start), base)
    return 0


def _run_cells(base: argparse.Namespace, todo: list[Cell], out: Path, start: float) -> int:
    from rsae.cli import quickstart

    quickstart.cache_activations(base, base.model, f"blocks.{base.layer}.hook_resid_post")
    for i, cell in enumerate(todo, 1):
        args = cell_args(base, cell, out)
        if all((args.out / "reports" / run / "report.json").is_file() for run in STAGES):
            print(f"[study {i}/{len(todo)}] {cell.name}: done already", flush=True)
            continue
        print(f"[study {i}/{len(todo)}] {cell.name}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        for shared in ("cache", "eval-cache"):
            if (out / shared).is_dir():
                _link(args.out / shared, out / shared)
        _link(args.out / "teacher", out / "teachers" / cell.teacher)
        (args.out / CELL_FILE).write_text(json.dumps(dataclasses.asdict(cell)) + "\n")
        quickstart.run_pipeline(args, STAGES, start)
    results = collect(cells_with_reports(out))
    write_results(results, out)
    print(f"\nstudy results in {out}/results.md and results.json; {time.perf_counter() - start:.0f} s in all")
    return 0


def cells_with_reports(out: Path) -> list[tuple[Cell, dict[str, dict[str, Any]]]]:
    """(cell, {run: metrics}) of every finished cell under `out/cells`."""
    found = []
    for folder in sorted((out / "cells").glob("*")):
        reports = [folder / "reports" / run / "report.json" for run in STAGES]
        if (folder / CELL_FILE).is_file() and all(path.is_file() for path in reports):
            cell = Cell(**json.loads((folder / CELL_FILE).read_text()))
            found.append((cell, {run: json.loads(path.read_text())["metrics"]
                                 for run, path in zip(STAGES, reports, strict=True)}))
    return found


def collect(tables: list[tuple[Cell, dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    """Per cell its table and the RSAE-minus-control differences; per family and mode the frontier verdict."""
    rows = []
    for cell, table in tables:
        rsae, control, teacher = table["rsae"], table["control"], table["teacher"]
        rows.append({"cell": cell.name, **dataclasses.asdict(cell), "teacher_l0": teacher["l0"], "rsae_l0": rsae["l0"], "control_l0": control["l0"],
                     "rsae_init_mse_vs_teacher": table["rsae-init"]["mse"] / teacher["mse"] - 1,
                     "rsae_mse_vs_control": rsae["mse"] / control["mse"] - 1,
                     "rsae_minus_control_ce_degradation": _difference(rsae, control, "ce_degradation"),
                     "l0_gate_band": rsae.get("l0_gate_band"), "table": table})
    return {"cells": rows, "frontiers": frontier_verdicts(tables)}


def _difference(a: dict[str, Any], b: dict[str, Any], metric: str) -> float | None:
    return None if a.get(metric) is None or b.get(metric) is None else a[metric] - b[metric]


def frontier_verdicts(tables: list[tuple[Cell, dict[str, dict[str, Any]]]]) -> list[dict[str, Any]]:
    """For each family and mode with control runs at two or more L0s (teachers of the base budget): the RSAE's
    MSE against the control's MSE-vs-L0 frontier at the RSAE's own L0 (log-log interpolation; None outside the
    control's L0 range)."""
    groups: dict[tuple[str, str], list[dict[str, dict[str, Any]]]] = {}
    for cell, table in tables:
        if cell.budget == 1:
            groups.setdefault((cell.family, cell.mode), []).append(table)
    verdicts = []
    for (family, mode), group in sorted(groups.items()):
        controls = sorted((t["control"]["l0"], t["control"]["mse"]) for t in group)
        if len({l0 for l0, _ in controls}) < 2:
            continue
        log_l0, log_mse = np.log([c[0] for c in controls]), np.log([c[1] for c in controls])
        for table in group:
            l0 = table["rsae"]["l0"]
            inside = log_l0[0] <= math.log(l0) <= log_l0[-1]
            frontier = float(np.exp(np.interp(math.log(l0), log_l0, log_mse))) if inside else None
            verdicts.append({"family": family, "mode": mode, "rsae_l0": l0, "rsae_mse": table["rsae"]["mse"],
                             "control_frontier_mse": frontier,
                             "rsae_vs_frontier": None if frontier is None else table["rsae"]["mse"] / frontier - 1})
    return verdicts


def write_results(results: dict[str, Any], out: Path) -> None:
    from rsae._io import write_bytes_atomic

    write_bytes_atomic(out / "results.json", (json.dumps(results, indent=1) + "\n").encode())
    lines = ["| cell | teacher L0 | RSAE L0 | control L0 | RSAE-init MSE vs teacher | RSAE MSE vs control | "
             "RSAE - control CE degradation |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["cells"]:
        ce = row["rsae_minus_control_ce_degradation"]
        lines.append(f"| {row['cell']} | {row['teacher_l0']:.1f} | {row['rsae_l0']:.1f} | {row['control_l0']:.1f} | "
                     f"{row['rsae_init_mse_vs_teacher']:+.2%} | {row['rsae_mse_vs_control']:+.2%} | "
                     + ("-" if ce is None else f"{ce:+.4f}") + " |")
    if results["frontiers"]:
        lines += ["", "| family | mode | RSAE L0 | RSAE MSE vs the control's frontier at that L0 |", "|---|---|---:|---:|"]
        for v in results["frontiers"]:
            verdict = "outside the control's L0 range" if v["rsae_vs_frontier"] is None else \
                f"{v['rsae_vs_frontier']:+.2%}"
            lines.append(f"| {v['family']} | {v['mode']} | {v['rsae_l0']:.1f} | {verdict} |")
    write_bytes_atomic(out / "results.md", ("\n".join(lines) + "\n").encode())
