"""Forward+backward time and peak memory of the rational gate vs torch.relu.

Cases, per dtype (fp32, bf16) and degree: ``relu`` (torch.relu), ``gate`` (RationalGate as it runs by
default, shared coefficients: on CPU the C++ kernel of rsae.rational.cpu), ``compiled`` (the same Function
on its torch.compile'd bodies, the backend GPUs and other dtypes use; RSAE_CPU_KERNEL=0) and ``reference``
(the eager reference path, for context). The goal applies to ``gate``.
One step = ``out = f(x); out.backward(g)`` on an [rows, cols] input.

How it measures (and why):
- Every case runs in a FRESH subprocess, so compile caches, allocator state and other cases cannot
  leak into its numbers.
- Time: warm up (compile; dynamic shapes, so a small warm-up input compiles the graph used at full
  size), then ``--reps`` timed steps; the median is reported. Gate cases time relu's step too, in
  the same process, alternating with their own steps: the time ratio compares steps taken seconds
  apart, so load from other tenants of a shared machine hits both alike. (relu's own subprocess
  gives its peak memory and a separately timed step, reported in the JSON.)
- Peak memory: CPU has no allocator peak counter, so we use the process's peak resident set size
  (``ru_maxrss``). The subprocess allocates x and g, touches them, warms up at a SMALL size, reads
  ``ru_maxrss`` (baseline), then runs ONE full-size step and reads it again. The delta is the extra
  memory the step needed at its peak (outputs, saved tensors, temporaries, gradients), which is what
  a gate adds to training. Large tensors are mmap-backed and returned to the OS on free, so the
  delta is not hidden by earlier reuse. It is coarse (page granularity, includes any transient
  buffers of the runtime) but honest and the same method for every case.
- The eager reference keeps ~15-28x the input alive and takes ~50 s per step at full size on 2 cores,
  so it runs on ``rows // --reference-shrink`` rows (default 16) against its own relu baseline at
  that size; its ratios are for context only.
- The machine may be shared: numbers are noisy; ratios gate/relu are taken within one run.

Usage: python benchmarks/bench_gate.py [--degree 9,8 --degree 3,2] [--rows 4096 --cols 16384]
       [--reps 5] [--json PATH] [--markdown PATH] [--no-reference] [--layout rows|features]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from timing import cpu_model

TIME_GOAL = 2.0
MEMORY_GOAL = 1.25


def _maxrss_bytes() -> int:
    # Linux reports KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(case: str, dtype_name: str, degree: tuple[int, int], rows: int, cols: int, reps: int,
             layout: str = "rows") -> dict:
    """Executed inside the subprocess."""
    if case == "compiled":
        os.environ["RSAE_CPU_KERNEL"] = "0"
    import torch

    from rsae.rational.gate import RationalGate
    from rsae.rational.kernel import _resolve_backend

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    if case == "relu":
        def make(n_cols: int):
            return torch.relu
    else:
        def make(n_cols: int):
            gate = RationalGate(n_cols, degree)
            with torch.no_grad():
                gate.numerator.normal_(0, 0.5)
                gate.denominator_raw.normal_(0, 1)
            gate.fast = case != "reference"
            return gate

    # Warm up at two small sizes: compiles the dynamic-shape graphs (a second size triggers any
    # remaining shape specialisation now rather than inside the measured step).
    for n_rows, n_cols in ((64, 256), (96, 384)):
        small = make(n_cols)
        xs = _tensor(n_rows, n_cols, dtype, layout).normal_().requires_grad_()
        for _ in range(2):
            small(_view(xs, layout)).backward(_view(_tensor(n_rows, n_cols, dtype, layout).normal_(), layout))

    f = make(cols)
    # filled in place, in the target dtype: no full-size temporaries raise the RSS high-water mark
    # before the baseline is read (which would hide part of the step's peak)
    x = _tensor(rows, cols, dtype, layout).normal_(0.0, 2.0).requires_grad_()
    g = _view(_tensor(rows, cols, dtype, layout).normal_(), layout)
    x.grad = None
    base = _maxrss_bytes()
    t0 = time.perf_counter()
    f(_view(x, layout)).backward(g)
    first = time.perf_counter() - t0
    peak = _maxrss_bytes() - base
    steps = {case: f}
    if case in ("gate", "compiled"):
        steps["relu"] = torch.relu
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            x.grad = None
            if hasattr(step, "zero_grad"):
                step.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step(_view(x, layout)).backward(g)
            times[name].append(time.perf_counter() - t0)
    backend = "eager autograd" if case == "reference" else _resolve_backend("auto", x, torch.float32, degree)
    if case == "relu":
        backend = "aten"
    result = {"case": case, "backend": backend, "dtype": dtype_name, "degree": list(degree),
              "time_s": statistics.median(times[case]), "times_s": times[case], "first_step_s": first,
              "peak_extra_bytes": peak, "input_bytes": x.numel() * x.element_size()}
    if "relu" in steps and case != "relu":
        result["interleaved_relu_time_s"] = statistics.median(times["relu"])
    return result


def _tensor(rows: int, cols: int, dtype: Any, layout: str) -> Any:
    """Storage for a [rows, cols] input: row-major, or feature-major ([cols, rows] in memory)."""
    import torch

    return torch.empty(rows, cols, dtype=dtype) if layout == "rows" else torch.empty(cols, rows, dtype=dtype)


def _view(t: Any, layout: str) -> Any:
    return t if layout == "rows" else t.T


def spawn(case: str, dtype: str, degree: tuple[int, int], rows: int, cols: int, reps: int,
          layout: str = "rows") -> dict:
    cmd = [sys.executable, __file__, "--child", case, dtype, f"{degree[0]},{degree[1]}", str(rows), str(cols),
           str(reps), layout]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"case {case}/{dtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        case, dtype, deg, rows, cols, reps, layout = sys.argv[2:9]
        p, q = map(int, deg.split(","))
        print(json.dumps(run_case(case, dtype, (p, q), int(rows), int(cols), int(reps), layout)))
        return

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--degree", action="append", default=None, help="p,q (repeatable); default 9,8 and 3,2")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reference-reps", type=int, default=2, help="reps for the slow eager reference")
    ap.add_argument("--reference-shrink", type=int, default=16, help="reference runs on rows // this")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--layout", choices=("rows", "features"), default="rows",
                    help="memory layout of the [rows, cols] input: row-major, or feature-major ([cols, rows] in "
                         "memory, as addmm(b, W.T, x.T).T produces it)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    degrees = [tuple(map(int, d.split(","))) for d in (args.degree or ["9,8", "3,2"])]

    results = []
    rows_out = []
    for dtype in ("float32", "bfloat16"):
        relu_full = spawn("relu", dtype, (1, 0), args.rows, args.cols, args.reps, args.layout)
        results.append(relu_full)
        ref_rows = max(1, args.rows // args.reference_shrink)
        relu_small = None
        if not args.no_reference:
            relu_small = spawn("relu", dtype, (1, 0), ref_rows, args.cols, args.reps)
            results.append(relu_small)
        for degree in degrees:
            cases = ["gate", "compiled"] + ([] if args.no_reference else ["reference"])
            for case in cases:
                if case != "reference":
                    r = spawn(case, dtype, degree, args.rows, args.cols, args.reps, args.layout)
                    relu, n_rows = relu_full, args.rows
                else:
                    r = spawn(case, dtype, degree, ref_rows, args.cols, args.reference_reps)
                    relu, n_rows = relu_small, ref_rows
                results.append(r)
                relu_time = r.get("interleaved_relu_time_s", relu["time_s"])
                t_ratio = r["time_s"] / relu_time
                m_ratio = r["peak_extra_bytes"] / max(relu["peak_extra_bytes"], 1)
                rows_out.append({
                    "dtype": dtype, "degree": f"({degree[0]},{degree[1]})", "path": case, "backend": r["backend"],
                    "rows": n_rows,
                    "time_s": r["time_s"], "relu_time_s": relu_time, "time_ratio": t_ratio,
                    "peak_mib": r["peak_extra_bytes"] / 2**20, "relu_peak_mib": relu["peak_extra_bytes"] / 2**20,
                    "memory_ratio": m_ratio,
                    "meets_goal": (t_ratio <= TIME_GOAL and m_ratio <= MEMORY_GOAL) if case == "gate" else None,
                })
                row = rows_out[-1]
                print(f"{dtype:9s} {row['degree']:7s} {case:9s} {r['backend']:14s} rows {n_rows:5d} "
                      f"time {r['time_s']:.3f}s (relu {relu_time:.3f}s) x{t_ratio:.2f}   "
                      f"peak +{row['peak_mib']:.0f} MiB (relu +{row['relu_peak_mib']:.0f} MiB) x{m_ratio:.2f}",
                      flush=True)

    meta = {"rows": args.rows, "cols": args.cols, "reps": args.reps, "layout": args.layout, "machine": cpu_model(),
            "cpus": os.cpu_count(), "goal": {"time_ratio": TIME_GOAL, "memory_ratio": MEMORY_GOAL},
            "memory_method": "peak RSS delta of one full-size fwd+bwd step in a fresh subprocess"}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "table": rows_out, "raw": results}, indent=2) + "\n")
    if args.markdown:
        lines = [
            f"# Rational gate vs ReLU: forward+backward on ({args.rows}, {args.cols})",
            "",
            f"Generated by `benchmarks/bench_gate.py`. Median of {args.reps} reps (reference: "
            f"{args.reference_reps}); {os.cpu_count()} cores of an {meta['machine']}, shared machine (noisy). "
            f"relu (s): relu's steps timed alternately with the gate's in the same process. Memory: peak-RSS "
            f"delta of one step in a fresh process (see script docstring). Goal for the fast gate: time <= "
            f"{TIME_GOAL}x relu, memory <= {MEMORY_GOAL}x relu.",
            "",
            "| dtype | degree | path | backend | rows | time (s) | relu (s) | time ratio | peak (MiB) "
            "| relu peak (MiB) | memory ratio | goal met |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows_out:
            met = "" if r["meets_goal"] is None else ("yes" if r["meets_goal"] else "no")
            lines.append(f"| {r['dtype']} | {r['degree']} | {r['path']} | {r['backend']} | {r['rows']} "
                         f"| {r['time_s']:.3f} | {r['relu_time_s']:.3f} | {r['time_ratio']:.2f} | {r['peak_mib']:.0f} "
                         f"| {r['relu_peak_mib']:.0f} | {r['memory_ratio']:.2f} | {met} |")
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
