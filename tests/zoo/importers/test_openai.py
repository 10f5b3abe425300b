"""OpenAI sparse_autoencoder importer: state dicts written from known weights as `Autoencoder.state_dict()` lays
them out (and SAELens' mirror folders of them), compared with a reference forward pass that follows OpenAI's
`sparse_autoencoder/model.py` (`LN`, `encode_pre_act`, `TopK`, `decode`), never rsae's loader."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from rsae.nn.sae import SparseAutoencoder
from rsae.zoo.checkpoint import load, save
from rsae.zoo.importers import SAEImportError, import_sae, openai

D_IN, D_SAE, K = 12, 40, 4
BLOB = "resid_post_mlp_v5_32k/autoencoders"
"""OpenAI's bucket layout below `gpt2-small/`: `{location}_{version}/autoencoders/{layer}.pt`."""
ALL_BUFFERS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")
# rsae scales a layer-norm reconstruction back by std + 1e-5 where OpenAI scales by std: a gap of 1e-5 times the
# normalised reconstruction (entries of a few units here), far below what any wrong rule costs.
FORWARD_TOLERANCE = {"atol": 2e-4, "rtol": 1e-5}

pytestmark = pytest.mark.usefixtures("small_cpu_settings")


def state_dict(d_in: int = D_IN, d_sae: int = D_SAE, activation: str = "TopK", buffers: tuple[str, ...] = ALL_BUFFERS,
               seed: int = 0) -> dict[str, Any]:
    """`Autoencoder.state_dict()`: parameters, statistics buffers, then the activation's name and state dict."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {"pre_bias": 0.5 * torch.randn(d_in, generator=gen),
                          "latent_bias": 0.3 * torch.randn(d_sae, generator=gen)}
    stats = {"stats_last_nonzero": torch.zeros(d_sae, dtype=torch.long),
             "latents_activation_frequency": torch.ones(d_sae), "latents_mean_square": torch.zeros(d_sae)}
    sd.update({key: stats[key] for key in buffers})
    sd["encoder.weight"] = torch.randn(d_sae, d_in, generator=gen) / math.sqrt(d_in)
    sd["decoder.weight"] = torch.randn(d_in, d_sae, generator=gen)
    sd["activation"] = activation
    sd["activation_state_dict"] = {"k": K, "postact_fn": "ReLU"} if activation == "TopK" else {}
    return sd


def write(path: Path, sd: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def write_mirror(folder: Path, sd: dict[str, Any], layer: int = 8, **overrides: Any) -> Path:
    """SAELens' mirror (`jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs/v5_32k_layer_L.pt/`): a pre-6 SAELens cfg.json
    and the weights converted to SAELens' names and layouts."""
    folder.mkdir(parents=True)
    save_file({"W_enc": sd["encoder.weight"].T.contiguous(), "b_enc": sd["latent_bias"],
               "W_dec": sd["decoder.weight"].T.contiguous(), "b_dec": sd["pre_bias"]},
              str(folder / "sae_weights.safetensors"))
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "cpu", "model_name": "gpt2-small",
           "hook_name": f"blocks.{layer}.hook_resid_post", "hook_layer": layer, "hook_head_index": None,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True,
           "finetuning_scaling_factor": False, "sae_lens_training_version": None, "prepend_bos": False,
           "dataset_path": "Skylion007/openwebtext", "context_size": 64, "normalize_activations": "layer_norm",
           **overrides}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def LN(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    mu = x.mean(dim=-1, keepdim=True)
    x = x - mu
    std = x.std(dim=-1, keepdim=True)
    return x / (std + eps), mu, std


class Reference:
    """OpenAI's `Autoencoder.from_state_dict(sd)`: normalisation exactly when the activation is TopK."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self.sd = sd
        self.normalize = sd.get("activation", "ReLU") == "TopK"

    def activation(self, pre_acts: Tensor) -> Tensor:
        if not self.normalize:
            return F.relu(pre_acts)
        topk = torch.topk(pre_acts, k=self.sd["activation_state_dict"]["k"], dim=-1)
        return torch.zeros_like(pre_acts).scatter_(-1, topk.indices, F.relu(topk.values))

    def encode(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        info: dict[str, Tensor] = {}
        if self.normalize:
            x, info["mu"], info["std"] = LN(x)
        pre_acts = F.linear(x - self.sd["pre_bias"], self.sd["encoder.weight"], self.sd["latent_bias"])
        return self.activation(pre_acts), info

    def decode(self, latents: Tensor, info: dict[str, Tensor] | None) -> Tensor:
        """With `info` None: the reconstruction before the scale-back (what rsae's `decode(z)` returns)."""
        ret = F.linear(latents, self.sd["decoder.weight"]) + self.sd["pre_bias"]
        return ret * info["std"] + info["mu"] if self.normalize and info is not None else ret

    def forward(self, x: Tensor) -> Tensor:
        latents, info = self.encode(x)
        return self.decode(latents, info)


def activations(n: int = 64, d_in: int = D_IN, seed: int = 1) -> Tensor:
    """Tokens of very different means and scales: a missing or wrong per-token normalisation shows."""
    gen = torch.Generator().manual_seed(seed)
    scale, mean = 0.5 + 4.5 * torch.rand(n, 1, generator=gen), 3 * torch.randn(n, 1, generator=gen)
    return scale * torch.randn(n, d_in, generator=gen) + mean + torch.randn(d_in, generator=gen)


def assert_matches(model: SparseAutoencoder, ref: Reference, x: Tensor) -> None:
    z, _ = ref.encode(x)
    assert 0 < (z > 0).float().mean() < 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(z), ref.decode(z, None), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), ref.forward(x), **FORWARD_TOLERANCE)


