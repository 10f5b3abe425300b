"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope): `z = h * H(h - theta)` with a learned
per-feature threshold, trained with MSE plus L0 through straight-through estimators.

The step `H` has zero derivative almost everywhere, so both estimators replace the Dirac delta at
the jump by a rectangle kernel `K` of width `bandwidth` (in activation units): gradients reach the
threshold only from tokens whose pre-activation lies within `bandwidth / 2` of it.

A threshold is read as `max(theta, 0)` in the forward pass, while its pseudo-gradient goes to the
raw `theta` unchanged. An Adam step that overshoots below 0 therefore acts like a ReLU until the
L0 pressure pushes the raw value back up, instead of freezing it where a clamp's zero gradient
would.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from rsae.nn.config import SAEConfig
from rsae.nn.sae import Latents, SAEOutput, SparseAutoencoder


def rectangle(u: Tensor) -> Tensor:
    """The kernel `K(u)`: 1 on (-1/2, 1/2), 0 elsewhere."""
    return (u.abs() < 0.5).to(u.dtype)


def _delta_times(grad: Tensor, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """`grad * K((x - theta) / bandwidth) / bandwidth`: the incoming gradient times the estimate of the
    Dirac delta at the jump. Three passes over [N, F] memory where the formula as written takes seven,
    each a fresh temporary (page faults dominate elementwise ops on CPU)."""
    near = (x - threshold).abs_() < 0.5 * bandwidth
    return torch.where(near, grad, 0.0).div_(bandwidth)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        effective = threshold.clamp(min=0)
        ctx.save_for_backward(h, effective)
        ctx.bandwidth = bandwidth
        ctx.threshold_shape, ctx.threshold_dtype = threshold.shape, threshold.dtype
        return h * (h > effective)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_z: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        h, threshold = ctx.saved_tensors
        grad_h = torch.where(h > threshold, grad_z, 0.0).to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            # theta is constant along the summed dims: scale the sum, not every element.
            delta_sum = _delta_times(grad_z, h, threshold, ctx.bandwidth).sum_to_size(ctx.threshold_shape)
            grad_threshold = (-threshold * delta_sum).to(ctx.threshold_dtype)
        return grad_h, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, threshold: Tensor, bandwidth: float, pass_x_grad: bool) -> Tensor:
        effective = threshold.clamp(min=0)
        ctx.save_for_backward(x, effective)
        ctx.bandwidth, ctx.pass_x_grad = bandwidth, pass_x_grad
        ctx.threshold_shape, ctx.threshold_dtype = threshold.shape, threshold.dtype
        return (x > effective).to(x.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, threshold = ctx.saved_tensors
        wants_x = ctx.pass_x_grad and ctx.needs_input_grad[0]
        if not (wants_x or ctx.needs_input_grad[1]):
            return None, None, None, None
        delta = _delta_times(grad_out, x, threshold, ctx.bandwidth)
        grad_x = delta.to(x.dtype) if wants_x else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            grad_threshold = delta.sum_to_size(ctx.threshold_shape).neg().to(ctx.threshold_dtype)
        return grad_x, grad_threshold, None, None


class _ThresholdMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, values: Tensor, h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        effective = threshold.clamp(min=0)
        ctx.save_for_backward(values, h, effective)
        ctx.bandwidth = bandwidth
        ctx.threshold_shape, ctx.threshold_dtype = threshold.shape, threshold.dtype
        return torch.where(h > effective, values, 0.0)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_z: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        values, h, threshold = ctx.saved_tensors
        grad_values = torch.where(h > threshold, grad_z, 0.0) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[2]:
            delta_sum = _delta_times(grad_z * values, h, threshold, ctx.bandwidth).sum_to_size(ctx.threshold_shape)
            grad_threshold = delta_sum.neg().to(ctx.threshold_dtype)
        return grad_values, None, grad_threshold, None


def jumprelu(h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """`h * H(h - theta)`, `threshold` broadcast against `h` (e.g. [d_sae] against [N, d_sae]).

    Gradient to `h`: `H(h - theta)`. Pseudo-gradient to `theta`: `-(theta / bandwidth) K((h - theta) / bandwidth)`."""
    return _JumpReLU.apply(h, threshold, bandwidth)


def threshold_mask(values: Tensor, h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """`values * H(h - theta)`: JumpReLU's support rule applied to other values (a masked RSAE's phi(h)).

    Gradients as the product with :func:`step` gives them: `H(h - theta)` to `values`, none to `h`, and
    `-(values / bandwidth) K((h - theta) / bandwidth)` to `theta`; but without the float mask and the
    product's two backward passes."""
    return _ThresholdMask.apply(values, h, threshold, bandwidth)


def step(x: Tensor, threshold: Tensor, bandwidth: float, pass_x_grad: bool = False) -> Tensor:
    """`H(x - theta)` (1 where `x > theta`), `threshold` broadcast against `x`.

    Pseudo-gradient to `theta`: `-(1 / bandwidth) K((x - theta) / bandwidth)`. `x` gets no gradient
    unless `pass_x_grad`, then `+(1 / bandwidth) K(...)`: an L0 penalty built on it can then move the
    inputs across the threshold, not only the threshold (the RSAE's 'thresholded' mode needs this)."""
    return _Step.apply(x, threshold, bandwidth, pass_x_grad)


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE with a raw (not log-parametrised) threshold: SAELens' log threshold barely
    moved under Adam, so L0 never fell."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, dtype=self.dtype))

    def activate(self, pre_acts: Tensor) -> Latents:
        return Latents(jumprelu(pre_acts, self.threshold, self.cfg.jumprelu_bandwidth), None)

    def sparsity_penalty(self, output: SAEOutput) -> Tensor:
        """L0 through the straight-through step, so the thresholds learn where to sit."""
        return step(output.pre_acts, self.threshold, self.cfg.jumprelu_bandwidth).float().sum(-1).mean()
