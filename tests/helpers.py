"""Shared test helpers: tiny models and a synthetic dictionary-learning task with a known answer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rsae.config import SAEConfig
from rsae.models import build_model
from rsae.sae import SparseAutoencoder, TrainingLoss

D_IN, D_SAE, K = 32, 128, 4


def make_sae(family: str, seed: int = 0, **overrides: object) -> SparseAutoencoder:
    torch.manual_seed(seed)
    fields = {"d_in": D_IN, "d_sae": D_SAE, "architecture": family, "hook_name": "blocks.3.hook_resid_post",
              "model_name": "synthetic", "jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.05}
    if family == "topk":
        fields["k"] = K
    fields.update(overrides)
    return build_model(SAEConfig(**fields))


def sparse_dictionary_data(n_tokens: int = 2048, n_atoms: int = 64, active: int = 3, seed: int = 0) -> Tensor:
    """x = sum of `active` random unit atoms in R^32 with coefficients in [0.5, 1.5], an offset, and noise."""
    gen = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(n_atoms, D_IN, generator=gen), dim=-1)
    chosen = torch.rand(n_tokens, n_atoms, generator=gen).topk(active, dim=-1).indices
    coefficients = torch.zeros(n_tokens, n_atoms).scatter(-1, chosen, torch.rand(n_tokens, active, generator=gen) + 0.5)
    offset = 0.5 * torch.randn(D_IN, generator=gen)
    return coefficients @ atoms + offset + 0.01 * torch.randn(n_tokens, D_IN, generator=gen)


def fraction_of_variance_unexplained(model: SparseAutoencoder, x: Tensor) -> float:
    with torch.no_grad():
        residual = (model(x) - x).pow(2).sum(-1).mean()
    return float(residual / (x - x.mean(0)).pow(2).sum(-1).mean())


def train(model: SparseAutoencoder, x: Tensor, steps: int = 300, batch: int = 256, lr: float = 3e-3,
          **loss_kwargs: object) -> TrainingLoss:
    """Adam on shuffled minibatches; returns the last step's loss."""
    # Subnormal floats turn up in these tiny CPU runs and slow them 10x or more; torch's default is off.
    torch.set_flush_denormal(True)
    try:
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(1)
        batches_per_epoch = len(x) // batch
        for step in range(steps):
            if step % batches_per_epoch == 0:
                order = torch.randperm(len(x), generator=gen)
            rows = order[(step % batches_per_epoch) * batch:][:batch]
            loss = model.training_loss(x[rows], **loss_kwargs)
            optimiser.zero_grad()
            loss.total.backward()
            optimiser.step()
    finally:
        torch.set_flush_denormal(False)
    return loss