@pytest.mark.parametrize("buffers", [ALL_BUFFERS, ("stats_last_nonzero",)], ids=["model.py", "v5 release"])
@pytest.mark.parametrize("dims", [(D_IN, D_SAE), (16, 16)], ids=["rect", "square"])
def test_matches_openai(tmp_path: Path, dims: tuple[int, int], buffers: tuple[str, ...]) -> None:
    sd = state_dict(*dims, buffers=buffers)
    file = write(tmp_path / BLOB / "8.pt", sd)
    ref, x = Reference(sd), activations(d_in=dims[0])
    for source, fmt in ((file, None), (file.parent, None), (file, "openai")):
        model = import_sae(source, format=fmt)
        cfg = model.cfg
        assert (cfg.architecture, cfg.k, cfg.input_normalization, cfg.apply_b_dec_to_input) == (
            "topk", K, "layer_norm", True)
        assert (cfg.model_name, cfg.hook_name, cfg.hook_layer) == ("gpt2", "blocks.8.hook_resid_post", 8)
        assert cfg.source["format"] == "openai" and cfg.source["lm_processing"] is None
        assert set(cfg.source["files"]) == {"8.pt"}
        assert_matches(model, ref, x)


WRONG: dict[str, Callable[[SparseAutoencoder], None]] = {
    "no layer norm": lambda m: setattr(m.cfg, "input_normalization", "none"),
    "pre_bias not subtracted": lambda m: setattr(m.cfg, "apply_b_dec_to_input", False),
    "encoder transposed": lambda m: setattr(m.W_enc, "data", m.W_enc.data.T.clone()),
    "decoder transposed": lambda m: setattr(m.W_dec, "data", m.W_dec.data.T.clone()),
    "k off by one": lambda m: setattr(m.cfg, "k", K + 1),
}


@pytest.mark.parametrize("mistake", WRONG)
def test_the_comparison_catches_each_mistake(tmp_path: Path, mistake: str) -> None:
    sd = state_dict(16, 16)
    model = import_sae(write(tmp_path / BLOB / "8.pt", sd))
    wrong = copy.deepcopy(model)
    WRONG[mistake](wrong)
    ref, x = Reference(sd), activations(d_in=16)
    assert_matches(model, ref, x)
    with torch.no_grad():
        assert not torch.allclose(wrong(x), ref.forward(x), atol=1e-2)


