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
  ``l0_tolerance`` (|z| > cfg.l0_tolerance), ``alive_fraction``, and with a language model
  ``ce_clean``, ``ce_sae``, ``ce_zero``, ``ce_degradation``, ``loss_recovered``. Other names are
  allowed and shown after these.
- ``density_histogram``: ``{"log10_density_edges": [...], "counts": [...], "dead": int, ...}`` (see
  `rsae.metrics.FeatureDensity.histogram`) or None.
- ``probing``: ``{task: {"k=1": acc, ...}, "mean": {...}}``, or that per source
  (``{"sae": {...}, "lm": {...}}``), or None.
- ``gate_curves``: `gate_curves`' ``{"h", "features", "model", "teacher"}`` or None.
- ``training``: free-form, or None; ``training["curves"]`` (``{"step": [...], name: [...]}``) is plotted.

Free-form sections are made JSON-safe on the way in: tensors and numpy values become lists and
numbers, non-finite floats become None (strict JSON has no NaN).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rsae.cache import Store
from rsae.config import SAEConfig
from rsae.sae import SparseAutoencoder

__all__ = [
    "METRIC_NAMES",
    "REPORT_FORMAT",
    "TOPK_THRESHOLD_KEY",
    "add_compare_arguments",
    "compare",
    "gate_curves",
    "make_report",
    "plot_curves",
    "plot_mse_vs_l0",
    "read_report",
    "run_compare",
    "write_report",
]

REPORT_FORMAT = "rsae-report/1"

METRIC_NAMES: tuple[str, ...] = (
    "mse", "mse_per_element", "explained_variance", "fvu", "explained_variance_legacy", "l0", "l0_tolerance",
    "alive_fraction", "ce_clean", "ce_sae", "ce_zero", "ce_degradation", "loss_recovered",
)
"""The standard metrics, in the order tables list them."""

TOPK_THRESHOLD_KEY = "topk_threshold"
"""`cfg.extra` key of an estimated TopK threshold, preferred by `gate_curves` over estimating one."""

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
    store = Store(folder)
    store.write_atomic(REPORT_FILE, text.encode())
    store.write_atomic("report.md", report_markdown(report).encode())
    paths = {"json": folder / REPORT_FILE, "markdown": folder / "report.md"}
    plots = {"density": (report.get("density_histogram"), _plot_density),
             "gate_shapes": (report.get("gate_curves"), _plot_gate_shapes),
             "training": (_training_curves(report.get("training")), _plot_training)}
    for key, (section, plot) in plots.items():
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
                         f"Build reports with rsae.report.make_report (or re-run the evaluation).")


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


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    # Lazy and headless: importing matplotlib costs ~0.5 s and a GUI backend fails on servers.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _plot_density(histogram: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if histogram["counts"]:
        ax.stairs(histogram["counts"], histogram["log10_density_edges"], fill=True, alpha=0.7)
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("latents")
    ax.text(0.98, 0.95, f"dead: {histogram.get('dead', 0)}", transform=ax.transAxes, ha="right", va="top",
            bbox={"facecolor": "white", "alpha": 0.8})
    _save(fig, path)


def _plot_gate_shapes(curves: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    features = curves["features"]
    ncols = min(4, len(features))
    nrows = math.ceil(len(features) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 2.4 * nrows), squeeze=False)
    teacher = curves.get("teacher") or [None] * len(features)
    for ax, feature, h, learned, taught in zip(axes.flat, features, curves["h"], curves["model"], teacher,
                                               strict=False):
        ax.plot(h, learned, label="model")
        if taught is not None:
            ax.plot(h, taught, "--", label="teacher")
        ax.set_title(f"feature {feature}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(features):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    _save(fig, path)


def _training_curves(training: Any) -> dict[str, list[Any]] | None:
    curves = training.get("curves") if isinstance(training, Mapping) else None
    if not isinstance(curves, Mapping):
        return None
    series = {key: value for key, value in curves.items() if key != "step" and isinstance(value, list) and value
              and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in value)}
    return {"step": curves.get("step"), **series} if series else None


def _plot_training(curves: Mapping[str, Any], path: Path) -> None:
    steps = curves.get("step")
    panels = {name: {"": (steps if steps and len(steps) == len(values) else range(len(values)), values)}
              for name, values in curves.items() if name != "step"}
    plot_curves(panels, path)


