"""Calibration on real pre-activations: a tiny TL-native transformer's residual stream, teachers trained on it,
acceptance figures on held-out rows (see benchmarks/calibration_acceptance.py for the full table)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from rsae.nn.rational_sae import RSAE
from rsae.nn.sae import SparseAutoencoder
from rsae.nn.thresholds import topk_threshold
from rsae.train.calibration import calibrate, evaluate_against_teacher

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from calibration_acceptance import tiny_model_activations, train_teacher  # noqa: E402

D_SAE, K, TEACHER_STEPS = 128, 8, 500


pytestmark = pytest.mark.usefixtures("small_cpu_settings")


@pytest.fixture(scope="module")
def stream() -> tuple[Tensor, Tensor, Tensor]:
    """(train, calibration, held-out) rows of blocks.1.hook_resid_post of a tiny random transformer."""
    x = tiny_model_activations(n_sequences=192)
    n = len(x)
    return x[: n // 2], x[n // 2 : 3 * n // 4], x[3 * n // 4 :]


@pytest.fixture(scope="module")
def teachers(stream: tuple[Tensor, Tensor, Tensor]) -> dict[str, SparseAutoencoder]:
    families = ("relu", "jumprelu", "topk")
    return {family: train_teacher(family, stream[0], D_SAE, K, TEACHER_STEPS) for family in families}


def _build(teacher: SparseAutoencoder, mode: str, calib: Tensor) -> RSAE:
    activations = calib if teacher.cfg.family == "topk" and mode != "masked" else None
    return RSAE.from_teacher(teacher, mode=mode, activations=activations)


@pytest.mark.parametrize("family", ["relu", "jumprelu", "topk"])
def test_masked_calibration_reproduces_the_teacher_exactly(family, teachers, stream) -> None:
    teacher, (_, calib, held_out) = teachers[family], stream
    model = _build(teacher, "masked", calib)
    report = calibrate(model, teacher, calib, quantile=0.9)
    figures = evaluate_against_teacher(model, teacher, held_out)
    assert abs(figures["mse_rel_diff"]) < 1e-5
    assert figures["cosine"] > 0.99999
    assert figures["l0_exact"] == figures["l0_teacher"]
    assert report.refine_steps == 0 and report.gate_l2_after < 1e-10
    # The scale is the 0.9 order statistic of each live latent's active pre-activations.
    with torch.no_grad():
        out = teacher.run(calib)
        active = out.latents.dense(D_SAE) != 0
    latent = int(active.sum(0).argmax())
    values = out.pre_acts[active[:, latent], latent].sort(descending=True).values
    expected = values[int(0.1 * len(values))]
    assert torch.allclose(model.gate.scale_in[latent], expected)
    assert torch.equal(model.gate.scale_in, model.gate.scale_out)


@pytest.mark.parametrize("family", ["relu", "jumprelu"])
def test_thresholded_calibration_meets_the_acceptance_targets_on_held_out_rows(family, teachers, stream) -> None:
    teacher, (_, calib, held_out) = teachers[family], stream
    model = _build(teacher, "thresholded", calib)
    report = calibrate(model, teacher, calib)
    figures = evaluate_against_teacher(model, teacher, held_out)
    assert report.gate_l2_after < 0.1 * report.gate_l2_before
    assert abs(figures["mse_rel_diff"]) <= 0.01, figures
    assert figures["cosine"] >= 0.99
    assert abs(figures["l0_exact_rel_diff"]) <= 0.02, figures
    assert model.cfg.threshold_eps == report.threshold_eps


def test_pure_mode_is_close_but_never_sparse(teachers, stream) -> None:
    teacher, (_, calib, held_out) = teachers["jumprelu"], stream
    model = _build(teacher, "pure", calib)
    report = calibrate(model, teacher, calib, refine_steps=500)
    figures = evaluate_against_teacher(model, teacher, held_out)
    assert report.gate_l2_after < 0.1 * report.gate_l2_before
    assert figures["cosine"] >= 0.99
    assert abs(figures["mse_rel_diff"]) <= 0.03
    assert figures["l0_exact"] > 4 * figures["l0_teacher"]  # a rational is never exactly 0


def test_topk_pointwise_modes_improve_but_cannot_reach_the_targets(teachers, stream) -> None:
    # TopK selects per token; no pointwise gate reproduces it. Even the best per-latent hard threshold
    # reaches only cosine ~0.93 on this stream (benchmarks/results/calibration_acceptance.md), so this
    # tests what calibration achieves rather than the 0.99 target.
    teacher, (_, calib, held_out) = teachers["topk"], stream
    model = _build(teacher, "thresholded", calib)
    before = evaluate_against_teacher(model, teacher, held_out)
    report = calibrate(model, teacher, calib, refine_steps=400)
    after = evaluate_against_teacher(model, teacher, held_out)
    assert report.topk_threshold == pytest.approx(float(topk_threshold(teacher, calib)), rel=1e-5)
    assert report.gate_l2_after < report.gate_l2_before
    assert after["cosine"] > max(before["cosine"], 0.9)
    assert abs(after["l0_exact_rel_diff"]) < 0.1


@pytest.mark.parametrize("mode", ["masked", "thresholded"])
def test_dead_latents_get_the_documented_initialisation(mode, teachers, stream) -> None:
    teacher, (_, calib, _) = teachers["relu"], stream
    dead_teacher = type(teacher)(teacher.cfg)
    dead_teacher.load_state_dict(teacher.state_dict())
    dead = torch.arange(0, D_SAE, 16)
    with torch.no_grad():
        dead_teacher.b_enc[dead] = -1e4  # never fires
    model = _build(dead_teacher, mode, calib)
    report = calibrate(model, dead_teacher, calib, refine_steps=50)
    assert report.dead_latents == len(dead)
    gate = model.gate
    for p in gate.parameters():
        assert torch.isfinite(p).all()
    live = torch.ones(D_SAE, dtype=torch.bool)
    live[dead] = False
    if mode == "masked":
        # Median scale of the live latents, shift 0.
        assert torch.allclose(gate.scale_in[dead], gate.scale_in[live].median().expand(len(dead)))
    else:
        # The refine leaves dead latents' per-latent parameters at that initialisation.
        fresh = _build(dead_teacher, mode, calib)
        calibrate(fresh, dead_teacher, calib, refine_steps=0)
        assert torch.equal(gate.scale_in[dead], fresh.gate.scale_in[dead])
        assert torch.equal(gate.shift[dead], fresh.gate.shift[dead])
    assert torch.equal(gate.shift[dead], torch.zeros(len(dead)))


def test_a_stream_of_batches_equals_one_tensor(teachers, stream) -> None:
    teacher, (_, calib, _) = teachers["jumprelu"], stream
    whole, chunks = _build(teacher, "pure", calib), _build(teacher, "pure", calib)
    calibrate(whole, teacher, calib, batch_size=500, refine_steps=20, refine_tokens=1000)
    report = calibrate(chunks, teacher, iter(list(calib.split(500))), refine_steps=20, refine_tokens=1000)
    assert report.n_tokens == len(calib) and report.refine_tokens == 1000
    for a, b in zip(whole.gate.parameters(), chunks.gate.parameters(), strict=True):
        assert torch.equal(a, b)
    assert report.refine_kept and report.gate_l2_after < report.gate_l2_before


def test_max_tokens_and_tuple_batches(teachers, stream) -> None:
    teacher, (_, calib, _) = teachers["relu"], stream
    model = _build(teacher, "masked", calib)
    report = calibrate(model, teacher, [(b,) for b in calib.split(300)], max_tokens=1000)
    assert report.n_tokens == 1000


def test_mismatched_teacher_and_empty_stream_are_refused(teachers, stream) -> None:
    _, calib, _ = stream
    model = _build(teachers["relu"], "masked", calib)
    with pytest.raises(ValueError, match="family"):
        calibrate(model, teachers["jumprelu"], calib)
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, teachers["relu"], [])
    with pytest.raises(ValueError, match="quantile"):
        calibrate(model, teachers["relu"], calib, quantile=1.0)


def test_evaluate_conventions(teachers, stream) -> None:
    teacher, (_, _, held_out) = teachers["topk"], stream
    same = evaluate_against_teacher(teacher, teacher, held_out)
    assert same["mse_rel_diff"] == 0 and same["cosine"] == pytest.approx(1.0) and same["l0_teacher"] == K
    # A token whose codes are all zero in both models counts as cosine 1.
    silent = type(teacher)(teacher.cfg)
    silent.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        silent.b_enc.fill_(-1e4)
    both_zero = evaluate_against_teacher(silent, silent, held_out[:10])
    assert both_zero["cosine"] == 1.0 and both_zero["l0_exact_rel_diff"] == 0.0
    one_zero = evaluate_against_teacher(silent, teacher, held_out[:10])
    assert one_zero["cosine"] == 0.0



@pytest.mark.parametrize("mode", ["masked", "pure", "thresholded"])
def test_calibration_and_gate_calibration_optimise_the_same_objective(mode, teachers, stream, tmp_path) -> None:
    """Calibration's gate L2 and `GateCalibration`'s loss are one objective (`rsae.nn.rational_sae.gate_l2` of
    `RSAE.gate_codes`): equal on the same rows, in every mode, and in thresholded mode not the codes after the
    zero band (which a re-implementation through `activate` would measure)."""
    import rsae
    from rsae.train.calibration import _gate_l2, _refine_data
    from rsae.train.modules import GateCalibration

    teacher, (_, calib, held_out) = teachers["relu"], stream
    model = _build(teacher, mode, calib)
    calibrate(model, teacher, calib, refine_steps=20)
    if mode == "thresholded":
        model.cfg.threshold_eps = 0.05  # a band that cuts entries the gate alone would keep
    rsae.save(teacher, tmp_path / "teacher")
    module = GateCalibration(teacher=str(tmp_path / "teacher"), mode=mode)
    module.sae.load_state_dict(model.state_dict())
    module.sae.cfg.threshold_eps = model.cfg.threshold_eps
    h, target, weight = _refine_data(teacher, held_out)
    expected = _gate_l2(module.sae, h, target, weight)
    _, logs = module.loss(held_out)
    assert float(logs["relative_loss"]) == pytest.approx(expected, rel=1e-5)
    if mode == "thresholded":
        banded = module.sae.activate(h).dense(module.sae.cfg.d_sae)
        assert not torch.equal(banded, module.sae.gate_codes(h))  # the band is active, and left out of both
