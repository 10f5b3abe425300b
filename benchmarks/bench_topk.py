"""Training-step throughput of TopKSAE's sparse-backward path against a dense PyTorch TopK step.

One step = forward, backward and an Adam update on one batch. Both paths start from the same
weights and see the same batch; their steps are interleaved so that load from other processes
hits both alike, and the median step time is reported. Fixed glibc malloc settings (``--malloc``, see
timing.py) keep one path's frees from changing the other's page faults.

    python benchmarks/bench_topk.py                                  # fp32, d_in 576, d_sae 4608, k 32, batch 4096
    python benchmarks/bench_topk.py --dtype fp32 bf16 --json benchmarks/results/bench_topk.json \
        --markdown benchmarks/results/bench_topk.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timing import add_step_arguments, cpu_model, interleave, use_malloc, write_results

from rsae.nn.config import SAEConfig
from rsae.nn.rational_sae import RSAE
from rsae.nn.sae import SparseAutoencoder, reconstruction_mse
from rsae.nn.sparse_codes import topk_relu
from rsae.nn.topk import TopKSAE

SPARSIFY_REFERENCE = "EleutherAI sparsify's fused TopK step ~8.7k tokens/s vs 5.4k for a dense step (1.6x)"
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def dense_training_loss(model: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """The TopK SAE as plain autograd sees it: dense top-k, scatter to [N, d_sae], dense decode."""
    pre_acts = (x - model.b_dec) @ model.W_enc + model.b_enc
    values, indices = topk_relu(pre_acts, model.cfg.k)
    codes = torch.zeros_like(pre_acts).scatter(-1, indices, values)
    return reconstruction_mse(x, codes @ model.W_dec + model.b_dec)


def sparse_training_loss(model: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    return model.training_loss(x).total


def make_step(
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor], model: SparseAutoencoder, x: torch.Tensor, dtype: str
) -> Callable[[], float]:
    # Fused Adam for both paths: foreach Adam alone costs ~110 ms a step at this size on CPU.
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    autocast_dtype = AUTOCAST_DTYPES[dtype]

    def step() -> float:
        start = time.perf_counter()
        autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with autocast:
            loss = loss_fn(model, x)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return time.perf_counter() - start

    return step


def benchmark(args: argparse.Namespace, dtype: str) -> dict[str, object]:
    cfg = SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture="topk", k=args.k)
    torch.manual_seed(0)
    sparse_model = TopKSAE(cfg)
    dense_model = TopKSAE(cfg)
    dense_model.load_state_dict(sparse_model.state_dict())
    x = torch.randn(args.batch, args.d_in)
    with torch.no_grad():
        agreement = float((sparse_training_loss(sparse_model, x) - dense_training_loss(dense_model, x)).abs())
    # The end goal the rational gate serves: an RSAE step within 1.10x of its teacher's step.
    rsae_model = RSAE.from_teacher(sparse_model, degree=(9, 8), mode="masked")
    steps = {
        "sparse": make_step(sparse_training_loss, sparse_model, x, dtype),
        "dense": make_step(dense_training_loss, dense_model, x, dtype),
        "rsae": make_step(sparse_training_loss, rsae_model, x, dtype),
    }
    times = interleave(steps, args.warmup, args.steps)
    result: dict[str, object] = {"dtype": dtype, "loss_difference_at_start": agreement}
    for name, samples in times.items():
        median = statistics.median(samples)
        result[name] = {
            "median_step_s": median,
            "tokens_per_s": args.batch / median,
            "best_tokens_per_s": args.batch / min(samples),
            "step_s": samples,
        }
    result["speedup"] = result["sparse"]["tokens_per_s"] / result["dense"]["tokens_per_s"]
    result["rsae_step_ratio"] = result["rsae"]["median_step_s"] / result["sparse"]["median_step_s"]
    return result


def markdown(report: dict[str, object]) -> str:
    shape = report["shape"]
    lines = [
        "# TopK SAE training-step throughput",
        "",
        f"d_in {shape['d_in']}, d_sae {shape['d_sae']}, k {shape['k']}, batch {shape['batch']}; "
        f"forward + backward + fused Adam; median of {report['steps']} interleaved steps; torch {report['torch']}, "
        f"{report['threads']} threads ({report['machine']}; malloc `{report['malloc']}`; load average "
        f"{report['load_average_at_start'][0]:.1f} at start, the machine is shared).",
        "",
        "Tokens/s from the median step (from the fastest step in brackets).",
        "",
        "| dtype | sparse-backward tokens/s | dense tokens/s | sparse / dense "
        "| RSAE masked (9,8) tokens/s | RSAE step / TopK step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        sparse, dense = row["sparse"], row["dense"]
        lines.append(
            f"| {row['dtype']} | {sparse['tokens_per_s']:,.0f} ({sparse['best_tokens_per_s']:,.0f}) "
            f"| {dense['tokens_per_s']:,.0f} ({dense['best_tokens_per_s']:,.0f}) | {row['speedup']:.2f}x "
            f"| {row['rsae']['tokens_per_s']:,.0f} ({row['rsae']['best_tokens_per_s']:,.0f}) "
            f"| {row['rsae_step_ratio']:.2f}x (goal <= 1.10x) |"
        )
    lines += ["", f"Reference on this machine: {SPARSIFY_REFERENCE}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, steps=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", nargs="+", choices=sorted(AUTOCAST_DTYPES), default=["fp32"],
                        help="fp32, or bf16 under CPU autocast (weights stay fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    parser.add_argument("--markdown", type=Path, default=None, help="write a summary table here")
    args = parser.parse_args()
    use_malloc(args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)

    report: dict[str, object] = {
        "shape": {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "batch": args.batch},
        "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": cpu_model(), "malloc": args.malloc,
        "load_average_at_start": os.getloadavg(), "results": [],
    }
    for dtype in args.dtype:
        row = benchmark(args, dtype)
        report["results"].append(row)
        print(
            f"{dtype}: sparse {row['sparse']['tokens_per_s']:,.0f} tokens/s, "
            f"dense {row['dense']['tokens_per_s']:,.0f} tokens/s, sparse/dense {row['speedup']:.2f}x, "
            f"RSAE masked {row['rsae']['tokens_per_s']:,.0f} tokens/s, RSAE/TopK step {row['rsae_step_ratio']:.2f}x "
            f"(|loss difference| at start {row['loss_difference_at_start']:.1e})",
            flush=True,
        )
    write_results(report, args.json, args.markdown, markdown)


if __name__ == "__main__":
    main()
