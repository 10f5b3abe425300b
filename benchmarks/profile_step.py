"""Where a training step's time goes: torch.profiler over rsae's TopK (or any family's) step, by operator.

One step = forward, backward and a fused Adam update on one batch, as `bench_step.py` times it. The table lists
the operators with the most self CPU time, and the limit the issue sets the step against: one dense encoder
matmul plus one top-k selection, timed alone on the same batch.

    python benchmarks/profile_step.py --json benchmarks/results/profile_step.json \
        --markdown benchmarks/results/profile_step.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from timing import cpu_model

from rsae.nn.config import SAEConfig
from rsae.nn.registry import build_model
from rsae.nn.sparse_codes import topk_relu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="topk")
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture=args.family,
                                  k=args.k if args.family == "topk" else None))
    x = torch.randn(args.batch_size, args.d_in)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-5, fused=True)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext

    def step() -> None:
        with autocast():
            loss = model.training_loss(x, sparsity_coefficient=1e-3)
        optimiser.zero_grad(set_to_none=True)
        loss.total.backward()
        optimiser.step()

    def limit() -> None:  # one dense forward matmul plus one selection: what no TopK step can avoid
        with torch.no_grad(), autocast():
            topk_relu(x @ model.W_enc + model.b_enc, args.k)

    for _ in range(3):
        step()
        limit()
    step_s, limit_s = [], []
    for _ in range(args.steps):  # interleaved, so that load from other processes hits both alike
        start = time.perf_counter()
        step()
        step_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        limit()
        limit_s.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
             "share": e.self_cpu_time_total / total, "calls_per_step": e.count / args.steps}
            for e in events[: args.top]]
    step_ms, limit_ms = statistics.median(step_s) * 1e3, statistics.median(limit_s) * 1e3
    result = {"machine": {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__},
              "config": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
              "step_ms": step_ms, "limit_ms": limit_ms, "limit_over_step": limit_ms / step_ms, "ops": rows}
    lines = [f"# Where the {args.family} step's time goes ({args.dtype})", "",
             f"d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, batch {args.batch_size}; {cpu_model()}, "
             f"{args.threads} threads, torch {torch.__version__}.", "",
             f"Median step {step_ms:.1f} ms; one dense encoder matmul plus one top-k selection {limit_ms:.1f} ms: "
             f"the step runs at {limit_ms / step_ms:.2f} of that limit (goal >= 0.7).", "",
             "| operator | self ms / step | share | calls / step |", "|---|---:|---:|---:|"]
    lines += [f"| `{r['op']}` | {r['self_ms_per_step']:.1f} | {r['share']:.0%} | {r['calls_per_step']:g} |" for r in rows]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
