"""TopK SAE: the sparse-backward encoder and decoder against dense autograd, L0, and AuxK."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from rsae.nn.sae import reconstruction_mse
from rsae.nn.sparse_codes import sparse_decode, topk_encode, topk_relu
from rsae.nn.topk import auxk_loss

from helpers import D_IN, D_SAE, K, make_sae, sparse_dictionary_data, train


def dense_reference_x_hat(model: torch.nn.Module, x: Tensor) -> Tensor:
    """The plain-autograd TopK SAE: dense pre-acts, top-k, scatter, dense matmul decode."""
    h = (x - model.b_dec) @ model.W_enc + model.b_enc
    values, indices = topk_relu(h, model.cfg.k)
    z = torch.zeros_like(h).scatter(-1, indices, values)
    return z @ model.W_dec + model.b_dec


def gradients(model: torch.nn.Module, x: Tensor, x_hat_fn) -> dict[str, Tensor]:
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    reconstruction_mse(x, x_hat_fn(x)).backward()
    return {"x": x.grad, **{name: p.grad.clone() for name, p in model.named_parameters()}}


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-10), ("float32", 1e-5)])
def test_sparse_backward_matches_dense_autograd(dtype: str, tolerance: float) -> None:
    model = make_sae("topk", dtype=dtype)
    with torch.no_grad():
        model.b_enc.normal_(-1.5, 0.3)  # some tokens get fewer than k positive pre-acts: exercises the ReLU
        model.b_dec.normal_(0, 0.3)
    x = sparse_dictionary_data(96).to(model.dtype)
    fast = gradients(model, x, lambda x: model.run(x).x_hat)
    dense = gradients(model, x, lambda x: dense_reference_x_hat(model, x))
    assert fast.keys() == dense.keys() == {"x", "W_enc", "b_enc", "W_dec", "b_dec"}
    for name in fast:
        torch.testing.assert_close(fast[name], dense[name], atol=tolerance, rtol=tolerance, msg=name)
    assert (model.run(x).latents.values == 0).any()


def test_encode_decode_functions_pass_gradcheck() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(12, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)

    def encode_decode(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> Tensor:
        values, indices, _ = topk_encode(x, W_enc, b_enc, 3)
        return sparse_decode(values, indices, W_dec)

    assert torch.autograd.gradcheck(encode_decode, (x, W_enc, b_enc, W_dec))


def test_topk_encode_returns_gate_and_plain_pre_acts() -> None:
    model = make_sae("topk")
    x_centered = sparse_dictionary_data(32) - model.b_dec
    values, indices, pre_acts = topk_encode(x_centered, model.W_enc, model.b_enc, K)
    torch.testing.assert_close(pre_acts, x_centered @ model.W_enc + model.b_enc)
    assert not pre_acts.requires_grad and values.requires_grad
    assert indices.shape == values.shape == (32, K)
    torch.testing.assert_close(values, pre_acts.gather(-1, indices).clamp(min=0))
    assert (pre_acts.gather(-1, indices).min(-1).values >= pre_acts.topk(K).values[:, -1]).all()
    with pytest.raises(ValueError, match="k=0"):
        topk_encode(x_centered, model.W_enc, model.b_enc, 0)


def test_fast_run_and_dense_activate_agree() -> None:
    model = make_sae("topk")
    x = sparse_dictionary_data(64)
    output = model.run(x)
    assert output.latents.indices is not None and output.latents.values.shape == (64, K)
    torch.testing.assert_close(output.latents.dense(D_SAE), model.activate(output.pre_acts).dense(D_SAE))
    torch.testing.assert_close(output.x_hat, dense_reference_x_hat(model, x))


def test_trained_topk_keeps_exactly_k_latents() -> None:
    x = sparse_dictionary_data()
    model = make_sae("topk")
    train(model, x, steps=100)
    with torch.no_grad():
        assert model.run(x).latents.l0() == K


def test_auxk_is_zero_without_dead_latents() -> None:
    model = make_sae("topk")
    x = sparse_dictionary_data(32)
    for dead_mask in (None, torch.zeros(D_SAE, dtype=torch.bool)):
        loss = model.training_loss(x, dead_mask=dead_mask)
        assert loss.auxk == 0 and loss.total == loss.mse


def test_auxk_trains_only_dead_latents() -> None:
    model = make_sae("topk")
    x = sparse_dictionary_data(64)
    dead_mask = torch.zeros(D_SAE, dtype=torch.bool)
    dead_mask[::4] = True
    loss = model.training_loss(x, dead_mask=dead_mask)
    assert loss.auxk > 0
    torch.testing.assert_close(loss.total, loss.mse + loss.auxk / 32)
    model.zero_grad()
    loss.auxk.backward()
    assert model.W_enc.grad[:, dead_mask].abs().sum() > 0 and model.b_enc.grad[dead_mask].abs().sum() > 0
    assert (model.W_enc.grad[:, ~dead_mask] == 0).all() and (model.W_dec.grad[~dead_mask] == 0).all()


def test_auxk_matches_its_definition() -> None:
    torch.manual_seed(0)
    pre_acts, residual, W_dec = torch.randn(16, D_SAE), torch.randn(16, D_IN), torch.randn(D_SAE, D_IN)
    dead_mask = torch.zeros(D_SAE, dtype=torch.bool)
    dead_mask[:8] = True  # fewer dead latents (8) than the default k_aux (d_in // 2 = 16)
    masked = torch.where(dead_mask, pre_acts, -torch.inf)
    values, indices = masked.topk(8, dim=-1)
    residual_hat = torch.zeros_like(pre_acts).scatter(-1, indices, values.relu()) @ W_dec
    expected = (8 / 16) * (residual_hat - residual).pow(2).sum(-1).mean()
    torch.testing.assert_close(auxk_loss(pre_acts, dead_mask, residual, W_dec), expected)
    torch.testing.assert_close(auxk_loss(pre_acts[:, dead_mask], dead_mask, residual, W_dec), expected)
    # With k_aux = 2 <= 8 dead latents the scale is 1 and only the top two count.
    values, indices = masked.topk(2, dim=-1)
    residual_hat = torch.zeros_like(pre_acts).scatter(-1, indices, values.relu()) @ W_dec
    torch.testing.assert_close(auxk_loss(pre_acts, dead_mask, residual, W_dec, k_aux=2),
                               (residual_hat - residual).pow(2).sum(-1).mean())
    with pytest.raises(ValueError, match="n_dead=8"):
        auxk_loss(pre_acts[:, :5], dead_mask, residual, W_dec)
