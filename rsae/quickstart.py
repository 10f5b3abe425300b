"""`rsae quickstart`: the smallest end-to-end run of the method.

Until the language-model cache and Lightning training land, it works on a synthetic dictionary
task with a known answer: activations are sparse non-negative mixtures of random unit directions
plus noise. It trains a TopK teacher, upgrades it to an RSAE (masked mode, exact identity at
initialisation), round-trips the RSAE through the checkpoint format, fine-tunes the RSAE and the
control (the teacher trained for the same extra steps), and prints one table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor

from rsae.checkpoint import load, save
from rsae.config import SAEConfig
from rsae.rational_sae import RSAE
from rsae.sae import SparseAutoencoder
from rsae.topk_sae import TopKSAE


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output folder")
    parser.add_argument("--d-in", type=int, default=64, help="activation width")
    parser.add_argument("--d-sae", type=int, default=512, help="number of latents")
    parser.add_argument("--k", type=int, default=8, help="active latents per token (TopK teacher)")
    parser.add_argument("--steps", type=int, default=600, help="teacher training steps")
    parser.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps (RSAE and control)")
    parser.add_argument("--batch", type=int, default=1024, help="tokens per step")
    parser.add_argument("--seed", type=int, default=0)


def synthetic_activations(n: int, directions: Tensor, active: int, generator: torch.Generator) -> Tensor:
    """Sparse non-negative mixtures of `directions` with exponential magnitudes, plus 1% noise."""
    n_features, d_in = directions.shape
    idx = torch.rand(n, n_features, generator=generator).topk(active, dim=-1).indices
    mags = torch.empty(n, active).exponential_(generator=generator)
    codes = torch.zeros(n, n_features).scatter(-1, idx, mags)
    return codes @ directions + 0.01 * torch.randn(n, d_in, generator=generator)


def train(model: SparseAutoencoder, data: Tensor, steps: int, batch: int, lr: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    fired = torch.zeros(model.cfg.d_sae, dtype=torch.bool)
    for step in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=generator)]
        loss = model.training_loss(x, dead_mask=~fired if step > 50 else None)
        optimiser.zero_grad(set_to_none=True)
        loss.total.backward()
        model.remove_gradient_parallel_to_decoder_directions()
        optimiser.step()
        model.set_decoder_norm_to_unit_norm()
        latents = loss.output.latents
        fired |= latents.dense(model.cfg.d_sae).detach().ne(0).any(0)


@torch.no_grad()
def evaluate(model: SparseAutoencoder, data: Tensor) -> dict[str, float]:
    out = model.run(data)
    ss = (out.x_hat.double() - data.double()).pow(2).sum(-1)
    total = data.double().pow(2).sum(-1).mean() - data.double().mean(0).pow(2).sum()
    dense = out.latents.dense(model.cfg.d_sae)
    return {
        "mse": ss.mean().item(),
        "explained_variance": (1 - ss.mean() / total).item(),
        "l0": out.latents.l0().item(),
        "alive": dense.ne(0).any(0).float().mean().item(),
    }


def run_quickstart(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    directions = torch.nn.functional.normalize(torch.randn(4 * args.d_sae // 2, args.d_in, generator=generator), dim=-1)
    train_data = synthetic_activations(32_768, directions, active=args.k // 2, generator=generator)
    test_data = synthetic_activations(8_192, directions, active=args.k // 2, generator=generator)
    print(f"synthetic activations: d_in={args.d_in}, {len(train_data)} train / {len(test_data)} test tokens")

    teacher = TopKSAE(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture="topk", k=args.k))
    print(f"training a TopK teacher ({args.steps} steps) ...")
    train(teacher, train_data, args.steps, args.batch, lr=2e-3, seed=args.seed)

    rsae = RSAE.from_teacher(teacher, mode="masked")
    folder = save(rsae, args.out / "rsae-init")
    rsae = load(folder)
    init_rows = {"teacher": evaluate(teacher, test_data), "rsae-init": evaluate(rsae, test_data)}

    control = TopKSAE(teacher.cfg)
    control.load_state_dict(teacher.state_dict())
    print(f"fine-tuning the RSAE and the control ({args.finetune_steps} steps each) ...")
    train(rsae, train_data, args.finetune_steps, args.batch, lr=5e-4, seed=args.seed + 1)
    train(control, train_data, args.finetune_steps, args.batch, lr=5e-4, seed=args.seed + 1)
    save(rsae, args.out / "rsae")
    rows = {**init_rows, "rsae": evaluate(rsae, test_data), "control": evaluate(control, test_data)}

    print(f"\n{'model':<10} {'MSE':>10} {'expl.var':>9} {'L0':>6} {'alive':>6}")
    for name, m in rows.items():
        print(f"{name:<10} {m['mse']:>10.5f} {m['explained_variance']:>9.4f} {m['l0']:>6.2f} {m['alive']:>6.3f}")
    print(f"\ncheckpoints in {args.out}/ ({time.perf_counter() - start:.0f} s)")
    return 0
