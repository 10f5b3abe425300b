"""Evaluation reports: one JSON document per evaluated model, its markdown and plots, and comparisons.

A report is a plain dict (``REPORT_FORMAT = "rsae-report/1"``), written by `write_report` as
``report.json`` next to ``report.md`` and PNG plots, read back by `read_report`:

- ``format``: ``"rsae-report/1"``; `read_report` refuses anything else.
- ``name``: the run's label (column header in `compare`, point label in `plot_mse_vs_l0`).
- ``created``: ISO 8601 time, UTC, seconds.
- ``model``: the SAE's ``SAEConfig.to_dict()``.
- ``checkpoint``: the checkpoint folder evaluated, or None.
- ``data``: free-form provenance of the evaluation tokens (cache url, hook, model_name, split,
  n_tokens, norm_factor, ...).
- ``metrics``: name -> finite float or None. The standard names (`METRIC_NAMES`, in this order):
  ``mse`` (mean over tokens of the squared error summed over dims), ``mse_per_element``,
  ``explained_variance`` (1 - fvu), ``fvu``, ``explained_variance_legacy``, ``l0`` (exact),
  ``l0_tolerance`` (|z| > cfg.l0_tolerance), ``l0_gate_band`` (|z_i| > the gate's own zero band, see
  `SAEMetrics`), ``alive_fraction``, and with a language model
  ``ce_clean``, ``ce_sae``, ``ce_zero``, ``ce_degradation``, ``loss_recovered``. Other names are
  allowed and shown after these.
- ``density_histogram``: ``{"log10_density_edges": [...], "counts": [...], "dead": int, ...}`` (see
  `rsae.eval.metrics.FeatureDensity.histogram`) or None.
- ``probing``: ``{task: {"k=1": acc, ...}, "mean": {...}}``, or that per source
  (``{"sae": {...}, "lm": {...}}``), or None.
- ``gate_curves``: `gate_curves`' ``{"h", "features", "model", "teacher"}`` or None.
- ``training``: free-form, or None; ``training["curves"]`` (``{"step": [...], name: [...]}``) is plotted.

Free-form sections are made JSON-safe on the way in: tensors and numpy values become lists and
numbers, non-finite floats become None (strict JSON has no NaN).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import Tensor

from rsae._io import write_bytes_atomic
from rsae.eval import plots
from rsae.nn.config import SAEConfig
from rsae.nn.sae import SparseAutoencoder

__all__ = [
    "METRIC_NAMES",
    "REPORT_FORMAT",
    "compare",
    "make_report",
    "plot_mse_vs_l0",
    "read_report",
    "run_labels",
    "write_report",
]

REPORT_FORMAT = "rsae-report/1"

METRIC_NAMES: tuple[str, ...] = (
    "mse", "mse_per_element", "explained_variance", "fvu", "explained_variance_legacy", "l0", "l0_tolerance",
    "l0_gate_band", "alive_fraction", "ce_clean", "ce_sae", "ce_zero", "ce_degradation", "loss_recovered",
)
"""The standard metrics, in the order tables list them."""

TABLE_METRICS: tuple[str, ...] = ("mse", "explained_variance", "l0", "l0_gate_band", "alive_fraction",
                                  "ce_degradation", "loss_recovered")
"""The side-by-side table of a pipeline run (quickstart, upgrade, zoo cards)."""

REPORT_FILE = "report.json"
PLOT_FILES: dict[str, str] = {"density": "density.png", "gate_shapes": "gate_shapes.png", "training": "training.png"}


# ------------------------------------------------------------------------------------------------
# Building, writing and reading
# ------------------------------------------------------------------------------------------------


def make_report(
    name: str,
    model: SparseAutoencoder | SAEConfig | Mapping[str, Any],
    metrics: Mapping[str, Any],
    data: Mapping[str, Any],
    checkpoint: str | os.PathLike[str] | None = None,
    density_histogram: Mapping[str, Any] | None = None,
    probing: Mapping[str, Any] | None = None,
    gate_curves: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A report dict (schema in the module docstring). Metric values must be finite numbers (Python,
    numpy or one-element tensors) or None; anything else raises ValueError naming the metric."""
    if isinstance(model, SparseAutoencoder):
        model = model.cfg
    cfg = model.to_dict() if isinstance(model, SAEConfig) else dict(model)
    return {
        "format": REPORT_FORMAT,
        "name": str(name),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": _jsonable(cfg),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "data": _jsonable(dict(data)),
        "metrics": {str(key): _metric(key, value) for key, value in metrics.items()},
        "density_histogram": _jsonable(density_histogram),
        "probing": _jsonable(probing),
        "gate_curves": _jsonable(gate_curves),
        "training": _jsonable(training),
    }


