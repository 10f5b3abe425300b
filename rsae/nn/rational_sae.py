"""The Rational Sparse Autoencoder: a teacher SAE whose gate is replaced by a trainable rational.

`phi(h)_i = C_out_i * r((h_i - s_i) / C_in_i)` (see `rsae.rational.gate.RationalGate`). How the gate makes
codes sparse is the config's `mode`:

- `masked`: the teacher's support rule keeps exact zeros (ReLU `h > 0`, JumpReLU `h > theta_i`,
  TopK the k largest per token) and the rational only shapes active magnitudes. Initialised to the
  identity on the active set, the RSAE reproduces its teacher to fp32 rounding.
- `pure`: the paper's literal gate `z = phi(h)` everywhere, fitted to the teacher's whole gate.
  Never exactly zero, so L0 is counted at `cfg.l0_tolerance`.
- `thresholded`: `phi(h)` with a hard zero where `|phi_i(h)| <= threshold_eps * C_out_i`
  (eps lives in the canonical units of the fit, so one value serves every latent's scale), with
  straight-through gradients; sparsity is exact and the rational's own shape decides the support.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor, nn

from rsae.nn.config import GATE_MODES, CoefficientSharing, GateMode, SAEConfig
from rsae.nn.jumprelu import step, threshold_mask
from rsae.nn.relu import decoder_weighted_l1
from rsae.nn.sae import Latents, SAEOutput, SparseAutoencoder, TrainingLoss, reconstruction_mse
from rsae.nn.sparse_codes import topk_encode, topk_relu
from rsae.nn.thresholds import threshold_scales, topk_threshold
from rsae.nn.topk import dead_latent_auxk
from rsae.rational.gate import RationalGate
from rsae.rational.remez import GateFit, fit_gate, lookup_fit

__all__ = ["DEFAULT_DEGREES", "RSAE", "gate_l2", "topk_threshold"]

DEFAULT_DEGREES: dict[str, tuple[int, int]] = {"relu": (3, 2), "jumprelu": (9, 8), "topk": (9, 8)}
"""The paper's degrees per teacher family."""


class _Encoded(NamedTuple):
    latents: Latents
    pre_acts: Tensor
    gate_magnitude: Tensor | None
    """|phi(h)| before the hard zero (thresholded mode only; its L0 penalty needs it)."""


