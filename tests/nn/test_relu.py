"""ReLU SAE: the gate and the decoder-weighted L1 penalty."""

from __future__ import annotations

import torch

from rsae.nn.relu import decoder_weighted_l1

from helpers import make_sae, sparse_dictionary_data


def test_gate_is_relu_with_dense_codes() -> None:
    model = make_sae("relu")
    output = model.run(sparse_dictionary_data(16))
    assert output.latents.indices is None
    torch.testing.assert_close(output.latents.values, output.pre_acts.clamp(min=0))


def test_l1_is_weighted_by_decoder_row_norms() -> None:
    values = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 3.0]], requires_grad=True)
    W_dec = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    norms = torch.tensor([5.0, 1.0, 2.0])
    penalty = decoder_weighted_l1(values, W_dec)
    torch.testing.assert_close(penalty, torch.tensor(((1 * 5 + 2 * 1) + (0.5 * 5 + 3 * 2)) / 2))
    penalty.backward()
    torch.testing.assert_close(values.grad, values.detach().sign() * norms / 2)
    # d/dW_i of ||W_i|| sum_n |z_ni| / N is the unit row times the mean |z_i|.
    mean_abs = values.detach().abs().mean(0)
    torch.testing.assert_close(W_dec.grad, mean_abs[:, None] * W_dec.detach() / norms[:, None])


def test_training_loss_adds_the_weighted_penalty() -> None:
    model = make_sae("relu")
    with torch.no_grad():
        model.W_dec.mul_(torch.linspace(0.5, 2.0, model.cfg.d_sae)[:, None])
    loss = model.training_loss(sparse_dictionary_data(32), sparsity_coefficient=0.25)
    torch.testing.assert_close(loss.sparsity, decoder_weighted_l1(loss.output.latents.values, model.W_dec))
    torch.testing.assert_close(loss.total, loss.mse + 0.25 * loss.sparsity)
    assert loss.auxk == 0
