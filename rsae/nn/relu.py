"""ReLU SAE: `z = relu(h)`, trained with MSE plus an L1 penalty weighted by decoder row norms."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rsae.nn.sae import Latents, SAEOutput, SparseAutoencoder


def decoder_weighted_l1(values: Tensor, W_dec: Tensor) -> Tensor:
    """Mean over tokens of `sum_i |z_i| * ||W_dec[i]||_2` for dense codes `values` [N, d_sae].

    Weighting by the decoder norm makes the penalty blind to the scale trade between a latent and
    its decoder row, so the model cannot shrink `z` and grow `W_dec[i]` to dodge it."""
    return (values.float().abs() * W_dec.float().norm(dim=-1)).sum(-1).mean()


class ReLUSAE(SparseAutoencoder):
    """The classic SAE (Anthropic's April 2024 update recipe): dense codes, decoder-weighted L1."""

    def activate(self, pre_acts: Tensor) -> Latents:
        return Latents(F.relu(pre_acts), None)

    def sparsity_penalty(self, output: SAEOutput) -> Tensor:
        return decoder_weighted_l1(output.latents.values, self.W_dec)