class RSAE(SparseAutoencoder):
    """An SAE with a trainable rational gate; build one from a teacher with `RSAE.from_teacher`."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        assert cfg.degree is not None  # SAEConfig.validate guarantees it for architecture 'rsae'
        self.gate = RationalGate(cfg.d_sae, cfg.degree, cfg.coefficient_sharing, cfg.n_coefficient_groups)
        if self.uses_threshold:
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, dtype=self.dtype))

    @property
    def uses_threshold(self) -> bool:
        """Masked mode on a JumpReLU teacher keeps the teacher's trainable per-latent thresholds."""
        return self.cfg.mode == "masked" and self.cfg.family == "jumprelu"

    @classmethod
    def from_teacher(
        cls,
        teacher: SparseAutoencoder,
        degree: tuple[int, int] | None = None,
        mode: GateMode = "masked",
        coefficient_sharing: CoefficientSharing = "shared",
        n_coefficient_groups: int = 1,
        fit: GateFit | None = None,
        activations: Tensor | None = None,
        threshold_eps: float | None = None,
    ) -> RSAE:
        """Copy the teacher's weights and put a rational gate in place of its fixed one.

        `masked` mode starts from the exact identity on the active set. `pure` and `thresholded`
        start from a Remez fit of the teacher's gate (`fit`, else the shipped table, else a fresh
        fit) mapped onto each latent's threshold. A TopK teacher stores k but no threshold, so
        those two modes need `activations` [N, d_in] to estimate one. `threshold_eps` defaults to
        twice the fit's error, so the fit's ripple below the threshold becomes exact zeros."""
        if mode not in GATE_MODES:
            raise ValueError(f"mode={mode!r} is invalid: expected one of {GATE_MODES}")
        if teacher.cfg.architecture == "rsae":
            raise ValueError("the teacher must be a baseline SAE (relu, jumprelu or topk), not an RSAE")
        family = teacher.cfg.family
        assert family is not None
        degree = degree or DEFAULT_DEGREES[family]
        if mode != "masked" and fit is None:
            fit = lookup_fit(family, degree) or fit_gate(family, degree)
        eps_default = 2 * fit.max_error if fit is not None else teacher.cfg.jumprelu_bandwidth
        cfg = dataclasses.replace(
            teacher.cfg,
            architecture="rsae",
            family=family,
            degree=degree,
            mode=mode,
            coefficient_sharing=coefficient_sharing,
            n_coefficient_groups=n_coefficient_groups,
            threshold_eps=eps_default if threshold_eps is None else threshold_eps,
            dtype=str(teacher.dtype).removeprefix("torch."),
            extra=dict(teacher.cfg.extra),
        )
        model = cls(cfg).to(teacher.device)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(model, name).copy_(getattr(teacher, name))
            if model.uses_threshold:
                model.threshold.copy_(teacher.threshold)
            if mode == "masked":
                model.gate.set_identity_(1.0)
            else:
                assert fit is not None
                model.gate.set_coefficients(torch.as_tensor(fit.numerator), torch.as_tensor(fit.denominator))
                scale = threshold_scales(teacher, fit, activations)
                model.gate.shift.zero_()
                model.gate.scale_in.copy_(scale)
                model.gate.scale_out.copy_(scale)
        return model

    # --- forward --------------------------------------------------------------------------------
    def activate(self, pre_acts: Tensor) -> Latents:
        return self._activate(pre_acts).latents

    def run(self, x: Tensor) -> SAEOutput:
        x_in, normalization = self.prepare(x)
        encoded = self._encode(x_in)
        x_hat = self.restore(self.decode_latents(encoded.latents), normalization)
        return SAEOutput(x_hat, encoded.latents, encoded.pre_acts)

    def _encode(self, x_in: Tensor) -> _Encoded:
        """Codes of inputs already in the SAE's input space (`prepare`)."""
        if self.cfg.mode == "masked" and self.cfg.family == "topk":
            # Sparse fast path: only the k selected latents per token reach the gate and the backward.
            assert self.cfg.k is not None
            values, indices, pre_acts = topk_encode(self.centered(x_in), self.W_enc, self.b_enc, self.cfg.k)
            return _Encoded(self._masked_topk(values, indices), pre_acts, None)
        return self._activate(self.centered(x_in) @ self.W_enc + self.b_enc)

    def _activate(self, pre_acts: Tensor) -> _Encoded:
        cfg = self.cfg
        if cfg.mode == "masked":
            if cfg.family == "topk":
                assert cfg.k is not None
                return _Encoded(self._masked_topk(*topk_relu(pre_acts, cfg.k)), pre_acts, None)
            # The gate runs on every entry, one fused pass each way, and the teacher's rule zeroes the inactive ones.
            # Gathering the few percent of active entries and scattering them back made the whole training step
            # slower on CPU (benchmarks/bench_step.py) and needs a host sync on GPUs (nonzero).
            if cfg.family == "relu":
                # Inside the gate's pass: a torch.where after it costs two more passes each way.
                return _Encoded(Latents(self.gate(pre_acts, positive_support=True), None), pre_acts, None)
            # JumpReLU: the threshold's straight-through gradient reads phi(h) near theta.
            latents = threshold_mask(self.gate(pre_acts), pre_acts, self.threshold, cfg.jumprelu_bandwidth)
            return _Encoded(Latents(latents, None), pre_acts, None)
        gate_out = self.gate(pre_acts)
        if cfg.mode == "pure":
            return _Encoded(Latents(gate_out, None), pre_acts, None)
        # The zero band is detached, so the hard zero passes no gradient but gate_out's own: a where, not
        # a straight-through step (whose product would cost two more passes in backward).
        magnitude = gate_out.abs()
        return _Encoded(Latents(torch.where(magnitude > self.gate_band(), gate_out, 0.0), None), pre_acts, magnitude)

    def gate_codes(self, pre_acts: Tensor) -> Tensor:
        """Dense codes [N, d_sae] the gate is fitted by: the mode's support rule applied to phi(h), before the
        zero band of `thresholded` mode (see `gate_l2`)."""
        if self.cfg.mode == "masked":
            return self.activate(pre_acts).dense(self.cfg.d_sae)
        return self.gate(pre_acts)

    def _masked_topk(self, values: Tensor, indices: Tensor) -> Latents:
        # A selected value of 0 (fewer than k positive pre-activations) must stay an exact zero.
        return Latents(self.gate(values, latent_index=indices, positive_support=True), indices)

    def gate_band(self) -> Tensor:
        """Per-latent `threshold_eps * |C_out_i|` [d_sae]: the outputs `thresholded` mode zeroes, in the gate's own
        scale (and, in `pure` mode, where `l0_gate_band` counts a code as zero)."""
        return self.cfg.threshold_eps * self.gate.scale_out.detach().abs()

    def zero_band(self) -> Tensor | None:
        return None if self.cfg.mode == "masked" else self.gate_band()

    # --- training -------------------------------------------------------------------------------
    def training_loss(
        self,
        x: Tensor,
        sparsity_coefficient: float = 0.0,
        dead_mask: Tensor | None = None,
        auxk_coefficient: float = 1 / 32,
    ) -> TrainingLoss:
        """MSE plus the sparsity term of the mode: masked keeps the teacher family's (decoder-weighted
        L1, JumpReLU L0 through the straight-through estimator, TopK's AuxK); pure uses decoder-weighted
        L1; thresholded penalises L0 of its hard zero, whose straight-through gradient reaches the gate."""
        x = self.check_input(x)
        x_in, normalization = self.prepare(x)
        encoded = self._encode(x_in)
        x_hat_in = self.decode_latents(encoded.latents)
        x_hat = self.restore(x_hat_in, normalization)
        output = SAEOutput(x_hat, encoded.latents, encoded.pre_acts)
        mse = reconstruction_mse(x, x_hat)
        zero = mse.new_zeros(())
        sparsity, auxk = zero, zero
        cfg = self.cfg
        if cfg.mode == "thresholded":
            assert encoded.gate_magnitude is not None
            band = self.gate_band()
            sparsity = step(encoded.gate_magnitude, band, cfg.jumprelu_bandwidth, pass_x_grad=True).sum(-1).mean()
        elif cfg.mode == "pure" or cfg.family == "relu":
            sparsity = decoder_weighted_l1(encoded.latents.values, self.W_dec)
        elif cfg.family == "jumprelu":
            sparsity = step(encoded.pre_acts, self.threshold, cfg.jumprelu_bandwidth).sum(-1).mean()
        else:
            auxk = dead_latent_auxk(self.centered(x_in), x_in.float() - x_hat_in.float(), self, dead_mask)
        total = mse + sparsity_coefficient * sparsity + auxk_coefficient * auxk
        return TrainingLoss(total, mse, sparsity, auxk, output)


def gate_l2(codes: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """The gate-fitting objective of calibration and of `GateCalibration`: `sum_i w_i (z_i - g_i)^2`, averaged
    over tokens, for the RSAE's codes `z = RSAE.gate_codes(h)` and the teacher's `g` [N, d_sae], with
    `w_i = ||W_dec_i||^2` [d_sae] (float32 math).

    Why this definition: with decoder-row weights the loss is the diagonal part of the reconstruction error
    the gate mismatch causes, so it measures what a mismatch costs downstream. It compares codes under the
    mode's support rule because the decoder only ever sees those: in masked mode an entry off the teacher's
    support is an exact zero whatever the rational does there, so fitting it would spend the gate on values
    never used. It leaves out the thresholded mode's zero band because that band is a detached hard cut,
    set after the fit (calibration matches L0 with it): counted in the loss, every entry it cuts would add
    an error that no gate parameter gets a gradient from, and the band moves with C_out, so a comparison of
    two fits would mix the fit with the band.
    """
    return ((codes.float() - target.float()).pow(2) * weight.float()).sum(-1).mean()
