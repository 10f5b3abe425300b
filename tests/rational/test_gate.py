"""Tests of the RationalGate module: parameters, identity init, coefficient setting, sharing modes,
dense and sparse (TopK) calls, fast path vs reference path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rsae.rational.gate import DENOMINATOR_FLOOR, RationalGate


def randomise(gate: RationalGate, seed: int = 0) -> RationalGate:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gate.numerator.copy_(torch.randn(gate.numerator.shape, generator=gen) * 0.5)
        gate.denominator_raw.copy_(torch.randn(gate.denominator_raw.shape, generator=gen))
        gate.scale_in.copy_(torch.rand(gate.d_sae, generator=gen) + 0.5)
        gate.shift.copy_(torch.randn(gate.d_sae, generator=gen) * 0.1)
        gate.scale_out.copy_(torch.rand(gate.d_sae, generator=gen) + 0.5)
    return gate


def test_state_dict_has_exactly_the_five_parameters():
    gate = RationalGate(10, (3, 2), sharing="group", n_groups=3)
    assert set(gate.state_dict()) == {"numerator", "denominator_raw", "scale_in", "shift", "scale_out"}
    assert gate.numerator.shape == (3, 4) and gate.denominator_raw.shape == (3, 2)
    assert gate.denominator.shape == (3, 2)
    # contiguous blocks: latent i in group i * G // d_sae
    assert gate.group_index.tolist() == [i * 3 // 10 for i in range(10)]
    other = RationalGate(10, (3, 2), sharing="group", n_groups=3)
    other.load_state_dict(randomise(gate).state_dict())
    torch.testing.assert_close(other.numerator, gate.numerator)


def test_extra_repr_and_bad_config():
    text = repr(RationalGate(8, (9, 8), sharing="feature"))
    assert "degree=(9, 8)" in text and "sharing='feature'" in text
    with pytest.raises(ValueError, match="degree"):
        RationalGate(8, (0, 2))
    with pytest.raises(ValueError, match="sharing"):
        RationalGate(8, (3, 2), sharing="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_groups"):
        RationalGate(8, (3, 2), sharing="group", n_groups=9)


@pytest.mark.parametrize("degree,fast", [((3, 2), True), ((9, 8), False), ((12, 11), False), ((2, 0), False)])
def test_identity_init_exact_for_nonnegative_inputs(degree, fast):
    d = 6
    gate = RationalGate(d, degree)
    gate.fast = fast
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.1, 10.0])
    gate.set_identity_(scale)
    h = torch.tensor([0.0, 1e-4, 0.05, 0.3, 0.5, 1.0, 2.0, 7.0, 1e3, 1e6])[:, None].expand(10, d).contiguous()
    out = gate(h)
    # fp32 rounding only
    assert ((out - h).abs() <= 1e-6 * h.abs() + 1e-12).all(), (out - h).abs().max()
    gate.set_identity_(2.5)
    torch.testing.assert_close(gate(h), h, rtol=1e-6, atol=1e-12)
    # denominator coefficients small but alive
    assert (gate.denominator > 0).all() if degree[1] else True


def test_identity_requires_p_at_least_q_plus_one():
    with pytest.raises(ValueError, match="p >= q \\+ 1"):
        RationalGate(4, (3, 3))
    gate = RationalGate(4, (4, 3))
    with pytest.raises(ValueError, match="scale"):
        gate.set_identity_(torch.tensor([1.0, -1.0, 1.0, 1.0]))


def test_set_coefficients_round_trip_and_errors():
    gate = RationalGate(6, (3, 2), sharing="group", n_groups=2)
    num = torch.tensor([[0.1, 1.0, -2.0, 0.5], [0.0, 2.0, 0.0, 0.0]])
    den = torch.tensor([[0.3, 4.0], [1e-3, 25.0]])
    gate.set_coefficients(num, den)
    torch.testing.assert_close(gate.numerator.data, num)
    torch.testing.assert_close(gate.denominator.data, den, rtol=1e-6, atol=1e-9)
    gate.set_coefficients(num[0], torch.tensor([0.0, 1.0]))  # broadcast; exact zero -> floor, finite raw
    assert torch.isfinite(gate.denominator_raw).all()
    torch.testing.assert_close(gate.denominator[:, 0], torch.full((2,), DENOMINATOR_FLOOR), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match=">= 0"):
        gate.set_coefficients(num, -den)
    with pytest.raises(ValueError, match="finite"):
        gate.set_coefficients(num, torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="finite"):
        gate.set_coefficients(torch.tensor([float("inf"), 0, 0, 0]), den)
    with pytest.raises(ValueError, match="numerator must have shape"):
        gate.set_coefficients(torch.zeros(5), den)


def test_input_shape_errors():
    gate = RationalGate(8, (3, 2))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\].*\(4, 7\)"):
        gate(torch.zeros(4, 7))
    with pytest.raises(ValueError, match="same shape"):
        gate(torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        gate(torch.zeros(4, 3), torch.zeros(4, 3))


def grads_of(gate: RationalGate, h: torch.Tensor, index: torch.Tensor | None, weight: torch.Tensor,
             positive_support: bool = False):
    gate.zero_grad(set_to_none=True)
    h = h.detach().clone().requires_grad_()
    out = gate(h, index, positive_support)
    (out * weight).sum().backward()
    return out.detach(), [h.grad] + [p.grad for p in gate.parameters()]


@pytest.mark.parametrize("sharing", ["shared", "group", "feature"])
@pytest.mark.parametrize("sparse,positive_support", [(False, False), (True, False), (False, True), (True, True)])
def test_fast_path_matches_reference_path(sharing, sparse, positive_support):
    d, n, k = 12, 10, 4
    gate = randomise(RationalGate(d, (3, 2), sharing=sharing, n_groups=3), seed=1)
    gen = torch.Generator().manual_seed(2)
    if sparse:
        h = torch.randn(n, k, generator=gen) * 2
        index = torch.stack([torch.randperm(d, generator=gen)[:k] for _ in range(n)])
    else:
        h = torch.randn(n, d, generator=gen) * 2
        index = None
    weight = torch.randn(h.shape, generator=gen)
    gate.fast = True
    out, grads = grads_of(gate, h, index, weight, positive_support)
    gate.fast = False
    out_ref, grads_ref = grads_of(gate, h, index, weight, positive_support)
    if positive_support:
        assert (out[h <= 0] == 0).all() and (out_ref[h <= 0] == 0).all() and (out[h > 0] != 0).any()
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, grads_ref, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(1.0, want.abs().max().item()))
    if sparse:
        # the sparse call equals the dense call at the selected entries
        dense = torch.zeros(n, d).scatter(1, index, h)
        dense_out = gate(dense, positive_support=positive_support)
        torch.testing.assert_close(dense_out.gather(1, index), out_ref, rtol=1e-6, atol=1e-6)


def test_gradients_reach_zero_valued_coefficients():
    gate = RationalGate(5, (4, 3))
    gate.set_coefficients(torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]), torch.zeros(3))
    with torch.no_grad():
        gate.denominator_raw.zero_()  # raw 0: softplus'(0) = 1/2, nothing is dead
    gate.fast = False  # eager is enough here; the compiled path is compared in the test above
    h = torch.linspace(-3, 4.5, 40).reshape(8, 5)
    weight = torch.linspace(1, 2, 40).reshape(8, 5)
    _, grads = grads_of(gate, h, None, weight)
    names = ["h"] + [name for name, _ in gate.named_parameters()]
    for name, g in zip(names, grads, strict=False):
        assert g is not None and torch.isfinite(g).all(), name
        if name in ("numerator", "denominator_raw"):
            assert (g != 0).all(), (name, g)
        else:
            assert (g != 0).any(), name


def test_low_precision_module_io():
    gate = randomise(RationalGate(8, (3, 2)))
    h = (torch.randn(4, 8) * 2).to(torch.bfloat16)
    gate.fast = False
    out = gate(h)
    assert out.dtype == torch.bfloat16
    expected = gate(h.float()).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    h3 = torch.randn(2, 3, 8)
    assert gate(h3).shape == (2, 3, 8)


def test_scale_in_clamped_positive():
    gate = RationalGate(4, (3, 2))
    gate.fast = False
    with torch.no_grad():
        gate.scale_in.fill_(-1.0)
    out = gate(torch.randn(3, 4))
    assert torch.isfinite(out).all()
    assert F.softplus(gate.denominator_raw).ge(0).all()