def plot_curves(panels: Mapping[str, Mapping[str, tuple[Sequence[Any], Sequence[Any]]]],
                path: str | os.PathLike[str]) -> Path:
    """One subplot per panel title, one line per label (`{title: {label: (steps, values)}}`; None values are
    gaps); log y where every value is positive, since losses span decades."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4 * len(panels), 6), 3.5), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels.items(), strict=True):
        for label, (steps, values) in lines.items():
            ax.plot(list(steps), [math.nan if v is None else v for v in values], label=label or None)
        if all(v is None or v > 0 for _, values in lines.values() for v in values):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
        if any(lines):
            ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    return path


def plot_mse_vs_l0(reports: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Scatter of MSE against L0, one labelled point per run that has both; ValueError if none has."""
    points = [(r["metrics"].get("l0"), r["metrics"].get("mse"), name)
              for r, name in zip(reports, _run_names(reports), strict=True)]
    points = [point for point in points if point[0] is not None and point[1] is not None]
    if not points:
        raise ValueError("no run has both 'l0' and 'mse' metrics to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for l0, mse, name in points:
        ax.scatter(l0, mse)
        ax.annotate(name, (l0, mse), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("L0")
    ax.set_ylabel("MSE")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    return path


# ------------------------------------------------------------------------------------------------
# Gate curves
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def gate_curves(
    model: SparseAutoencoder,
    teacher: SparseAutoencoder | None = None,
    features: int | Sequence[int] = 8,
    n_points: int = 201,
    pre_acts: Tensor | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Gate of a few latents as the model applies it, and the teacher's, on a grid of h; for plots.

    Features: a list is used as given; an int samples that many (seeded), among the latents with a
    positive pre-activation in `pre_acts` [N, d_sae] when given (live ones have shapes worth seeing).
    Grid per latent: with `pre_acts`, from the 1% quantile of its pre-activations to the 99% quantile
    of its positive ones (stretched to at least [-hi/4, hi] so both branches show); else [-ref, 4 ref]
    with ref its threshold (JumpReLU theta_i, TopK tau), else its rational input scale, else 1.

    Model curve (RSAE): `masked` is the family's support rule times phi(h) (ReLU h > 0, JumpReLU
    h > theta_i, TopK h > tau); `pure` is phi(h); `thresholded` is phi(h) zeroed where
    |phi| <= threshold_eps * |C_out_i|. A baseline's curve is its own gate. Teacher curve: ReLU
    max(h, 0), JumpReLU h * (h > theta_i), TopK h * (h > tau); None when no teacher is given, unless the
    model is an RSAE whose family's rule it can apply itself (ReLU, TopK, masked JumpReLU).
    TopK is not pointwise: tau is `cfg.extra["topk_threshold"]` (teacher's, then model's) when set,
    else the mean over tokens of the k-th largest pre-activation in `pre_acts`, else 0.
    """
    cfg = model.cfg
    d_sae = cfg.d_sae
    device = model.device
    if pre_acts is not None:
        pre_acts = pre_acts.detach().to(device=device, dtype=torch.float32).reshape(-1, d_sae)
    tau = _topk_tau(model, teacher, pre_acts)
    is_rsae = hasattr(model, "gate")
    rule_source = teacher if teacher is not None else (model if is_rsae else None)
    all_theta = _thresholds(rule_source if rule_source is not None else model, torch.arange(d_sae, device=device))
    chosen = _choose_features(features, d_sae, pre_acts, all_theta if all_theta is not None else tau, seed)
    idx = torch.tensor(chosen, dtype=torch.long, device=device)
    teacher_theta = _thresholds(rule_source, idx)
    model_theta = _thresholds(model, idx)
    h = _grid(idx, n_points, pre_acts, next((t for t in (teacher_theta, model_theta) if t is not None), None), tau,
              model.gate.scale_in.detach()[idx].float() if is_rsae else None)

    def rule_gate(family: str, theta: Tensor | None) -> Tensor | None:
        support = _support(family, h, theta, tau)
        return None if support is None else h * support

    if not is_rsae:
        model_curve = rule_gate(cfg.family, model_theta)
    else:
        phi = _phi(model, h, idx)
        if cfg.mode == "masked":
            model_curve = phi * _support(cfg.family, h, model_theta, tau)
        elif cfg.mode == "pure":
            model_curve = phi
        else:
            band = cfg.threshold_eps * model.gate.scale_out.detach()[idx].float().abs()
            model_curve = phi * (phi.abs() > band[:, None])
    teacher_curve = None if rule_source is None else rule_gate(rule_source.cfg.family, teacher_theta)
    return {"h": _listed(h), "features": chosen, "model": _listed(model_curve), "teacher": _listed(teacher_curve)}


def _listed(t: Tensor | None) -> list[Any] | None:
    return None if t is None else t.cpu().tolist()


def _choose_features(features: int | Sequence[int], d_sae: int, pre_acts: Tensor | None, floor: Tensor | float,
                     seed: int) -> list[int]:
    """The given latents, else a seeded sample of those that cross their gate's threshold `floor` somewhere in
    `pre_acts` (a latent that never fires would draw a flat line)."""
    if not isinstance(features, int):
        chosen = [int(f) for f in features]
        if not chosen or not all(0 <= f < d_sae for f in chosen):
            raise ValueError(f"features must be a non-empty list of latents in [0, {d_sae}), got {chosen}")
        return chosen
    if features < 1:
        raise ValueError(f"features must be >= 1, got {features}")
    candidates = torch.arange(d_sae)
    if pre_acts is not None and bool((pre_acts > floor).any()):
        candidates = (pre_acts > floor).any(0).nonzero().squeeze(-1).cpu()
    order = torch.randperm(candidates.numel(), generator=torch.Generator().manual_seed(seed))
    return sorted(int(f) for f in candidates[order[:features]])


def _thresholds(model: SparseAutoencoder | None, idx: Tensor) -> Tensor | None:
    """theta_i of the chosen latents as the forward reads it (max(theta, 0)), or None without thresholds."""
    threshold = getattr(model, "threshold", None)
    return None if threshold is None else threshold.detach()[idx].float().clamp_min(0)


def _topk_tau(model: SparseAutoencoder, teacher: SparseAutoencoder | None, pre_acts: Tensor | None) -> float:
    for source in (teacher, model):
        if source is not None and source.cfg.extra.get(TOPK_THRESHOLD_KEY) is not None:
            return float(source.cfg.extra[TOPK_THRESHOLD_KEY])
    k = model.cfg.k if model.cfg.k is not None else getattr(getattr(teacher, "cfg", None), "k", None)
    if pre_acts is None or k is None or pre_acts.shape[0] == 0:
        return 0.0
    # TopK keeps the k largest after a ReLU, so a negative k-th largest means "keeps everything positive".
    return float(pre_acts.topk(k, dim=-1).values[:, -1].clamp_min(0).mean())


def _grid(idx: Tensor, n_points: int, pre_acts: Tensor | None, theta: Tensor | None, tau: float,
          scale_in: Tensor | None) -> Tensor:
    steps = torch.linspace(0, 1, n_points, device=idx.device)
    if pre_acts is not None:
        # A strided subset is plenty for plot ranges, and torch.quantile refuses inputs over 2**24 elements.
        columns = pre_acts[:: max(1, pre_acts.shape[0] // 65536), idx]
        lo = columns.quantile(0.01, dim=0)
        hi = torch.stack([c[c > 0].quantile(0.99) if (c > 0).any() else c.new_tensor(1.0) for c in columns.T])
        lo = torch.minimum(lo, -hi / 4)
    else:
        ref = torch.ones(idx.numel(), device=idx.device)
        for level in (scale_in, tau, theta):  # later entries win where they are usable
            if isinstance(level, Tensor):
                ref = torch.where(level > 0, level, ref)
            elif level:
                ref = torch.full_like(ref, level)
        lo, hi = -ref, 4 * ref
    return lo[:, None] + (hi - lo)[:, None] * steps


def _support(family: str | None, h: Tensor, theta: Tensor | None, tau: float) -> Tensor | None:
    if family == "relu":
        return (h > 0).float()
    if family == "topk":
        return (h > max(tau, 0.0)).float()
    return None if theta is None else (h > theta[:, None]).float()


def _phi(model: SparseAutoencoder, h: Tensor, idx: Tensor) -> Tensor:
    gate = model.gate
    fast = gate.fast
    # The eager reference: a few thousand points do not repay the ~1 min torch.compile of the fast path.
    gate.fast = False
    try:
        return gate(h, latent_index=idx[:, None].expand_as(h)).float()
    finally:
        gate.fast = fast


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------


def _run_names(reports: Sequence[Mapping[str, Any]]) -> list[str]:
    # Equal names would make columns indistinguishable: number the repeats.
    names: list[str] = []
    seen: dict[str, int] = {}
    for report in reports:
        name = str(report.get("name", "run"))
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return names


def compare(reports: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None,
            markdown: bool = False) -> str:
    """One column per run, one row per metric (default: every metric any run has, standard ones first);
    a run without a metric shows "-". Plain aligned text, or a markdown table with `markdown`."""
    if not reports:
        raise ValueError("compare needs at least one report")
    rows = list(metrics) if metrics else _ordered_metrics(name for r in reports for name in r.get("metrics", {}))
    header = ["metric", *_run_names(reports)]
    table = [[name, *(_fmt(r.get("metrics", {}).get(name)) for r in reports)] for name in rows]
    if markdown:
        return "\n".join(_table(header, table)) + "\n"
    widths = [max(len(row[i]) for row in (header, *table)) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *table]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))).rstrip() for row in lines) + "\n"


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help=f"{REPORT_FILE} files, or folders holding one")
    parser.add_argument("--metrics", default=None, help="comma-separated metrics to show (default: all)")
    parser.add_argument("--plot", default=None, metavar="PATH", help="also write an MSE-vs-L0 scatter to PATH")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead of plain text")


def run_compare(args: argparse.Namespace) -> int:
    """Print the comparison of `args.runs`; on an unreadable report, a message on stderr and 2."""
    try:
        reports = [read_report(run) for run in args.runs]
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if getattr(args, "metrics", None) else None
        print(compare(reports, metrics, markdown=args.markdown), end="")
        if args.plot:
            print(f"wrote {plot_mse_vs_l0(reports, args.plot)}", file=sys.stderr)
    except (OSError, ValueError) as error:
        print(f"rsae compare: error: {error}", file=sys.stderr)
        return 2
    return 0
