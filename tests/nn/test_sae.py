"""Contract and training tests shared by every baseline family (relu, jumprelu, topk).

"""

from __future__ import annotations

import pytest
import torch

from rsae.nn.config import FAMILIES, SAEConfig
from rsae.nn.sae import Latents, reconstruction_mse
from rsae.nn.topk import TopKSAE

from helpers import D_IN, D_SAE, fraction_of_variance_unexplained, make_sae, sparse_dictionary_data, train


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


def test_latents_dense_and_l0() -> None:
    sparse = Latents(torch.tensor([[0.5, 0.0], [2.0, 1e-7]]), torch.tensor([[3, 1], [0, 2]]))
    torch.testing.assert_close(sparse.dense(4), torch.tensor([[0.0, 0.0, 0.0, 0.5], [2.0, 0.0, 1e-7, 0.0]]))
    assert sparse.l0() == 1.5 and sparse.l0(tolerance=1e-6) == 1.0
    dense = Latents(sparse.dense(4), None)
    assert dense.dense(4) is dense.values and dense.l0() == 1.5


def test_reconstruction_mse_sums_dims_and_averages_tokens() -> None:
    x, x_hat = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    assert reconstruction_mse(x, x_hat) == (3 + 9) / 2


def test_decoder_norm_helpers() -> None:
    model = make_sae("relu")
    with torch.no_grad():
        model.W_dec.mul_(3.0)
    model.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(model.W_dec.norm(dim=-1), torch.ones(D_SAE))
    model.training_loss(sparse_dictionary_data(32)).total.backward()
    model.remove_gradient_parallel_to_decoder_directions()
    torch.testing.assert_close((model.W_dec.grad * model.W_dec).sum(-1), torch.zeros(D_SAE), atol=1e-6, rtol=0)


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


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_low_precision_weights_train(family: str, dtype: str) -> None:
    model = make_sae(family, dtype=dtype)
    loss = model.training_loss(sparse_dictionary_data(64), sparsity_coefficient=1e-3,
                               dead_mask=torch.arange(D_SAE) % 2 == 0)
    loss.total.backward()
    assert torch.isfinite(loss.total)
    for name, parameter in model.named_parameters():
        assert parameter.grad.dtype == parameter.dtype and torch.isfinite(parameter.grad).all(), name


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
