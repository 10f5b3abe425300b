"""Times one SAE library's own training step in this process, for one row of bench_peers.py.

bench_peers.py runs this file once per row, with the Python of the venv that holds the library named by
--impl (rsae's own venv, or benchmarks/.venvs/{saelens,sparsify}), so it imports only the standard
library, torch and that one library. Every row loads the same batches from --data, runs the same
warm-up and blocks of steps, and writes its figures to --out as JSON.

    python benchmarks/peers/step_runner.py --impl saelens --family topk --d-sae 4608 --data DATA.pt --out ROW.json

One step is what the library's trainer does to the model on a batch: its forward and loss, backward, and
its Adam step. The trainers' bookkeeping around that (firing statistics, logging, SAELens' gradient-norm
clipping, sparsify's and rsae's decoder-norm projections, learning-rate schedules) is left out of every
row alike.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

Step = Callable[[Tensor], None]
Reconstruct = Callable[[Tensor], Tensor]


def autocast(bf16: bool) -> contextlib.AbstractContextManager[object]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def rsae_step(args: argparse.Namespace) -> tuple[Step, Reconstruct, nn.Module]:
    # As benchmarks/bench_step.py's make_step: rsae's training loss, backward, fused Adam.
    from rsae.nn.config import SAEConfig
    from rsae.nn.registry import build_model

    cfg = SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture=args.family,
                    k=args.k if args.family == "topk" else None, jumprelu_init_threshold=args.jumprelu_threshold,
                    jumprelu_bandwidth=args.jumprelu_bandwidth)
    model = build_model(cfg)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)

    def step(x: Tensor) -> None:
        with autocast(args.bf16):
            loss = model.training_loss(x, sparsity_coefficient=args.sparsity_coefficient)
        optimiser.zero_grad(set_to_none=True)
        loss.total.backward()
        optimiser.step()

    return step, model, model


def saelens_step(args: argparse.Namespace) -> tuple[Step, Reconstruct, nn.Module]:
    # As SAETrainer._train_step: training_forward_pass on a TrainStepInput, backward, Adam (its defaults).
    from sae_lens.saes import (
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput

    if args.family == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k))
    elif args.family == "relu":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae,
                                                            l1_coefficient=args.sparsity_coefficient))
    else:
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
            d_in=args.d_in, d_sae=args.d_sae, l0_coefficient=args.sparsity_coefficient,
            jumprelu_init_threshold=args.jumprelu_threshold, jumprelu_bandwidth=args.jumprelu_bandwidth))
    sae.train()
    # The trainer passes its coefficient schedulers' values (no warm-up here) and its dead-neuron mask,
    # which stays all False until dead_feature_window steps have passed: far more than are timed.
    coefficients = {name: c.value if isinstance(c, TrainCoefficientConfig) else float(c)
                    for name, c in sae.get_coefficients().items()}
    dead = torch.zeros(args.d_sae, dtype=torch.bool)
    optimiser = torch.optim.Adam(sae.parameters(), lr=args.lr)

    def step(x: Tensor) -> None:
        with autocast(args.bf16):
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients,
                                                           dead_neuron_mask=dead, n_training_steps=0,
                                                           is_logging_step=False))
        out.loss.backward()
        optimiser.step()
        optimiser.zero_grad()

    return step, sae, sae


def sparsify_step(args: argparse.Namespace) -> tuple[Step, Reconstruct, nn.Module]:
    # As sparsify's Trainer with optimizer="adam" (torch's Adam when bitsandbytes is absent): the SparseCoder's
    # forward (fused TopK encoder, embedding-bag decoder), loss fvu + auxk_alpha * auxk, backward, Adam.
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k), dtype=torch.float32)
    # rsae's AuxK weight; with no latent dead yet (the Trainer's threshold is 10M tokens) AuxK is skipped,
    # as in rsae's and SAELens' steps.
    auxk_alpha = 1 / 32
    dead = torch.zeros(args.d_sae, dtype=torch.bool)
    optimiser = torch.optim.Adam(sae.parameters(), lr=args.lr)

    def step(x: Tensor) -> None:
        with autocast(args.bf16):
            out = sae(x, dead_mask=dead)
            loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()

    return step, lambda x: sae(x).sae_out, sae


# --impl: the row's step builder and the distribution whose version the row records.
BUILDERS = {"rsae": (rsae_step, "rsae"), "saelens": (saelens_step, "sae-lens"),
            "sparsify": (sparsify_step, "eai-sparsify")}


def fvu(reconstruct: Reconstruct, x: Tensor) -> float:
    """1 - explained variance of the batch: squared error over squared deviation from the batch mean, in fp32."""
    with torch.no_grad():
        x_hat = reconstruct(x).float()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def machine_busy_s() -> float | None:
    """CPU seconds all processes have used since boot (user, nice, system, irq, softirq, steal), or None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    return sum(fields[i] for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK")


def status_mib(key: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS, so that the peak read later is the steps' own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=sorted(BUILDERS), required=True)
    parser.add_argument("--family", choices=("topk", "relu", "jumprelu"), required=True)
    parser.add_argument("--d-sae", type=int, required=True)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay fp32)")
    parser.add_argument("--data", type=Path, required=True, help="torch file with 'batches' [pool, N, d_in] and 'eval'")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="clean blocks wanted")
    parser.add_argument("--max-blocks", type=int, default=10, help="blocks run at most, clean or not")
    parser.add_argument("--max-other-cpu", type=float, default=0.1,
                        help="a block is skipped when other processes used more than this many cores during it")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sparsity-coefficient", type=float, default=1e-3)
    parser.add_argument("--jumprelu-threshold", type=float, default=0.05)
    parser.add_argument("--jumprelu-bandwidth", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = torch.load(args.data, weights_only=True)
    batches, eval_batch = data["batches"], data["eval"]
    args.d_in = batches.shape[-1]
    build, distribution = BUILDERS[args.impl]
    step, reconstruct, model = build(args)
    fvu_start = fvu(reconstruct, eval_batch)

    peak_before = status_mib("VmHWM")
    rss_before = status_mib("VmRSS")
    peak_reset = reset_peak_rss()
    count = 0

    def run(steps: int) -> None:
        nonlocal count
        for _ in range(steps):
            step(batches[count % len(batches)])
            count += 1

    run(args.warmup)
    block_s, skipped, other_cpu = [], [], []
    while len(block_s) < args.blocks and len(block_s) + len(skipped) < args.max_blocks:
        busy, own, start = machine_busy_s(), time.process_time(), time.perf_counter()
        run(args.steps)
        wall = time.perf_counter() - start
        own = time.process_time() - own
        # Other processes' CPU time during the block: the machine's busy time less this process's own.
        # /proc/stat counts in clock ticks, hence two ticks of slack on top of the allowance.
        other = None if busy is None else machine_busy_s() - busy - own
        other_cpu.append(other)
        if other is not None and other > args.max_other_cpu * wall + 2 / os.sysconf("SC_CLK_TCK"):
            skipped.append(wall / args.steps)
        else:
            block_s.append(wall / args.steps)
    # A machine never quiet enough still gets a figure, from every block, flagged as contended.
    contended = not block_s
    step_s = statistics.median(block_s or skipped)
    peak_after = status_mib("VmHWM")

    row = {
        "impl": args.impl, "version": importlib.metadata.version(distribution), "family": args.family,
        "dtype": "bf16" if args.bf16 else "fp32", "d_in": args.d_in, "d_sae": args.d_sae, "batch": batches.shape[1],
        "k": args.k if args.family == "topk" else None, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_s": step_s, "tokens_per_s": batches.shape[1] / step_s, "block_step_s": block_s,
        "skipped_block_step_s": skipped, "blocks_kept": len(block_s), "blocks_skipped": len(skipped),
        "contended": contended, "other_cpu_s": other_cpu, "steps_per_block": args.steps, "warmup": args.warmup,
        # The process's peak (its imports' included), and the steps' own: their peak less the RSS before them.
        "peak_rss_mib": max(filter(None, (peak_before, peak_after)), default=None),
        "step_peak_mib": peak_after - rss_before if peak_reset and peak_after and rss_before else None,
        "fvu_start": fvu_start, "fvu_end": fvu(reconstruct, eval_batch), "steps_total": count,
    }
    args.out.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