def _metric(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    # bool is an int to Python, but a metric that is True/False is a bug upstream, not a number.
    if isinstance(value, (bool, str)) or not hasattr(value, "__float__"):
        raise ValueError(f"metric {name!r} must be a finite float or None, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"metric {name!r} must be finite, got {number}")
    return number


def _jsonable(value: Any) -> Any:
    """Tensors/numpy to lists and numbers, tuples to lists, non-finite floats to None, recursively."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_report(report: Mapping[str, Any], folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``report.json`` (atomically), ``report.md`` and the plots the report has data for into `folder`.

    Returns the paths written, keyed "json", "markdown", and "density" / "gate_shapes" / "training".
    Plots of an earlier report in the same folder that this one has no data for are left in place."""
    _check_format(report, "the report passed to write_report")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    # Write-then-rename: readers never see a half-written report.
    write_bytes_atomic(folder / REPORT_FILE, text.encode())
    write_bytes_atomic(folder / "report.md", report_markdown(report).encode())
    paths = {"json": folder / REPORT_FILE, "markdown": folder / "report.md"}
    figures = {"density": (report.get("density_histogram"), plots.plot_density),
               "gate_shapes": (report.get("gate_curves"), plots.plot_gate_shapes),
               "training": (_training_curves(report.get("training")), _plot_training)}
    for key, (section, plot) in figures.items():
        if section:
            paths[key] = folder / PLOT_FILES[key]
            plot(section, paths[key])
    return paths


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a report from ``report.json`` or a folder holding one.

    Raises FileNotFoundError if there is none, ValueError if it is not JSON or not a report of this format."""
    path = Path(path)
    file = path / REPORT_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"folder {path} has no {REPORT_FILE}" if path.is_dir() else f"{file} does not exist"
        raise FileNotFoundError(f"no report: {where}; pass a {REPORT_FILE} or a folder holding one "
                                f"(written by the evaluation, `write_report`)")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON ({error}); re-run the evaluation to rewrite it") from error
    _check_format(report, str(file))
    return report


def _check_format(report: Any, where: str) -> None:
    found = report.get("format") if isinstance(report, Mapping) else None
    if found != REPORT_FORMAT:
        what = f"format {found!r}" if found is not None else "no 'format' field"
        raise ValueError(f"{where} has {what}, expected {REPORT_FORMAT!r}; is it an rsae report? "
                         f"Build reports with rsae.eval.report.make_report (or re-run the evaluation).")


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]


def _ordered_metrics(names: Iterable[str]) -> list[str]:
    """Standard metrics first in their order, then the rest in first-seen order."""
    seen = list(dict.fromkeys(names))
    return [name for name in METRIC_NAMES if name in seen] + [name for name in seen if name not in METRIC_NAMES]


def _probing_sections(probing: Mapping[str, Any]) -> list[tuple[str | None, Mapping[str, Mapping[str, Any]]]]:
    """[(source, {task: {k: acc}})]: one unnamed section, or one per source when nested (sae / lm)."""
    nested = all(isinstance(v, Mapping) and all(isinstance(w, Mapping) for w in v.values()) for v in probing.values())
    return list(probing.items()) if nested else [(None, probing)]


def report_markdown(report: Mapping[str, Any]) -> str:
    """A readable summary: model, metrics, data provenance, probing tables and links to the plots."""
    model = report.get("model") or {}
    lines = [f"# {report['name']}", "", f"Created {report.get('created')}, format `{report['format']}`, "
             f"checkpoint `{report.get('checkpoint') or '-'}`", "", "## Model", ""]
    model_keys = ("architecture", "family", "mode", "d_in", "d_sae", "k", "degree", "model_name", "hook_name")
    # A baseline's cfg carries the rsae-only fields at their defaults; showing them would mislead.
    shown_keys = [key for key in model_keys if model.get(key) is not None
                  and (model.get("architecture") == "rsae" or key not in ("mode", "degree"))]
    lines += _table(("field", "value"), [(key, model[key]) for key in shown_keys])
    metrics = report.get("metrics") or {}
    lines += ["", "## Metrics", ""]
    lines += _table(("metric", "value"), [(name, metrics[name]) for name in _ordered_metrics(metrics)])
    if report.get("data"):
        lines += ["", "## Data", ""]
        lines += _table(("field", "value"), [(key, json.dumps(v) if isinstance(v, (dict, list)) else v)
                                             for key, v in report["data"].items()])
    if report.get("probing"):
        lines += ["", "## Probing"]
        for source, tasks in _probing_sections(report["probing"]):
            ks = list(dict.fromkeys(k for accuracies in tasks.values() for k in accuracies))
            lines += [""] + ([f"### {source}", ""] if source else [])
            lines += _table(("task", *ks), [(task, *(acc.get(k) for k in ks)) for task, acc in tasks.items()])
    histogram = report.get("density_histogram")
    plots = [("density", "Feature density" + (f" ({histogram.get('dead')} dead)" if histogram else "")),
             ("gate_shapes", "Gate shapes"), ("training", "Training")]
    present = {"density": histogram, "gate_shapes": report.get("gate_curves"),
               "training": _training_curves(report.get("training"))}
    shown = [(key, title) for key, title in plots if present[key]]
    if shown:
        lines += ["", "## Plots"] + [f"\n![{title}]({PLOT_FILES[key]})" for key, title in shown]
    return "\n".join(lines) + "\n"


def _training_curves(training: Any) -> dict[str, list[Any]] | None:
    curves = training.get("curves") if isinstance(training, Mapping) else None
    if not isinstance(curves, Mapping):
        return None
    series = {key: value for key, value in curves.items() if key != "step" and isinstance(value, list) and value
              and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in value)}
    return {"step": curves.get("step"), **series} if series else None


def _plot_training(curves: Mapping[str, Any], path: Path) -> Path:
    steps = curves.get("step")
    panels = {name: {"": (steps if steps and len(steps) == len(values) else range(len(values)), values)}
              for name, values in curves.items() if name != "step"}
    return plots.plot_curves(panels, path)


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------


def run_labels(reports: Sequence[Mapping[str, Any]], paths: Sequence[str | os.PathLike[str]] | None = None,
               ) -> list[str]:
    """A distinct column label per run: its report's name; where names repeat (every stage exports a folder
    named `sae`), the part of its path that differs from the others' (`runs/a/sae`, `runs/b/sae`: `a`, `b`);
    repeats left after that are numbered."""
    names = [str(report.get("name", "run")) for report in reports]
    if paths is not None and len(set(names)) < len(names):
        parts = [Path(os.path.abspath(p)).parts for p in paths]
        for name in set(names):
            same = [i for i, n in enumerate(names) if n == name]
            if len(same) > 1:
                for i, label in zip(same, _distinct_parts([parts[i] for i in same]), strict=True):
                    names[i] = label or names[i]
    labels: list[str] = []
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return labels


def _distinct_parts(paths: Sequence[tuple[str, ...]]) -> list[str]:
    """Each path without the leading and trailing parts that all of them share ('' for identical paths)."""
    lead = 0
    while all(len(p) > lead for p in paths) and len({p[lead] for p in paths}) == 1:
        lead += 1
    trail = 0
    while all(len(p) - lead > trail for p in paths) and len({p[len(p) - 1 - trail] for p in paths}) == 1:
        trail += 1
    return ["/".join(p[lead:len(p) - trail]) for p in paths]


COMPARABLE_L0 = 0.10
"""Relative L0 difference to the reference run beyond which `compare` marks a run as not comparable."""


def compare(reports: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None,
            markdown: bool = False, labels: Sequence[str] | None = None, l0_reference: int | None = None) -> str:
    """One column per run, one row per metric (default: every metric any run has, standard ones first);
    a run without a metric shows "-". Plain aligned text, or a markdown table with `markdown`. Columns are
    headed by `labels` (default: `run_labels(reports)`).

    With `l0_reference` (a column index, e.g. the teacher's), a last row says whether each run's L0 lies within
    `COMPARABLE_L0` of that run's: reconstruction bought with more active latents (a dense `pure` gate, an L0
    that drifted in fine-tuning) is then marked "NO (L0 +x%)" instead of reading as a win."""
    if not reports:
        raise ValueError("compare needs at least one report")
    rows = list(metrics) if metrics else _ordered_metrics(name for r in reports for name in r.get("metrics", {}))
    header = ["metric", *(labels if labels is not None else run_labels(reports))]
    table = [[name, *(_fmt(r.get("metrics", {}).get(name)) for r in reports)] for name in rows]
    if l0_reference is not None:
        table.append(["comparable_l0", *comparable_l0(reports, l0_reference)])
    if markdown:
        return "\n".join(_table(header, table)) + "\n"
    widths = [max(len(row[i]) for row in (header, *table)) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *table]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))).rstrip() for row in lines) + "\n"


def comparable_l0(reports: Sequence[Mapping[str, Any]], reference: int) -> list[str]:
    """Per run: "yes" when its L0 lies within `COMPARABLE_L0` of run `reference`'s, else "NO (L0 +x%)"."""
    ref = (reports[reference].get("metrics") or {}).get("l0")
    cells = []
    for report in reports:
        l0 = (report.get("metrics") or {}).get("l0")
        if ref is None or l0 is None or ref == 0:
            cells.append("-")
            continue
        change = l0 / ref - 1
        cells.append("yes" if abs(change) <= COMPARABLE_L0 else f"NO (L0 {change:+.0%})")
    return cells


def plot_mse_vs_l0(reports: Sequence[Mapping[str, Any]], path: str | os.PathLike[str],
                   labels: Sequence[str] | None = None) -> Path:
    """Scatter of MSE against L0, one labelled point per run that has both; ValueError if none has."""
    points = [(r["metrics"].get("l0"), r["metrics"].get("mse"), name)
              for r, name in zip(reports, labels if labels is not None else run_labels(reports), strict=True)]
    points = [point for point in points if point[0] is not None and point[1] is not None]
    if not points:
        raise ValueError("no run has both 'l0' and 'mse' metrics to plot")
    return plots.plot_labelled_points(points, "L0", "MSE", path)
