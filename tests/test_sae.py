"""Contract and training tests shared by every baseline family (relu, jumprelu, topk).

`sparse_dictionary_data` and `train` are imported by the per-family test files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from rsae.config import FAMILIES, SAEConfig
from rsae.jumprelu_sae import JumpReLUSAE
from rsae.relu_sae import ReLUSAE
from rsae.sae import SparseAutoencoder, TrainingLoss
from rsae.topk_sae import TopKSAE

D_IN, D_SAE, K = 32, 128, 4
MODEL_CLASSES: dict[str, type[SparseAutoencoder]] = {"relu": ReLUSAE, "jumprelu": JumpReLUSAE, "topk": TopKSAE}


def make_sae(family: str, seed: int = 0, **overrides: object) -> SparseAutoencoder:
    torch.manual_seed(seed)
    fields = {"d_in": D_IN, "d_sae": D_SAE, "architecture": family, "hook_name": "blocks.3.hook_resid_post",
              "model_name": "synthetic", "jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.05}
    if family == "topk":
        fields["k"] = K
    fields.update(overrides)
    return MODEL_CLASSES[family](SAEConfig(**fields))


def sparse_dictionary_data(n_tokens: int = 2048, n_atoms: int = 64, active: int = 3, seed: int = 0) -> Tensor:
    """x = sum of `active` random unit atoms in R^32 with coefficients in [0.5, 1.5], an offset, and noise."""
    gen = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(n_atoms, D_IN, generator=gen), dim=-1)
    chosen = torch.rand(n_tokens, n_atoms, generator=gen).topk(active, dim=-1).indices
    coefficients = torch.zeros(n_tokens, n_atoms).scatter(-1, chosen, torch.rand(n_tokens, active, generator=gen) + 0.5)
    offset = 0.5 * torch.randn(D_IN, generator=gen)
    return coefficients @ atoms + offset + 0.01 * torch.randn(n_tokens, D_IN, generator=gen)


def fraction_of_variance_unexplained(model: SparseAutoencoder, x: Tensor) -> float:
    with torch.no_grad():
        residual = (model(x) - x).pow(2).sum(-1).mean()
    return float(residual / (x - x.mean(0)).pow(2).sum(-1).mean())


def train(model: SparseAutoencoder, x: Tensor, steps: int = 300, batch: int = 256, lr: float = 3e-3,
          **loss_kwargs: object) -> TrainingLoss:
    """Adam on shuffled minibatches; returns the last step's loss."""
    # Subnormal floats turn up in these tiny CPU runs and slow them 10x or more; torch's default is off.
    torch.set_flush_denormal(True)
    try:
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(1)
        batches_per_epoch = len(x) // batch
        for step in range(steps):
            if step % batches_per_epoch == 0:
                order = torch.randperm(len(x), generator=gen)
            rows = order[(step % batches_per_epoch) * batch:][:batch]
            loss = model.training_loss(x[rows], **loss_kwargs)
            optimiser.zero_grad()
            loss.total.backward()
            optimiser.step()
    finally:
        torch.set_flush_denormal(False)
    return loss


@pytest.mark.parametrize("family", FAMILIES)
def test_saebench_contract(family: str) -> None:
    model = make_sae(family)
    x = sparse_dictionary_data(10).reshape(2, 5, D_IN)
    codes = model.encode(x)
    assert codes.shape == (2, 5, D_SAE)
    assert model.decode(codes).shape == x.shape
    torch.testing.assert_close(model.decode(codes), model(x))
    torch.testing.assert_close(codes.reshape(-1, D_SAE), model.run(x).latents.dense(D_SAE))
    assert model.W_enc.shape == (D_IN, D_SAE) and model.W_dec.shape == (D_SAE, D_IN)
    assert model.b_enc.shape == (D_SAE,) and model.b_dec.shape == (D_IN,)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert (model.cfg.d_in, model.cfg.d_sae, model.cfg.hook_name, model.cfg.hook_layer, model.cfg.model_name) == (
        D_IN, D_SAE, "blocks.3.hook_resid_post", 3, "synthetic")


@pytest.mark.parametrize("family", FAMILIES)
def test_run_matches_the_reference_equations(family: str) -> None:
    model = make_sae(family)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.1)
    x = sparse_dictionary_data(64)
    output = model.run(x)
    h = (x - model.b_dec) @ model.W_enc + model.b_enc
    torch.testing.assert_close(output.pre_acts, h)
    torch.testing.assert_close(output.x_hat, output.latents.dense(D_SAE) @ model.W_dec + model.b_dec)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_width_names_the_expected_shape(family: str) -> None:
    model = make_sae(family)
    for call in (model.run, model.encode, model.forward, model.training_loss):
        with pytest.raises(ValueError, match=f"d_in={D_IN}"):
            call(torch.randn(4, D_IN + 1))
    with pytest.raises(ValueError, match=f"d_sae={D_SAE}"):
        model.decode(torch.randn(4, D_SAE - 1))


def test_k_larger_than_d_sae_is_refused() -> None:
    with pytest.raises(ValueError, match="k"):
        SAEConfig(d_in=D_IN, d_sae=8, architecture="topk", k=9)
    with pytest.raises(ValueError, match="topk"):
        TopKSAE(SAEConfig(d_in=D_IN, d_sae=8, architecture="relu"))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_training_step_is_finite(family: str) -> None:
    model = make_sae(family)
    x = sparse_dictionary_data(64)
    dead_mask = torch.arange(D_SAE) % 2 == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_loss(x, sparsity_coefficient=1e-3, dead_mask=dead_mask)
        assert torch.isfinite(model(x)).all() and torch.isfinite(model.encode(x)).all()
    loss.total.backward()
    assert torch.isfinite(loss.total) and torch.isfinite(loss.output.x_hat).all()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == parameter.dtype, name
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("family", FAMILIES)
def test_training_from_scratch_recovers_sparse_structure(family: str) -> None:
    x = sparse_dictionary_data()
    model = make_sae(family)
    before = fraction_of_variance_unexplained(model, x)
    last = train(model, x, sparsity_coefficient=1e-3)
    after = fraction_of_variance_unexplained(model, x)
    assert torch.isfinite(last.total)
    # A wrong gradient (sign, missing term, wrong columns) leaves FVU near or above 1.
    assert after < 0.15 < before, (before, after)