def test_the_scale_back_is_openai_s_up_to_eps(tmp_path: Path) -> None:
    """OpenAI's decode multiplies by std, rsae's restore by std + 1e-5: the gap is at most 1e-5 x_hat_normalised."""
    sd = state_dict()
    model, ref, x = import_sae(write(tmp_path / BLOB / "8.pt", sd)), Reference(sd), activations()
    latents, _ = ref.encode(x)
    with torch.no_grad():
        gap = (model(x) - ref.forward(x)).abs()
    assert bool((gap <= 1e-5 * ref.decode(latents, None).abs() + 2e-5).all())


@pytest.mark.parametrize(("path", "hook_name"), [
    ("resid_post_mlp_v5_128k/autoencoders/11.pt", "blocks.11.hook_resid_post"),
    ("resid_post_attn_v5_32k/autoencoders/0.pt", "blocks.0.hook_resid_mid"),
    ("resid_delta_attn_v5_32k/autoencoders/4.pt", "blocks.4.hook_attn_out"),
    ("resid_delta_mlp_v5_32k/autoencoders/7.pt", "blocks.7.hook_mlp_out"),
    ("gpt2_saes/resid_delta_mlp_layer_2.pt", "blocks.2.hook_mlp_out"),
])
def test_hook_from_openai_locations(tmp_path: Path, path: str, hook_name: str) -> None:
    cfg = import_sae(write(tmp_path / path, state_dict())).cfg
    assert cfg.hook_name == hook_name
    assert "hook_assumed" not in cfg.source and "hook_unknown" not in cfg.source


def test_a_layer_without_a_location_is_taken_as_resid_post(tmp_path: Path) -> None:
    cfg = import_sae(write(tmp_path / "v5_32k_layer_5.pt", state_dict())).cfg
    assert cfg.hook_name == "blocks.5.hook_resid_post"
    assert "names no location" in cfg.source["hook_assumed"]


def test_without_a_layer_the_hook_is_unknown(tmp_path: Path) -> None:
    sd = state_dict()
    model = import_sae(write(tmp_path / "sae.pt", sd))
    assert model.cfg.hook_name == "blocks.0.hook_resid_post"  # SAEConfig's default
    assert "names no layer" in model.cfg.source["hook_unknown"]
    assert_matches(model, Reference(sd), activations())


@pytest.mark.parametrize("stored", [True, False], ids=["activation ReLU", "no activation key"])
def test_relu_autoencoders_have_no_normalisation(tmp_path: Path, stored: bool) -> None:
    """v1 / v4: ReLU, which `from_state_dict` also assumes when the activation is not stored."""
    sd = state_dict(activation="ReLU")
    if not stored:
        del sd["activation"], sd["activation_state_dict"]
    model = import_sae(write(tmp_path / "mlp_post_act_v4" / "autoencoders" / "3.pt", sd))
    assert (model.cfg.architecture, model.cfg.input_normalization) == ("relu", "none")
    assert model.cfg.hook_name == "blocks.3.mlp.hook_post"
    assert_matches(model, Reference(sd), activations())


def test_saelens_mirror_folder(tmp_path: Path) -> None:
    sd = state_dict()
    folder = write_mirror(tmp_path / "GPT2-Small-OAI-v5-32k-resid-post-SAEs" / "v5_32k_layer_8.pt", sd)
    assert openai.detect(folder)
    model = import_sae(folder, format="openai")
    cfg = model.cfg
    assert (cfg.architecture, cfg.k, cfg.input_normalization) == ("topk", K, "layer_norm")
    assert (cfg.model_name, cfg.hook_name) == ("gpt2", "blocks.8.hook_resid_post")
    assert cfg.source["original_cfg"]["context_size"] == 64
    assert set(cfg.source["files"]) == {"cfg.json", "sae_weights.safetensors"}
    assert_matches(model, Reference(sd), activations())


def test_the_import_saves_as_an_rsae_checkpoint(tmp_path: Path) -> None:
    model = import_sae(write_mirror(tmp_path / "v5_32k_layer_8.pt", state_dict()), format="openai")
    loaded = load(save(model, tmp_path / "ckpt"))
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded(activations()), model(activations()))


def test_a_mirror_without_its_hook_takes_it_from_the_folder_name(tmp_path: Path) -> None:
    sd = state_dict()
    folder = write_mirror(tmp_path / "v5_32k_layer_6", sd, hook_name=None)
    cfg = import_sae(folder, format="openai").cfg
    assert cfg.hook_name == "blocks.6.hook_resid_post" and "hook_assumed" in cfg.source


