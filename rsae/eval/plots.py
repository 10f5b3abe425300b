"""The figures of reports and comparisons, drawn headless with matplotlib (imported on first use)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend: importing it costs ~0.5 s and a GUI backend fails on servers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_density(histogram: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """The feature-density histogram of `rsae.eval.metrics.FeatureDensity.histogram`."""
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    if histogram["counts"]:
        ax.stairs(histogram["counts"], histogram["log10_density_edges"], fill=True, alpha=0.7)
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("latents")
    ax.text(0.98, 0.95, f"dead: {histogram.get('dead', 0)}", transform=ax.transAxes, ha="right", va="top",
            bbox={"facecolor": "white", "alpha": 0.8})
    return save(fig, path)


def plot_gate_shapes(curves: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """One panel per feature of `rsae.eval.gate_curves.gate_curves`: the model's gate, the teacher's dashed."""
    features = curves["features"]
    ncols = min(4, len(features))
    nrows = math.ceil(len(features) / ncols)
    fig, axes = pyplot().subplots(nrows, ncols, figsize=(3 * ncols, 2.4 * nrows), squeeze=False)
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
    return save(fig, path)


def plot_curves(panels: Mapping[str, Mapping[str, tuple[Sequence[Any], Sequence[Any]]]],
                path: str | os.PathLike[str]) -> Path:
    """One subplot per panel title, one line per label (`{title: {label: (steps, values)}}`; None values are
    gaps); log y where every value is positive, since losses span decades."""
    fig, axes = pyplot().subplots(1, len(panels), figsize=(max(4 * len(panels), 6), 3.5), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels.items(), strict=True):
        for label, (steps, values) in lines.items():
            ax.plot(list(steps), [math.nan if v is None else v for v in values], label=label or None)
        if all(v is None or v > 0 for _, values in lines.values() for v in values):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
        if any(lines):
            ax.legend(fontsize=8)
    return save(fig, path)


def plot_labelled_points(points: Sequence[tuple[float, float, str]], xlabel: str, ylabel: str,
                         path: str | os.PathLike[str]) -> Path:
    """A scatter of labelled points (x, y, label)."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for x, y, label in points:
        ax.scatter(x, y)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return save(fig, path)
