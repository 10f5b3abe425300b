"""Whole training step (forward + backward + Adam) of an RSAE against its teacher's step.

The rational gate exists to be trained, so the figure that matters is the step, not the gate
alone: the goal is an RSAE step within 1.10x of its baseline's. Teacher and RSAE steps are
interleaved in one run on the same batch; the script prints step/step ratios per family and mode.
It runs under fixed glibc malloc settings (``--malloc``, see timing.py): left to glibc's dynamic
mmap threshold, one model's frees change the other's page faults.

    python benchmarks/bench_step.py --json benchmarks/results/bench_step.json \
        --markdown benchmarks/results/bench_step.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timing import add_step_arguments, cpu_model, interleave, use_malloc

from rsae.nn.config import FAMILIES, GATE_MODES, SAEConfig
from rsae.nn.rational_sae import RSAE
from rsae.nn.registry import build_model
from rsae.nn.sae import SparseAutoencoder


def make_step(model: SparseAutoencoder, x: torch.Tensor, bf16: bool) -> Callable[[], float]:
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-5, fused=True)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = model.training_loss(x, sparsity_coefficient=1e-3)
        optimiser.zero_grad(set_to_none=True)
        loss.total.backward()
        optimiser.step()
        return time.perf_counter() - start

    return step


def measure(args: argparse.Namespace, family: str, mode: str) -> dict[str, object]:
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture=family, k=args.k if family == "topk" else None,
                    jumprelu_init_threshold=0.05)
    teacher = build_model(cfg)
    x = torch.randn(args.batch, args.d_in)
    with torch.no_grad():
        # A random SAE fires on half its latents; shift the encoder bias so that a trained SAE's
        # ~1.5% fire, since the masked gate's cost scales with the active entries.
        teacher.b_enc -= torch.quantile(teacher.pre_activations(x[:512]), 1 - args.density, dim=0)
    rsae = RSAE.from_teacher(teacher, mode=mode, activations=x)
    with torch.no_grad():
        l0 = float(teacher.run(x).latents.l0())
    steps = {"teacher": make_step(teacher, x, args.bf16), "rsae": make_step(rsae, x, args.bf16)}
    times = interleave(steps, args.warmup, args.steps)
    teacher_s, rsae_s = statistics.median(times["teacher"]), statistics.median(times["rsae"])
    return {"family": family, "mode": mode, "degree": list(rsae.cfg.degree), "teacher_l0": l0,
            "teacher_step_s": teacher_s, "rsae_step_s": rsae_s, "ratio": rsae_s / teacher_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, steps=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.015, help="fraction of latents the teachers fire on")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay fp32)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--modes", nargs="+", default=list(GATE_MODES), choices=GATE_MODES)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    use_malloc(args.malloc)

    rows = []
    for family in args.families:
        for mode in args.modes:
            row = measure(args, family, mode)
            rows.append(row)
            print(f"{family:<9} {mode:<12} teacher {row['teacher_step_s']:.3f}s  rsae {row['rsae_step_s']:.3f}s  "
                  f"ratio {row['ratio']:.2f}x  (teacher L0 {row['teacher_l0']:.0f})", flush=True)
    report = {"shape": {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "batch": args.batch},
              "bf16": args.bf16, "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": cpu_model(),
              "malloc": args.malloc, "load_average_at_start": os.getloadavg(), "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        lines = [
            "# RSAE training step vs its teacher's step",
            "",
            f"d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, batch {args.batch}, "
            f"{'bf16 autocast' if args.bf16 else 'fp32'}; forward + backward + fused Adam, median of {args.steps} "
            f"interleaved steps, malloc `{args.malloc}`; {torch.get_num_threads()} threads on a shared 2-core "
            f"{report['machine']}. Random teachers with the encoder bias shifted so that {args.density:.1%} of "
            "latents fire, as in a trained SAE.",
            "",
            "| family | mode | degree | teacher L0 | teacher step (s) | RSAE step (s) "
            "| RSAE / teacher (goal <= 1.10x) |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(f"| {r['family']} | {r['mode']} | {tuple(r['degree'])} | {r['teacher_l0']:.0f} "
                         f"| {r['teacher_step_s']:.3f} | {r['rsae_step_s']:.3f} | {r['ratio']:.2f}x |")
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
