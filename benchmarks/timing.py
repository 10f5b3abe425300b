"""Side-by-side timing shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# glibc's malloc settings per --malloc choice (read at process start, hence the re-exec in use_malloc).
MALLOC_ENVIRONMENTS: dict[str, dict[str, str]] = {
    # Allocations of 1 MiB and more are mmapped and returned to the OS on free, then page-faulted in
    # again: what a lone training loop's large tensors get from glibc's defaults, but with the threshold
    # fixed. Left dynamic, one model's frees move it for the other (glibc raises it to the largest freed
    # block), and interleaved RSAE steps turned bimodal (0.83 or 1.1 s against a steady teacher).
    "fixed": {"MALLOC_MMAP_THRESHOLD_": str(2**20)},
    # Freed memory stays in the process: no page faults, ~20% faster CPU steps, ~1.5x the peak RSS.
    "retain": {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)},
    "glibc": {},
}


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


def add_step_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """What every step benchmark takes: the SAE shape (the issue's reference point by default), the
    number of steps and the allocator settings."""
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per path")
    parser.add_argument("--malloc", choices=sorted(MALLOC_ENVIRONMENTS), default="fixed",
                        help="glibc malloc settings (see MALLOC_ENVIRONMENTS in timing.py); default: fixed")


def use_malloc(choice: str) -> None:
    """Re-executes this script under the chosen malloc settings, unless it already runs under them."""
    wanted = MALLOC_ENVIRONMENTS[choice]
    if all(os.environ.get(name) == value for name, value in wanted.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})


def cpu_model() -> str:
    """The CPU's model name: ratios move between hosts (the shared machines are not all the same CPU)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_results(report: dict[str, Any], json_path: Path | None, markdown_path: Path | None,
                  render: Callable[[dict[str, Any]], str]) -> None:
    """Write a benchmark's report as JSON and its markdown rendering, where asked (parent folders made)."""
    import json

    for path, text in ((json_path, lambda: json.dumps(report, indent=2) + "\n"), (markdown_path, lambda: render(report))):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text())
