"""Side-by-side timing shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from pathlib import Path


def interleave(steps: dict[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Run each step in turn, `warmup + repeats` rounds, and keep the timed rounds' seconds.

    Interleaving makes the paths share whatever load the (shared) machine has at each moment, so
    their ratio is fairer than that of back-to-back runs."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(warmup + repeats):
        for name, step in steps.items():
            elapsed = step()
            if index >= warmup:
                times[name].append(elapsed)
    return times


def add_shape_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """The SAE shape every step benchmark takes (the issue's reference point by default)."""
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per path")


def cpu_model() -> str:
    """The CPU's model name: ratios move between hosts (the shared machines are not all the same CPU)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
