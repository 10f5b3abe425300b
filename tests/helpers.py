"""Shared test helpers: tiny models and a synthetic dictionary-learning task with a known answer."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rsae.cache import write_cache_from_arrays
from rsae.config import SAEConfig
from rsae.models import build_model
from rsae.sae import SparseAutoencoder, TrainingLoss

D_IN, D_SAE, K = 32, 128, 4
HOOK = "blocks.3.hook_resid_post"


def make_sae(family: str, seed: int = 0, **overrides: object) -> SparseAutoencoder:
    torch.manual_seed(seed)
    fields = {"d_in": D_IN, "d_sae": D_SAE, "architecture": family, "hook_name": HOOK,
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


def dictionary_cache(folder: Path, n_shards: int = 8, rows_per_shard: int = 512, row_ids: bool = False) -> Path:
    """A float16 activation cache of `sparse_dictionary_data` (hook blocks.3.hook_resid_post, d_in 32) with
    sequences of 33 tokens (BOS + 32 kept rows). With `row_ids`, column 0 holds each row's global index (exact in
    float16 up to 2048 rows)."""
    x = sparse_dictionary_data(n_tokens=n_shards * rows_per_shard, seed=0).numpy()
    if row_ids:
        x[:, 0] = np.arange(len(x))
    tokens = np.ones((rows_per_shard // 32, 33), dtype=np.int32)
    tokens[:, 0] = 0
    shards = [(tokens, {HOOK: x[s * rows_per_shard:(s + 1) * rows_per_shard]}) for s in range(n_shards)]
    write_cache_from_arrays(folder, shards, model="synthetic", dtype="float16")
    return folder


class RecordRows(pl.Callback):
    """Writes `<out>/rank<r>.json`: the column-0 values (row ids) of every training batch this rank saw and a
    hash of its final weights."""

    def __init__(self, out: str) -> None:
        self.out, self.rows = Path(out), []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.rows += [int(v) for v in batch[:, 0].tolist()]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, value in sorted(pl_module.sae.state_dict().items()):
            digest.update(name.encode() + value.detach().cpu().numpy().tobytes())
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"rows": self.rows,
                                                                              "weights": digest.hexdigest()}))


class KillAt(pl.Callback):
    """Ends the process abruptly (like `kill -9`) when training reaches `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            os._exit(3)