def test_a_saelens_folder_of_another_sae_is_refused(tmp_path: Path) -> None:
    folder = write_mirror(tmp_path / "v5_32k_layer_8.pt", state_dict(), normalize_activations="none")
    with pytest.raises(SAEImportError, match="--format saelens") as err:
        import_sae(folder, format="openai")
    assert str(folder / "cfg.json") in str(err.value)


# --- bad input -------------------------------------------------------------------------------------------------------


class CustomObject:
    """A class of the test's own: weights_only has no business unpickling it."""


def test_a_pickle_weights_only_refuses_is_refused(tmp_path: Path) -> None:
    sd = state_dict()
    sd["activation_state_dict"] = {"k": K, "postact_fn": CustomObject()}
    file = write(tmp_path / BLOB / "8.pt", sd)
    with pytest.raises(SAEImportError, match="weights_only=True") as err:
        import_sae(file)
    assert str(file) in str(err.value) and "CustomObject" in str(err.value)


def test_missing_key(tmp_path: Path) -> None:
    sd = state_dict()
    del sd["latent_bias"]
    file = write(tmp_path / BLOB / "8.pt", sd)
    with pytest.raises(SAEImportError, match="lacks latent_bias") as err:
        import_sae(file)
    assert str(file) in str(err.value)


def test_missing_k(tmp_path: Path) -> None:
    sd = state_dict()
    sd["activation_state_dict"] = {"postact_fn": "ReLU"}
    with pytest.raises(SAEImportError, match="lacks activation_state_dict.k"):
        import_sae(write(tmp_path / BLOB / "8.pt", sd))


def test_unexpected_key(tmp_path: Path) -> None:
    with pytest.raises(SAEImportError, match="unexpected keys encoder.bias"):
        import_sae(write(tmp_path / BLOB / "8.pt", {**state_dict(), "encoder.bias": torch.zeros(D_SAE)}))


def test_wrong_shape(tmp_path: Path) -> None:
    file = write(tmp_path / BLOB / "8.pt", {**state_dict(), "pre_bias": torch.zeros(D_IN - 1)})
    with pytest.raises(SAEImportError, match=r"b_dec has shape \(11,\), expected \(12,\)") as err:
        import_sae(file)
    assert str(file) in str(err.value)


def test_nan_weights(tmp_path: Path) -> None:
    sd = state_dict()
    sd["encoder.weight"][0, 0] = float("inf")
    file = write(tmp_path / BLOB / "8.pt", sd)
    with pytest.raises(SAEImportError, match="W_enc holds NaN/Inf") as err:
        import_sae(file)
    assert str(file) in str(err.value)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("activation", "Identity", "activation 'Identity' is not one rsae imports"),
    ("activation_state_dict", {"k": K, "postact_fn": "Identity"}, "postact_fn is 'Identity'"),
    ("activation_state_dict", {"k": 2.5, "postact_fn": "ReLU"}, "k is 2.5, expected an integer"),
])
def test_activations_rsae_cannot_represent(tmp_path: Path, field: str, value: Any, message: str) -> None:
    with pytest.raises(SAEImportError, match=message):
        import_sae(write(tmp_path / BLOB / "8.pt", {**state_dict(), field: value}))


def test_a_folder_of_several_state_dicts_needs_the_file_named(tmp_path: Path) -> None:
    write(tmp_path / BLOB / "1.pt", state_dict())
    write(tmp_path / BLOB / "2.pt", state_dict(seed=1))
    assert not openai.detect(tmp_path / BLOB)
    with pytest.raises(SAEImportError, match="holds 2 .pt files"):
        import_sae(tmp_path / BLOB, format="openai")


def test_truncated_file(tmp_path: Path) -> None:
    file = write(tmp_path / BLOB / "8.pt", state_dict())
    file.write_bytes(file.read_bytes()[:300])
    with pytest.raises(SAEImportError, match="truncated or corrupt") as err:
        import_sae(file)
    assert str(file) in str(err.value)
