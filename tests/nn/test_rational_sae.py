"""RSAE: built from each teacher family, in each gate mode."""

from __future__ import annotations

import pytest
import torch

from rsae.nn.config import FAMILIES, GATE_MODES
from rsae.nn.rational_sae import RSAE, topk_threshold
from rsae.rational.remez import fit_gate

from helpers import D_IN, D_SAE, K, make_sae, sparse_dictionary_data, train

DATA = sparse_dictionary_data(n_tokens=1024)


def trained_teacher(family: str) -> torch.nn.Module:
    teacher = make_sae(family)
    coefficient = {"relu": 1e-3, "jumprelu": 1e-3, "topk": 0.0}[family]
    train(teacher, DATA, steps=60, sparsity_coefficient=coefficient)
    return teacher


TEACHERS = {family: trained_teacher(family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_init_reproduces_the_teacher(family: str) -> None:
    teacher = TEACHERS[family]
    model = RSAE.from_teacher(teacher)
    assert model.cfg.mode == "masked" and model.cfg.degree == {"relu": (3, 2)}.get(family, (9, 8))
    with torch.no_grad():
        ours, theirs = model.run(DATA), teacher.run(DATA)
    assert torch.equal(ours.latents.dense(D_SAE) != 0, theirs.latents.dense(D_SAE) != 0)
    torch.testing.assert_close(ours.latents.dense(D_SAE), theirs.latents.dense(D_SAE), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.x_hat, theirs.x_hat, rtol=1e-5, atol=1e-5)
    assert ours.latents.l0() == theirs.latents.l0()


@pytest.mark.parametrize("family", ["relu", "jumprelu"])
def test_pure_mode_imitates_the_teacher_within_the_fit_error(family: str) -> None:
    teacher = TEACHERS[family]
    fit = fit_gate(family, (7, 6), grid_points=801)
    model = RSAE.from_teacher(teacher, degree=(7, 6), mode="pure", fit=fit)
    with torch.no_grad():
        ours = model.run(DATA).latents.values
        theirs = teacher.run(DATA).latents.dense(D_SAE)
        pre = teacher.run(DATA).pre_acts
    # The fit is within max_error on [-1, 1] in canonical units: scale back by each latent's C_out,
    # and leave out the jump's gap, where the fit is only bounded.
    scale = model.gate.scale_out.detach()
    threshold = getattr(teacher, "threshold", torch.zeros(D_SAE)).detach()
    # Latents whose threshold sits at or near 0 get a floored scale (rsae.nn.thresholds.threshold_scales): not exact.
    mapped = (scale * fit.threshold - threshold).abs() < 1e-6 if family == "jumprelu" else torch.ones(D_SAE, dtype=bool)
    assert mapped.float().mean() > 0.5
    inside = (pre.abs() <= scale) & ((pre - threshold).abs() > fit.gap * scale) & mapped
    error = (ours - theirs).abs() / scale
    assert error[inside].max() <= fit.max_error * 1.01 + 1e-5
    # A rational is never exactly zero: exact L0 counts every latent, the tolerance L0 fewer.
    latents = model.run(DATA).latents
    assert latents.l0() > latents.l0(tolerance=0.5 * float(scale.min()))


def test_topk_pure_and_thresholded_need_activations_for_a_threshold() -> None:
    with pytest.raises(ValueError, match="pass activations"):
        RSAE.from_teacher(TEACHERS["topk"], mode="pure")
    model = RSAE.from_teacher(TEACHERS["topk"], mode="thresholded", activations=DATA)
    tau = topk_threshold(TEACHERS["topk"], DATA)
    torch.testing.assert_close(model.gate.scale_in.detach(), torch.full((D_SAE,), float(tau) / 0.5))


@pytest.mark.parametrize("family", FAMILIES)
def test_thresholded_mode_has_exact_zeros_and_tracks_the_teacher(family: str) -> None:
    teacher = TEACHERS[family]
    model = RSAE.from_teacher(teacher, mode="thresholded", activations=DATA)
    with torch.no_grad():
        latents = model.run(DATA).latents
        theirs = teacher.run(DATA).latents.dense(D_SAE)
    ours = latents.values
    assert (ours == 0).float().mean() > 0.5
    assert latents.l0() == latents.l0(tolerance=0.0)
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0)
    assert cosine > 0.9


@pytest.mark.parametrize("mode", GATE_MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_training_reaches_every_gate_parameter_and_lowers_the_loss(family: str, mode: str) -> None:
    model = RSAE.from_teacher(TEACHERS[family], degree=(5, 4), mode=mode, activations=DATA)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:8] = True
    loss = model.training_loss(DATA[:256], sparsity_coefficient=1e-3, dead_mask=dead)
    loss.total.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    for name, parameter in model.gate.named_parameters():
        assert parameter.grad.abs().sum() > 0, name
    if family == "topk" and mode == "masked":
        assert loss.auxk > 0
    before = model.training_loss(DATA).mse.item()
    train(model, DATA, steps=40, lr=1e-4, sparsity_coefficient=1e-4)
    assert model.training_loss(DATA).mse.item() < before


def test_masked_topk_fast_path_matches_the_dense_reference() -> None:
    model = RSAE.from_teacher(TEACHERS["topk"], degree=(5, 4))
    with torch.no_grad():
        model.gate.numerator.add_(0.05 * torch.randn_like(model.gate.numerator))
    x = DATA[:64]
    fast = model.run(x)
    dense = model.activate(model.pre_activations(x))
    torch.testing.assert_close(fast.latents.dense(D_SAE), dense.dense(D_SAE))
    grads = []
    for latents in (fast.latents, model.activate(model.pre_activations(x))):
        model.zero_grad()
        model.decode_latents(latents).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_masked_topk_keeps_zeros_where_fewer_than_k_latents_fire() -> None:
    """A selected value of 0 (fewer than k positive pre-activations) stays an exact zero even when the
    rational is not 0 at 0."""
    teacher = TEACHERS["topk"]
    model = RSAE.from_teacher(teacher, degree=(5, 4))
    x = DATA[:64]
    with torch.no_grad():
        # about k / 2 latents fire per token
        model.b_enc.sub_(model.pre_activations(x).flatten().quantile(1 - K / (2 * D_SAE)))
        model.gate.numerator[0].fill_(0.3)  # r(0) != 0
    latents = model.run(x).latents
    firing = (model.pre_activations(x) > 0).sum(-1)
    assert (firing < K).any() and firing.sum() > 0
    assert torch.equal((latents.values != 0).sum(-1), firing.clamp(max=K))


@pytest.mark.parametrize("sharing", ["group", "feature"])
def test_grouped_and_per_latent_coefficients(sharing: str) -> None:
    model = RSAE.from_teacher(TEACHERS["relu"], coefficient_sharing=sharing, n_coefficient_groups=4)
    expected_sets = {"group": 4, "feature": D_SAE}[sharing]
    assert model.gate.numerator.shape[0] == expected_sets
    torch.testing.assert_close(model(DATA[:32]), TEACHERS["relu"](DATA[:32]), rtol=1e-5, atol=1e-5)


def test_saebench_contract_and_bad_input() -> None:
    model = RSAE.from_teacher(TEACHERS["jumprelu"])
    assert model.W_enc.shape == (D_IN, D_SAE) and model.W_dec.shape == (D_SAE, D_IN)
    assert model.b_enc.shape == (D_SAE,) and model.b_dec.shape == (D_IN,)
    assert model.cfg.hook_layer == 3 and model.cfg.model_name == "synthetic"
    assert model.device.type == "cpu" and model.dtype == torch.float32
    x = DATA[:10].reshape(2, 5, D_IN)
    assert model.encode(x).shape == (2, 5, D_SAE)
    assert model.forward(x).shape == x.shape
    torch.testing.assert_close(model.decode(model.encode(x)), model(x))
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        model(torch.randn(4, D_IN + 1))
    with pytest.raises(ValueError, match="mode="):
        RSAE.from_teacher(TEACHERS["relu"], mode="soft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="baseline SAE"):
        RSAE.from_teacher(model)


def test_bf16_autocast_keeps_the_gate_in_fp32() -> None:
    model = RSAE.from_teacher(TEACHERS["topk"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_loss(DATA[:128])
    loss.total.backward()
    assert torch.isfinite(loss.total) and model.gate.numerator.grad is not None
    assert K == model.cfg.k
