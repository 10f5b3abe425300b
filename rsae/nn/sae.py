"""The shape every rsae model shares: `h = (x - b_dec) @ W_enc + b_enc`, `z = gate(h)`, `x_hat = z @ W_dec + b_dec`.

Families differ only in `activate` (the gate and its support rule) and in `training_loss` (the
sparsity term). The attributes and methods here are SAEBench's custom-SAE contract.

Two config options cover the public formats that differ from that shape: `apply_b_dec_to_input=False`
encodes `x @ W_enc + b_enc` (Gemma Scope), and `input_normalization="layer_norm"` normalises every token
before encoding and scales the reconstruction back (OpenAI's TopK SAEs). `run` and `forward` work on raw
activations either way; `decode(z)` of a layer-norm SAE returns the normalised-space reconstruction (the
token statistics that undo the normalisation belong to `x`, which `decode` does not see).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsae.nn.config import SAEConfig
from rsae.nn.sparse_codes import sparse_decode


class Latents(NamedTuple):
    """Latent codes, dense or sparse.

    Dense codes have `indices=None` and `values` of shape [N, d_sae]. Sparse codes (TopK) have
    `values` and `indices` of shape [N, k]: latent `indices[n, j]` has value `values[n, j]`."""

    values: Tensor
    indices: Tensor | None

    def dense(self, d_sae: int) -> Tensor:
        if self.indices is None:
            return self.values
        out = self.values.new_zeros(*self.values.shape[:-1], d_sae)
        return out.scatter(-1, self.indices, self.values)

    def l0(self, tolerance: float = 0.0) -> Tensor:
        """Mean number of active latents per token; active means |z| > tolerance (exact when 0)."""
        active = self.values.abs() > tolerance
        return active.sum(-1).float().mean()


LAYER_NORM_EPS = 1e-5
"""Added to the per-token standard deviation when `input_normalization="layer_norm"` divides by it (OpenAI's and
SAELens' value); the reconstruction is scaled back by the std itself."""


class TokenNormalization(NamedTuple):
    """Per-token statistics [N, 1] of a layer-norm SAE's input, to scale its reconstruction back."""

    mean: Tensor
    std: Tensor


class SAEOutput(NamedTuple):
    x_hat: Tensor
    """Reconstruction, [N, d_in]."""
    latents: Latents
    """Codes after the gate."""
    pre_acts: Tensor
    """Encoder pre-activations h, [N, d_sae]."""


class TrainingLoss(NamedTuple):
    total: Tensor
    """What the optimiser minimises: mse + sparsity_coefficient * sparsity + auxk_coefficient * auxk."""
    mse: Tensor
    """Mean over tokens of the squared error summed over dimensions."""
    sparsity: Tensor
    """The family's sparsity term before its coefficient (0 for topk)."""
    auxk: Tensor
    """AuxK loss for dead latents (0 outside the topk family)."""
    output: SAEOutput


class SparseAutoencoder(nn.Module, ABC):
    """Base class: parameters, encode/decode plumbing, input checks and decoder-norm handling."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        # Decoder rows of unit norm and a tied encoder: the standard from-scratch initialisation.
        w_dec = F.normalize(torch.randn(cfg.d_sae, cfg.d_in, dtype=torch.float32), dim=-1)
        self.W_enc = nn.Parameter(w_dec.T.clone().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(w_dec.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def check_input(self, x: Tensor) -> Tensor:
        """Flatten leading dims to [N, d_in], refusing a wrong width with a message naming both."""
        if x.ndim == 0 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"expected activations of shape [..., d_in={self.cfg.d_in}], got {tuple(x.shape)}; "
                f"was this SAE trained on hook {self.cfg.hook_name!r} of {self.cfg.model_name!r}?"
            )
        return x.reshape(-1, self.cfg.d_in)

    def prepare(self, x: Tensor) -> tuple[Tensor, TokenNormalization | None]:
        """Raw activations [..., d_in] to the SAE's input space [N, d_in], and what undoes the normalisation
        (None unless `input_normalization="layer_norm"`, when `x` itself is returned)."""
        x = self.check_input(x)
        if self.cfg.input_normalization == "none":
            return x, None
        mean = x.float().mean(-1, keepdim=True)
        centred = x.float() - mean
        std = centred.std(-1, keepdim=True)
        return (centred / (std + LAYER_NORM_EPS)).to(x.dtype), TokenNormalization(mean, std)

    def restore(self, x_hat: Tensor, normalization: TokenNormalization | None) -> Tensor:
        """A reconstruction in the SAE's input space back in raw units."""
        if normalization is None:
            return x_hat
        # OpenAI's and SAELens' scale-back: the plain std, the epsilon only guarded the division.
        return (x_hat.float() * normalization.std + normalization.mean).to(x_hat.dtype)

    def centered(self, x_in: Tensor) -> Tensor:
        """The encoder's input: `x_in - b_dec`, or `x_in` itself when `cfg.apply_b_dec_to_input` is False."""
        x_in = x_in.to(self.dtype)
        return x_in - self.b_dec if self.cfg.apply_b_dec_to_input else x_in

    def pre_activations(self, x: Tensor) -> Tensor:
        """Encoder pre-activations h [N, d_sae] of raw activations x."""
        return self.centered(self.prepare(x)[0]) @ self.W_enc + self.b_enc

    @abstractmethod
    def activate(self, pre_acts: Tensor) -> Latents:
        """The family's gate: pre-activations [N, d_sae] to latent codes."""

    def run(self, x: Tensor) -> SAEOutput:
        """Encode and decode a batch [N, d_in], keeping everything training and metrics need."""
        x_in, normalization = self.prepare(x)
        pre_acts = self.centered(x_in) @ self.W_enc + self.b_enc
        latents = self.activate(pre_acts)
        return SAEOutput(self.restore(self.decode_latents(latents), normalization), latents, pre_acts)

    def decode_latents(self, latents: Latents) -> Tensor:
        if latents.indices is None:
            return latents.values.to(self.dtype) @ self.W_dec + self.b_dec
        # Sparse codes: sum k decoder rows per token without materialising [N, d_sae].
        return sparse_decode(latents.values, latents.indices, self.W_dec) + self.b_dec

    # --- SAEBench contract -------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Dense latent codes [..., d_sae]."""
        lead = x.shape[:-1]
        latents = self.activate(self.pre_activations(x))
        return latents.dense(self.cfg.d_sae).reshape(*lead, self.cfg.d_sae)

    def decode(self, z: Tensor) -> Tensor:
        if z.ndim == 0 or z.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"expected codes of shape [..., d_sae={self.cfg.d_sae}], got {tuple(z.shape)}")
        return z.to(self.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction with the input's leading shape."""
        return self.run(x).x_hat.reshape(x.shape[:-1] + (self.cfg.d_in,))

    # --- training ------------------------------------------------------------------------------
    def training_loss(
        self,
        x: Tensor,
        sparsity_coefficient: float = 0.0,
        dead_mask: Tensor | None = None,
        auxk_coefficient: float = 1 / 32,
    ) -> TrainingLoss:
        """Reconstruction plus the family's sparsity term on a batch [N, d_in].

        `dead_mask` [d_sae] marks latents that have not fired recently; the topk family feeds them
        to AuxK (weight `auxk_coefficient`), the others ignore it."""
        x = self.check_input(x)
        output = self.run(x)
        mse = reconstruction_mse(x, output.x_hat)
        sparsity = self.sparsity_penalty(output)
        return TrainingLoss(mse + sparsity_coefficient * sparsity, mse, sparsity, mse.new_zeros(()), output)

    def sparsity_penalty(self, output: SAEOutput) -> Tensor:
        """The family's sparsity term before its coefficient; none by default (TopK fixes k instead)."""
        return output.x_hat.new_zeros((), dtype=torch.float32)

    @property
    def input_scale(self) -> float:
        """Factor the SAE expects its inputs multiplied by, relative to the LM's raw activations (1.0 unless it
        was trained on normalised activations and not yet folded back)."""
        return float(self.cfg.extra.get("input_scale", 1.0))

    def zero_band(self) -> Tensor | None:
        """Per-latent magnitudes [d_sae] below which a code counts as zero in `l0_gate_band`; None where every
        zero is exact (the baselines, masked RSAEs)."""
        return None

    @torch.no_grad()
    def set_input_scale(self, scale: float) -> None:
        """Refold the weights so the SAE reads inputs scaled by `scale` (relative to raw activations) and
        returns reconstructions at that scale. Pre-activations, and so the gate and the codes, are unchanged:
        with `c = scale / input_scale`, `(c x - c b_dec) (W_enc / c) = (x - b_dec) W_enc`."""
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"input scale must be a positive finite number, got {scale}")
        c = scale / self.input_scale
        # A layer-norm SAE is scale-free already: its input is normalised and its output scaled back per token.
        if c != 1.0 and self.cfg.input_normalization == "none":
            self.W_enc.div_(c)
            self.W_dec.mul_(c)
            self.b_dec.mul_(c)
        self.cfg.extra["input_scale"] = float(scale)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.data = F.normalize(self.W_dec.data.float(), dim=-1).to(self.dtype)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the part of W_dec's gradient that would only change row norms (unit-norm families)."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec.data).sum(-1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec.data


def reconstruction_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over tokens of the squared error summed over dimensions (the reference MSE)."""
    return (x_hat.float() - x.float()).pow(2).sum(-1).mean()
