"""k-sparse codes: a TopK encoder and a decoder whose backward passes touch only the selected latents.

In the spirit of EleutherAI sparsify's fused encoder, a training step costs one dense matmul (the
encoder forward, which top-k needs in full) instead of the six of dense autograd. Gradients that
scatter into weight rows are sparse-dense products (`torch.sparse.mm` of a COO pattern), which on CPU
beat `index_add_` of materialised `[N, k, d]` outer products for the same result
(`benchmarks/bench_topk.py`). Used by the TopK SAE and by an RSAE on a TopK teacher.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from rsae.nn import topk_cpu


def topk_relu(pre_acts: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The TopK gate on dense pre-activations [N, d]: (values [N, k] >= 0, indices [N, k]).

    Top-k then ReLU keeps the same values as ReLU then top-k and spares a pass over [N, d]; the
    two differ only in which latents a token with fewer than k positive pre-activations lists at
    value 0. Plain autograd: this is the dense reference path (and the RSAE's masked mode). On CPU the
    selection is `rsae.nn.topk_cpu`'s kernel where it applies (the same sets as `torch.topk`, in another
    order; the values gathered again where autograd needs them), else `torch.topk`."""
    if topk_cpu.applies(pre_acts, k):
        values, indices = topk_cpu.topk(pre_acts, k)
        if pre_acts.requires_grad and torch.is_grad_enabled():
            values = pre_acts.gather(-1, indices)
    else:
        values, indices = pre_acts.topk(k, dim=-1, sorted=False)
    return values.relu(), indices


def _scatter_outer(indices: Tensor, coefficients: Tensor, rows: Tensor, n_latents: int) -> Tensor:
    """`out[i] = sum over (n, j) with indices[n, j] == i of coefficients[n, j] * rows[n]`, [n_latents, d].

    The weight gradient of a k-sparse code, computed as a sparse [n_latents, N] x dense [N, d]
    product so that no [N, k, d] tensor is materialised."""
    n_tokens, k = indices.shape
    tokens = torch.arange(n_tokens, device=indices.device).repeat_interleave(k)
    pattern = torch.sparse_coo_tensor(
        torch.stack([indices.flatten(), tokens]), coefficients.flatten().to(rows.dtype), (n_latents, n_tokens),
        is_coalesced=False, check_invariants=False,
    )
    return torch.sparse.mm(pattern, rows)


def _gathered_dots(rows: Tensor, weight: Tensor, indices: Tensor) -> Tensor:
    """`out[n, j] = rows[n] . weight[indices[n, j]]`, [N, k], as a sampled dense-dense matmul."""
    # sampled_addmm takes only float32/float64 on CPU: low-precision storage computes in float32.
    compute_dtype = torch.promote_types(weight.dtype, torch.float32)
    rows, weight_t = rows.to(compute_dtype), weight.T.to(compute_dtype)
    n_tokens, k = indices.shape
    # CSR needs column indices sorted within each row; sort, sample, then restore the caller's order.
    sorted_indices, order = indices.sort(dim=-1)
    row_starts = torch.arange(0, n_tokens * k + 1, k, device=indices.device)
    with warnings.catch_warnings():
        # sampled_addmm only takes CSR, whose "beta state" notice says nothing about these results.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)
        pattern = torch.sparse_csr_tensor(
            row_starts, sorted_indices.flatten(), rows.new_zeros(n_tokens * k), (n_tokens, weight.shape[0]),
            check_invariants=False,
        )
    dots = torch.sparse.sampled_addmm(pattern, rows, weight_t).values().view(n_tokens, k)
    return torch.empty_like(dots).scatter_(-1, order, dots).to(weight.dtype)


class _TopKEncoder(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x_centered: Tensor, W_enc: Tensor, b_enc: Tensor, k: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        pre_acts = torch.addmm(b_enc, x_centered, W_enc)
        values, indices = topk_relu(pre_acts, k)
        ctx.save_for_backward(x_centered, W_enc, values, indices)
        ctx.mark_non_differentiable(indices, pre_acts)
        # Otherwise autograd hands backward a zero [N, d_sae] gradient for pre_acts on every step.
        ctx.set_materialize_grads(False)
        return values, indices, pre_acts

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_values: Tensor, _grad_indices: Tensor | None, _grad_pre_acts: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x_centered, W_enc, values, indices = ctx.saved_tensors
        if grad_values is None:
            return None, None, None, None
        # The ReLU's derivative, then float math whatever the forward's autocast dtype was.
        grad_h = torch.where(values > 0, grad_values, 0).to(W_enc.dtype)
        grad_x = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc.T.contiguous(), per_sample_weights=grad_h, mode="sum")
            grad_x = grad_x.to(x_centered.dtype)
        if ctx.needs_input_grad[1]:
            grad_W_enc = _scatter_outer(indices, grad_h, x_centered.to(W_enc.dtype), W_enc.shape[1]).T
        if ctx.needs_input_grad[2]:
            grad_b_enc = W_enc.new_zeros(W_enc.shape[1]).index_add_(0, indices.flatten(), grad_h.flatten())
        return grad_x, grad_W_enc, grad_b_enc, None


class _SparseDecoder(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        values, indices, W_dec = ctx.saved_tensors
        grad_out = grad_out.to(W_dec.dtype)
        grad_values = _gathered_dots(grad_out, W_dec, indices) if ctx.needs_input_grad[0] else None
        grad_W_dec = _scatter_outer(indices, values, grad_out, W_dec.shape[0]) if ctx.needs_input_grad[2] else None
        return grad_values, None, grad_W_dec


def topk_encode(x_centered: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """TopK encoder with a k-sparse backward: (values [N, k] >= 0, indices [N, k], pre_acts [N, d_sae]).

    `x_centered` is `x - b_dec`, [N, d_in]: the caller subtracts the decoder bias with ordinary
    autograd, so `b_dec` gets its encoder-side gradient (minus the summed gradient of `x_centered`).
    `values` carry gradient to `x_centered`, `W_enc` and `b_enc`, touching only the selected
    latents; `indices` and `pre_acts` carry none (`pre_acts` are for metrics and AuxK's selection).
    Under autocast the encoder matmul runs in the autocast dtype and the backward in the weights'."""
    if not 0 < k <= W_enc.shape[1]:
        raise ValueError(f"k={k} must be in [1, d_sae={W_enc.shape[1]}]")
    return _TopKEncoder.apply(x_centered, W_enc, b_enc, k)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """`sum_j values[n, j] * W_dec[indices[n, j]]`, [N, d_in], without b_dec, with a k-sparse backward."""
    return _SparseDecoder.apply(values.to(W_dec.dtype), indices, W_dec)
