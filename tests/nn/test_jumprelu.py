"""JumpReLU SAE: the straight-through estimators against their formulas, and L0 control."""

from __future__ import annotations

import pytest
import torch

from rsae.nn.jumprelu import jumprelu, rectangle, step, threshold_mask

from helpers import make_sae, sparse_dictionary_data, train

BANDWIDTH = 0.1
# Rows are tokens, columns features; with theta = [0.5, 0.2] the points sit below, inside and
# above the kernel window (theta +- bandwidth / 2).
H = torch.tensor([[0.44, 0.10], [0.48, 0.22], [0.53, 0.26], [0.70, -1.0]], dtype=torch.float64)
THETA = torch.tensor([0.5, 0.2], dtype=torch.float64)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_(True)


def test_rectangle_kernel() -> None:
    torch.testing.assert_close(rectangle(torch.tensor([-0.6, -0.4, 0.0, 0.49, 0.5])), torch.tensor([0.0, 1, 1, 1, 0]))


def test_jumprelu_forward_and_pseudo_gradients() -> None:
    h, theta = leaf(H), leaf(THETA)
    grad_z = torch.rand_like(H)
    z = jumprelu(h, theta, BANDWIDTH)
    torch.testing.assert_close(z, torch.where(H > THETA, H, 0.0))
    z.backward(grad_z)
    torch.testing.assert_close(h.grad, grad_z * (H > THETA))
    window = rectangle((H - THETA) / BANDWIDTH)
    torch.testing.assert_close(theta.grad, (-(THETA / BANDWIDTH) * window * grad_z).sum(0))
    assert window.sum() == 3  # not vacuous: three points inside the window


@pytest.mark.parametrize("pass_x_grad", [False, True])
def test_step_forward_and_pseudo_gradients(pass_x_grad: bool) -> None:
    x, theta = leaf(H), leaf(THETA)
    grad_out = torch.rand_like(H)
    out = step(x, theta, BANDWIDTH, pass_x_grad=pass_x_grad)
    torch.testing.assert_close(out, (H > THETA).double())
    out.backward(grad_out)
    delta = rectangle((H - THETA) / BANDWIDTH) / BANDWIDTH * grad_out
    torch.testing.assert_close(theta.grad, -delta.sum(0))
    if pass_x_grad:
        torch.testing.assert_close(x.grad, delta)
    else:
        assert x.grad is None


def test_threshold_mask_is_the_product_with_the_step() -> None:
    """threshold_mask(values, h, theta) == values * step(h, theta): value, and gradients to values and theta."""
    values, theta = leaf(torch.randn_like(H)), leaf(THETA)
    grad_z = torch.rand_like(H)
    z = threshold_mask(values, H, theta, BANDWIDTH)
    torch.testing.assert_close(z, torch.where(H > THETA, values.detach(), 0.0))
    got = torch.autograd.grad(z, (values, theta), grad_z)
    want = torch.autograd.grad(values * step(H, theta, BANDWIDTH), (values, theta), grad_z)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert (got[1] != 0).all()  # every feature has a point in the window


def test_scalar_threshold_broadcasts_and_reduces() -> None:
    theta = leaf(torch.tensor(0.5, dtype=torch.float64))
    step(H, theta, BANDWIDTH).sum().backward()
    torch.testing.assert_close(theta.grad, -(rectangle((H - 0.5) / BANDWIDTH) / BANDWIDTH).sum())


def test_negative_threshold_acts_as_zero_and_keeps_its_gradient() -> None:
    theta = leaf(torch.tensor([-0.3, 0.2], dtype=torch.float64))
    h = torch.tensor([[0.01, 0.1], [-0.5, 0.3]], dtype=torch.float64)
    expected = torch.tensor([[0.01, 0.0], [0.0, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(jumprelu(h, theta, BANDWIDTH), expected)
    step(h, theta, BANDWIDTH).sum().backward()
    # The L0 pseudo-gradient reaches the raw (negative) threshold, so Adam can push it back up.
    assert theta.grad[0] == -1 / BANDWIDTH


def test_threshold_is_a_raw_parameter_initialised_from_config() -> None:
    model = make_sae("jumprelu", jumprelu_init_threshold=0.07)
    assert "threshold" in dict(model.named_parameters())
    torch.testing.assert_close(model.threshold.detach(), torch.full((model.cfg.d_sae,), 0.07))


def test_training_loss_counts_l0_with_the_step() -> None:
    model = make_sae("jumprelu")
    loss = model.training_loss(sparse_dictionary_data(64), sparsity_coefficient=0.5)
    torch.testing.assert_close(loss.sparsity, loss.output.latents.l0())
    torch.testing.assert_close(loss.total, loss.mse + 0.5 * loss.sparsity)


def test_l0_falls_when_its_coefficient_rises() -> None:
    x = sparse_dictionary_data()
    l0 = {}
    for coefficient in (0.0, 0.1):
        model = make_sae("jumprelu")
        train(model, x, steps=200, sparsity_coefficient=coefficient)
        with torch.no_grad():
            l0[coefficient] = float(model.run(x).latents.l0())
    assert l0[0.1] < 0.5 * l0[0.0], l0
