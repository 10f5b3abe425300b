"""Gemma Scope importer: `params.npz` files written from known weights in Gemma Scope's own layout and Hub paths,
compared with the forward pass of Gemma Scope's tutorial (`JumpReLUSAE`: `pre = x @ W_enc + b_enc`,
`(pre > threshold) * relu(pre)`, `acts @ W_dec + b_dec`), never rsae's loader."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from rsae.nn.sae import SparseAutoencoder
from rsae.zoo.checkpoint import load, save
from rsae.zoo.importers import SAEImportError, import_sae

D_IN, D_SAE = 12, 40
HUB = "models--google--gemma-scope-2b-pt-res/snapshots/0123456789abcdef/layer_12/width_16k/average_l0_82"

pytestmark = pytest.mark.usefixtures("small_cpu_settings")


def random_params(d_in: int = D_IN, d_sae: int = D_SAE, seed: int = 0) -> dict[str, np.ndarray]:
    """Gemma Scope's arrays: W_enc [d, F], W_dec [F, d]; a large b_dec and thresholds inside the pre-activations'
    range (some negative, which Gemma Scope's never are, to pin the rule there too)."""
    rng = np.random.default_rng(seed)
    return {"W_enc": rng.normal(size=(d_in, d_sae)) / math.sqrt(d_in), "W_dec": rng.normal(size=(d_sae, d_in)),
            "b_enc": 0.3 * rng.normal(size=d_sae), "b_dec": 3.0 * rng.normal(size=d_in),
            "threshold": rng.uniform(-0.2, 1.0, size=d_sae)}


def write_params(folder: Path, arrays: dict[str, Any], dtype: Any = np.float32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **{key: np.asarray(value, dtype=dtype) for key, value in arrays.items()})
    return folder


class Reference:
    """Gemma Scope's tutorial JumpReLUSAE."""

    def __init__(self, params: dict[str, np.ndarray]) -> None:
        self.p = {key: torch.tensor(value, dtype=torch.float32) for key, value in params.items()}

    def encode(self, x: Tensor) -> Tensor:
        pre_acts = x @ self.p["W_enc"] + self.p["b_enc"]
        return (pre_acts > self.p["threshold"]) * F.relu(pre_acts)

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.p["W_dec"] + self.p["b_dec"]

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def activations(n: int = 64, d_in: int = D_IN, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, d_in, generator=gen) + 2 * torch.randn(d_in, generator=gen)


def assert_matches(model: SparseAutoencoder, ref: Reference, x: Tensor) -> None:
    z = ref.encode(x)
    assert 0 < (z > 0).float().mean() < 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(z), ref.decode(z), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), ref.forward(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [(D_IN, D_SAE), (16, 16)], ids=["rect", "square"])
def test_matches_gemma_scope(tmp_path: Path, dims: tuple[int, int]) -> None:
    params = random_params(*dims)
    folder = write_params(tmp_path / HUB, params)
    ref, x = Reference(params), activations(d_in=dims[0])
    for source, fmt in ((folder, None), (folder / "params.npz", None), (folder, "gemma_scope")):
        model = import_sae(source, format=fmt)
        assert model.cfg.architecture == "jumprelu" and model.cfg.apply_b_dec_to_input is False
        assert model.cfg.source["format"] == "gemma_scope"
        assert_matches(model, ref, x)


WRONG: dict[str, Callable[[SparseAutoencoder], None]] = {
    "b_dec subtracted": lambda m: setattr(m.cfg, "apply_b_dec_to_input", True),
    "encoder transposed": lambda m: setattr(m.W_enc, "data", m.W_enc.data.T.clone()),
    "decoder transposed": lambda m: setattr(m.W_dec, "data", m.W_dec.data.T.clone()),
    "threshold ignored": lambda m: m.threshold.data.zero_(),
}


@pytest.mark.parametrize("mistake", WRONG)
def test_the_comparison_catches_each_mistake(tmp_path: Path, mistake: str) -> None:
    params = random_params(16, 16)
    model = import_sae(write_params(tmp_path / HUB, params))
    wrong = copy.deepcopy(model)
    WRONG[mistake](wrong)
    ref, x = Reference(params), activations(d_in=16)
    assert_matches(model, ref, x)
    with torch.no_grad():
        assert not torch.allclose(wrong(x), ref.forward(x), atol=1e-3)


@pytest.mark.parametrize(("path", "model_name", "hook_name"), [
    (HUB, "google/gemma-2-2b", "blocks.12.hook_resid_post"),
    ("gemma-scope-9b-it-res-canonical/layer_20/width_16k/canonical", "google/gemma-2-9b-it",
     "blocks.20.hook_resid_post"),
    ("gemma-scope-2b-pt-mlp-canonical/layer_3/width_65k/canonical", "google/gemma-2-2b", "blocks.3.hook_mlp_out"),
    ("models--google--gemma-scope-27b-pt-att/snapshots/abc/layer_7/width_16k/average_l0_99", "google/gemma-2-27b",
     "blocks.7.attn.hook_z"),
])
def test_model_and_hook_from_the_hub_layout(tmp_path: Path, path: str, model_name: str, hook_name: str) -> None:
    cfg = import_sae(write_params(tmp_path / path, random_params())).cfg
    assert (cfg.model_name, cfg.hook_name, cfg.dtype) == (model_name, hook_name, "float32")
    assert cfg.source["sae_id"] == "/".join(path.split("/")[-3:])
    assert cfg.source["repo"] in path and cfg.source["lm_processing"] is None
    assert "hook_unknown" not in cfg.source
    assert cfg.source.get("reshape_activations") == ("hook_z" if "att" in path else None)
    assert set(cfg.source["files"]) == {"params.npz"}


