"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token (after a ReLU), train
with MSE plus AuxK for dead latents.

Training runs through the k-sparse encoder and decoder of `rsae.nn.sparse_codes`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rsae.nn.config import SAEConfig
from rsae.nn.sae import Latents, SAEOutput, SparseAutoencoder, TrainingLoss, reconstruction_mse
from rsae.nn.sparse_codes import sparse_decode, topk_encode, topk_relu


def auxk_loss(
    pre_acts: Tensor, dead_mask: Tensor | None, residual: Tensor, W_dec: Tensor, k_aux: int | None = None
) -> Tensor:
    """AuxK (Gao et al. 2024): let the top `k_aux` dead latents of each token predict the residual.

    pre_acts: [N, d_sae], or [N, n_dead] already restricted to the dead latents (in the order of
        `dead_mask.nonzero()`); gradient reaches the encoder only through these, so pass
        pre-activations that carry it.
    dead_mask: [d_sae] bool, True for latents that have not fired recently; None means none dead.
    residual: `x - x_hat` [N, d_in], detached here: AuxK trains the dead latents, not the live model.
    k_aux: latents per token, default `d_in // 2`, capped at the number of dead latents.

    Returns the mean over tokens of `||e_hat - e||^2` (summed over dims) times
    `min(n_dead / k_aux, 1)`, where `e_hat` decodes the ReLU'd selection without `b_dec`; 0 when
    no latent is dead."""
    n_dead = 0 if dead_mask is None else int(dead_mask.sum())
    if n_dead == 0:
        return residual.new_zeros((), dtype=torch.float32)
    if pre_acts.shape[-1] not in (n_dead, dead_mask.numel()):
        raise ValueError(
            f"pre_acts of shape {tuple(pre_acts.shape)} must have d_sae={dead_mask.numel()} or n_dead={n_dead} columns"
        )
    dead = dead_mask.nonzero().squeeze(-1)
    dead_pre_acts = pre_acts if pre_acts.shape[-1] == n_dead else pre_acts[:, dead]
    k_aux = max(residual.shape[-1] // 2, 1) if k_aux is None else k_aux
    if k_aux < 1:
        raise ValueError(f"k_aux={k_aux} must be a positive int")
    scale = min(n_dead / k_aux, 1.0)
    values, local_indices = topk_relu(dead_pre_acts, min(k_aux, n_dead))
    residual_hat = sparse_decode(values, dead[local_indices], W_dec)
    return scale * reconstruction_mse(residual.detach(), residual_hat)


def dead_latent_auxk(
    x_centered: Tensor, residual: Tensor, model: SparseAutoencoder, dead_mask: Tensor | None
) -> Tensor:
    """AuxK with gradient into the dead latents' encoder columns, for models trained through `topk_encode`.

    `topk_encode`'s pre_acts carry no gradient, so the dead columns are recomputed (few, once
    training settles). `x_centered` is `x - b_dec`, `residual` is `x - x_hat`."""
    if dead_mask is None or not bool(dead_mask.any()):
        return residual.new_zeros((), dtype=torch.float32)
    dead = dead_mask.nonzero().squeeze(-1)
    dead_pre_acts = torch.addmm(model.b_enc[dead], x_centered, model.W_enc[:, dead])
    return auxk_loss(dead_pre_acts, dead_mask, residual, model.W_dec)


class TopKSAE(SparseAutoencoder):
    """TopK SAE: sparse codes with exactly k slots per token, trained on MSE + AuxK."""

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.family != "topk":
            raise ValueError(f"TopKSAE needs a config of family 'topk' (with k), got family={cfg.family!r}")
        super().__init__(cfg)

    def activate(self, pre_acts: Tensor) -> Latents:
        return Latents(*topk_relu(pre_acts, self.cfg.k))

    def run(self, x: Tensor) -> SAEOutput:
        x_in, normalization = self.prepare(x)
        output = self._run_centered(self.centered(x_in))
        return output._replace(x_hat=self.restore(output.x_hat, normalization))

    def _run_centered(self, x_centered: Tensor) -> SAEOutput:
        values, indices, pre_acts = topk_encode(x_centered, self.W_enc, self.b_enc, self.cfg.k)
        latents = Latents(values, indices)
        return SAEOutput(self.decode_latents(latents), latents, pre_acts)

    def training_loss(
        self,
        x: Tensor,
        sparsity_coefficient: float = 0.0,
        dead_mask: Tensor | None = None,
        auxk_coefficient: float = 1 / 32,
    ) -> TrainingLoss:
        x = self.check_input(x)
        x_in, normalization = self.prepare(x)
        x_centered = self.centered(x_in)
        output = self._run_centered(x_centered)
        auxk = dead_latent_auxk(x_centered, x_in.float() - output.x_hat.float(), self, dead_mask)
        output = output._replace(x_hat=self.restore(output.x_hat, normalization))
        mse = reconstruction_mse(x, output.x_hat)
        return TrainingLoss(mse + auxk_coefficient * auxk, mse, mse.new_zeros(()), auxk, output)