def test_embedding_sae_reads_hook_embed_at_its_scale(tmp_path: Path) -> None:
    """Trained on embeddings before Gemma's sqrt(d) scaling, read at TransformerLens' hook_embed after it."""
    params = random_params()
    model = import_sae(write_params(tmp_path / "gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6", params))
    assert model.cfg.hook_name == "hook_embed"
    assert model.input_scale == pytest.approx(1 / math.sqrt(D_IN))
    x_tl, ref = activations(), Reference(params)
    raw = x_tl / math.sqrt(D_IN)
    assert_matches(model, ref, raw)  # as stored: the scale Gemma Scope trained at
    model.set_input_scale(1.0)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x_tl), ref.encode(raw), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x_tl), math.sqrt(D_IN) * ref.forward(raw), atol=1e-4, rtol=1e-5)


def test_the_import_saves_as_an_rsae_checkpoint(tmp_path: Path) -> None:
    folder = write_params(tmp_path / "gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6", random_params())
    model = import_sae(folder)
    loaded = load(save(model, tmp_path / "ckpt"))
    assert loaded.cfg == model.cfg and loaded.input_scale == model.input_scale
    assert torch.equal(loaded(activations()), model(activations()))


def test_a_path_without_the_layout_leaves_model_and_hook_unknown(tmp_path: Path) -> None:
    params = random_params()
    model = import_sae(write_params(tmp_path / "downloads" / "my_sae", params))
    assert (model.cfg.model_name, model.cfg.hook_name) == ("unknown", "blocks.0.hook_resid_post")
    assert "names no Gemma Scope repo" in model.cfg.source["hook_unknown"]
    assert_matches(model, Reference(params), activations())


def test_lowercase_matrix_names(tmp_path: Path) -> None:
    params = random_params()
    spelled = {"w_enc": params["W_enc"], "w_dec": params["W_dec"], "b_enc": params["b_enc"],
               "b_dec": params["b_dec"], "threshold": params["threshold"]}
    assert_matches(import_sae(write_params(tmp_path / HUB, spelled)), Reference(params), activations())


def test_float64_arrays_keep_their_dtype(tmp_path: Path) -> None:
    model = import_sae(write_params(tmp_path / HUB, random_params(), dtype=np.float64))
    assert model.cfg.dtype == "float64" and model.W_enc.dtype == torch.float64


def test_transcoders_are_refused(tmp_path: Path) -> None:
    folder = write_params(tmp_path / "gemma-scope-2b-pt-transcoders/layer_3/width_16k/average_l0_54", random_params())
    with pytest.raises(SAEImportError, match="transcoder") as err:
        import_sae(folder)
    assert str(folder / "params.npz") in str(err.value)


# --- bad input --------------------------------------------------------------------------------------------------------


def test_missing_key(tmp_path: Path) -> None:
    params = random_params()
    del params["threshold"]
    folder = write_params(tmp_path / HUB, params)
    with pytest.raises(SAEImportError, match="lacks threshold") as err:
        import_sae(folder)
    assert str(folder / "params.npz") in str(err.value)


def test_unexpected_key(tmp_path: Path) -> None:
    folder = write_params(tmp_path / HUB, {**random_params(), "log_threshold": np.zeros(D_SAE)})
    with pytest.raises(SAEImportError, match="unexpected arrays log_threshold"):
        import_sae(folder)


def test_wrong_shape(tmp_path: Path) -> None:
    folder = write_params(tmp_path / HUB, {**random_params(), "b_dec": np.zeros(D_IN + 2)})
    with pytest.raises(SAEImportError, match=r"b_dec has shape \(14,\), expected \(12,\)") as err:
        import_sae(folder)
    assert str(folder.resolve()) in str(err.value)


def test_nan_weights(tmp_path: Path) -> None:
    params = random_params()
    params["W_dec"][2, 3] = np.nan
    folder = write_params(tmp_path / HUB, params)
    with pytest.raises(SAEImportError, match="W_dec holds NaN/Inf") as err:
        import_sae(folder)
    assert str(folder.resolve()) in str(err.value)


def test_integer_arrays_are_refused(tmp_path: Path) -> None:
    params = {key: value.astype(np.float32) for key, value in random_params().items()}
    params["threshold"] = np.zeros(D_SAE, dtype=np.int64)
    folder = tmp_path / HUB
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params)
    with pytest.raises(SAEImportError, match="threshold has dtype int64"):
        import_sae(folder)


def test_object_arrays_are_never_unpickled(tmp_path: Path) -> None:
    folder = tmp_path / HUB
    folder.mkdir(parents=True)
    params = {key: value.astype(np.float32) for key, value in random_params().items()}
    np.savez(folder / "params.npz", **{**params, "threshold": np.array([{"not": "an array"}], dtype=object)})
    with pytest.raises(SAEImportError, match=r"allow_pickle=False") as err:
        import_sae(folder)
    assert str(folder / "params.npz") in str(err.value)


def test_truncated_file(tmp_path: Path) -> None:
    folder = write_params(tmp_path / HUB, random_params())
    data = (folder / "params.npz").read_bytes()
    (folder / "params.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEImportError, match="truncated or corrupt") as err:
        import_sae(folder)
    assert str(folder / "params.npz") in str(err.value)


def test_a_single_array_is_not_an_archive(tmp_path: Path) -> None:
    folder = tmp_path / HUB
    folder.mkdir(parents=True)
    with open(folder / "params.npz", "wb") as handle:
        np.save(handle, np.zeros((D_IN, D_SAE), dtype=np.float32))
    with pytest.raises(SAEImportError, match="single array"):
        import_sae(folder)
