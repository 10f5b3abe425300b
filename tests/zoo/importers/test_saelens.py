"""SAELens folders written from known weights in SAELens' layout, imported, and checked against a reference
forward pass written from SAELens' code (`sae_lens/saes/*.py`, `SAE.process_sae_in`, `_setup_activation_normalization`,
pre-6 `sae_lens/sae.py`), not from rsae's loader."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from rsae.zoo import importers
from rsae.zoo.importers import SAEImportError, import_sae

D_IN, D_SAE, K = 16, 48, 5
HOOK = "blocks.3.hook_resid_post"
FAMILIES_OF = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}


def weights(architecture: str, seed: int = 0) -> dict[str, Tensor]:
    """Random SAELens weights: W_enc [d_in, d_sae], W_dec [d_sae, d_in], biases that matter, thresholds in the bulk
    of the pre-activations (so some latents fire and some do not)."""
    gen = torch.Generator().manual_seed(seed)
    out = {"W_enc": torch.randn(D_IN, D_SAE, generator=gen) / math.sqrt(D_IN),
           "b_enc": 0.3 * torch.randn(D_SAE, generator=gen),
           "W_dec": torch.randn(D_SAE, D_IN, generator=gen) / math.sqrt(D_SAE),
           "b_dec": torch.randn(D_IN, generator=gen)}
    if architecture == "jumprelu":
        out["threshold"] = 0.2 + 0.8 * torch.rand(D_SAE, generator=gen)
    return out


def v6_cfg(architecture: str, **overrides: Any) -> dict[str, Any]:
    """A cfg.json as SAELens 6's `SAEConfig.to_dict()` writes it."""
    cfg: dict[str, Any] = {
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none", "architecture": architecture,
        "metadata": {"sae_lens_version": "6.12.0", "sae_lens_training_version": "6.12.0", "model_name": "gpt2",
                     "hook_name": HOOK, "hook_head_index": None, "context_size": 128, "prepend_bos": True,
                     "seqpos_slice": [None], "model_from_pretrained_kwargs": {"center_writing_weights": False}},
    }
    if architecture == "topk":
        cfg.update(k=K, rescale_acts_by_decoder_norm=False)
    cfg.update(overrides)
    return cfg


def pre6_cfg(**overrides: Any) -> dict[str, Any]:
    """A cfg.json as SAELens 3-5 wrote it: LM facts at the top level, `hook_point`, `activation_fn_str`."""
    cfg: dict[str, Any] = {
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
        "model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8,
        "hook_point_head_index": None, "activation_fn_str": "relu", "activation_fn_kwargs": {},
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "sae_lens_training_version": "3.5.0",
        "prepend_bos": True, "dataset_path": "Skylion007/openwebtext", "context_size": 128,
        "normalize_activations": False,
    }
    cfg.update(overrides)
    return cfg


def write(folder: Path, cfg: dict[str, Any], tensors: dict[str, Tensor], **extra_files: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    for name, content in extra_files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


class Reference:
    """SAELens' inference forward, transcribed: `process_sae_in` (layer norm, `- b_dec * apply_b_dec_to_input`),
    the architecture's encode, `decode` (`run_time_activation_norm_fn_out`). It runs on the activations the SAE was
    trained on; `expected_average_only_in` SAEs get theirs multiplied by the norm scaling factor by the caller."""

    def __init__(self, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.cfg, self.t = cfg, tensors
        self.ln: tuple[Tensor, Tensor] | None = None

    def process(self, x: Tensor) -> Tensor:
        if self.cfg.get("normalize_activations") == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            x = x / (std + 1e-5)
            self.ln = (mu, std)
        return x - self.t["b_dec"] * self.cfg.get("apply_b_dec_to_input", True)

    def encode(self, x: Tensor) -> Tensor:
        hidden_pre = self.process(x) @ self.t["W_enc"] + self.t["b_enc"]
        architecture = self.cfg["architecture"]
        if self.cfg.get("activation_fn_str") == "topk":
            architecture, k = "topk", self.cfg["activation_fn_kwargs"]["k"]
        else:
            k = self.cfg.get("k")
        if architecture == "jumprelu":
            threshold = self.t["threshold"] if "threshold" in self.t else self.t["log_threshold"].exp()
            return torch.relu(hidden_pre) * (hidden_pre > threshold).to(hidden_pre.dtype)
        if architecture == "topk":
            if self.cfg.get("rescale_acts_by_decoder_norm"):
                hidden_pre = hidden_pre * self.t["W_dec"].norm(dim=-1)
            values, indices = torch.topk(hidden_pre, k=k, dim=-1, sorted=False)
            return torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())
        return torch.relu(hidden_pre)

    def decode(self, z: Tensor) -> Tensor:
        if self.cfg.get("rescale_acts_by_decoder_norm"):
            z = z / self.t["W_dec"].norm(dim=-1)
        if self.cfg.get("finetuning_scaling_factor"):
            z = z * self.t["finetuning_scaling_factor"]
        out = z @ self.t["W_dec"] + self.t["b_dec"]
        if self.ln is not None:
            mu, std = self.ln
            out = out * std + mu
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def activations(n: int = 64, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, D_IN, generator=gen) + 0.5


def assert_matches(model: Any, ref: Reference, x: Tensor, scale: float = 1.0, decode: bool = True) -> None:
    """The imported model on raw x against SAELens on the activations it was trained on (x * scale)."""
    codes = ref.encode(x * scale)
    torch.testing.assert_close(model.encode(x), codes, rtol=1e-5, atol=1e-5)
    assert bool((codes > 0).any()) and bool((codes == 0).any())
    torch.testing.assert_close(model(x), ref.decode(codes) / scale, rtol=1e-5, atol=1e-5)
    if decode:
        z = torch.relu(torch.randn(8, D_SAE))
        torch.testing.assert_close(model.decode(z), ref.decode(z) / scale, rtol=1e-5, atol=1e-5)


# --- the three architectures, v6 -----------------------------------------------------------------


@pytest.mark.parametrize("architecture,family", FAMILIES_OF.items())
def test_v6_architectures_match_saelens(tmp_path: Path, architecture: str, family: str) -> None:
    cfg, tensors = v6_cfg(architecture), weights(architecture)
    folder = write(tmp_path / "sae", cfg, tensors)
    for model in (import_sae(folder), import_sae(folder, format="saelens"),
                  import_sae(folder / "sae_weights.safetensors")):
        assert model.cfg.architecture == family and model.cfg.hook_name == HOOK and model.cfg.model_name == "gpt2"
        assert model.cfg.k == (K if family == "topk" else None)
        assert model.cfg.source["format"] == "saelens" and set(model.cfg.source["files"]) == {
            "cfg.json", "sae_weights.safetensors"}
        assert_matches(model, Reference(cfg, tensors), activations())


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_apply_b_dec_to_input_false_encodes_the_raw_input(tmp_path: Path, architecture: str) -> None:
    cfg, tensors = v6_cfg(architecture, apply_b_dec_to_input=False), weights(architecture)
    model = import_sae(write(tmp_path / "sae", cfg, tensors))
    assert model.cfg.apply_b_dec_to_input is False
    assert_matches(model, Reference(cfg, tensors), activations())
    # The b_dec rule is visible: subtracting it would give other codes.
    assert not torch.allclose(Reference(v6_cfg(architecture), tensors).encode(activations()),
                              model.encode(activations()))


def test_jumprelu_log_threshold_is_exponentiated(tmp_path: Path) -> None:
    tensors = weights("jumprelu")
    stored = {**{k: v for k, v in tensors.items() if k != "threshold"}, "log_threshold": tensors["threshold"].log()}
    cfg = v6_cfg("jumprelu")
    model = import_sae(write(tmp_path / "sae", cfg, stored))
    torch.testing.assert_close(model.threshold.detach(), tensors["threshold"])
    assert_matches(model, Reference(cfg, stored), activations())


def test_negative_thresholds_act_as_relu_in_both(tmp_path: Path) -> None:
    tensors = weights("jumprelu")
    tensors["threshold"] = tensors["threshold"] - 0.6  # some below zero: SAELens' relu(h) * (h > theta)
    cfg = v6_cfg("jumprelu")
    assert_matches(import_sae(write(tmp_path / "sae", cfg, tensors)), Reference(cfg, tensors), activations())


def test_topk_rescale_acts_by_decoder_norm_is_folded(tmp_path: Path) -> None:
    tensors = weights("topk")
    tensors["W_dec"] = tensors["W_dec"] * (0.2 + 3 * torch.rand(D_SAE, 1))  # norms far from 1 change the top k
    cfg = v6_cfg("topk", rescale_acts_by_decoder_norm=True)
    model = import_sae(write(tmp_path / "sae", cfg, tensors))
    assert_matches(model, Reference(cfg, tensors), activations())
    unscaled = Reference(v6_cfg("topk"), tensors).encode(activations())
    assert not torch.equal(unscaled > 0, model.encode(activations()) > 0)


# --- normalisation --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["activation_scaler.json", "cfg.json"])
def test_expected_average_only_in_folds_the_norm_scaling_factor(tmp_path: Path, where: str) -> None:
    factor = 3.7
    tensors = weights("jumprelu")
    cfg = v6_cfg("jumprelu", normalize_activations="expected_average_only_in")
    extra: dict[str, Any] = {}
    if where == "cfg.json":
        cfg["norm_scaling_factor"] = factor
    else:
        extra["activation_scaler.json"] = {"scaling_factor": factor}
    model = import_sae(write(tmp_path / "sae", cfg, tensors, **extra))
    assert model.input_scale == 1.0 and model.cfg.source["norm_scaling_factor_folded"] == factor
    # SAELens' trainer fed x * factor and read outputs / factor; the import reads raw activations.
    assert_matches(model, Reference(cfg, tensors), activations(), scale=factor)
    # ... which is SAELens' fold_activation_norm_scaling_factor, to the letter.
    torch.testing.assert_close(model.W_enc.detach(), tensors["W_enc"] * factor)
    torch.testing.assert_close(model.W_dec.detach(), tensors["W_dec"] / factor)
    torch.testing.assert_close(model.b_dec.detach(), tensors["b_dec"] / factor)


def test_pre6_boolean_normalize_activations_means_expected_average(tmp_path: Path) -> None:
    cfg, tensors = pre6_cfg(normalize_activations=True, norm_scaling_factor=0.25), weights("standard")
    model = import_sae(write(tmp_path / "sae", cfg, tensors))
    assert_matches(model, Reference(cfg, tensors), activations(), scale=0.25)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_layer_norm_normalises_each_token(tmp_path: Path, architecture: str) -> None:
    cfg, tensors = v6_cfg(architecture, normalize_activations="layer_norm"), weights(architecture)
    model = import_sae(write(tmp_path / "sae", cfg, tensors))
    assert model.cfg.input_normalization == "layer_norm"
    # Large, varied per-token offsets and scales: without the normalisation the codes would be others.
    gen = torch.Generator().manual_seed(3)
    x = activations() * (1 + 5 * torch.rand(64, 1, generator=gen)) + 10 * torch.randn(64, 1, generator=gen)
    ref = Reference(cfg, tensors)
    torch.testing.assert_close(model.encode(x), ref.encode(x), rtol=1e-5, atol=1e-5)
    # SAELens scales back by std, rsae by std + 1e-5: a relative difference of 1e-5 / std.
    torch.testing.assert_close(model(x), ref.decode(ref.encode(x)), rtol=1e-4, atol=1e-4)


# --- pre-6 configs --------------------------------------------------------------------------------


def test_pre6_keys(tmp_path: Path) -> None:
    cfg, tensors = pre6_cfg(), weights("standard")
    model = import_sae(write(tmp_path / "sae", cfg, tensors))
    assert model.cfg.architecture == "relu"
    assert model.cfg.hook_name == "blocks.8.hook_resid_pre" and model.cfg.hook_layer == 8
    assert model.cfg.model_name == "gpt2-small" and model.cfg.source["sae_lens_version"] is None
    assert_matches(model, Reference(cfg, tensors), activations())


def test_pre6_topk_from_activation_fn_kwargs(tmp_path: Path) -> None:
    cfg = pre6_cfg(activation_fn_str="topk", activation_fn_kwargs={"k": 7})
    tensors = weights("standard")
    model = import_sae(write(tmp_path / "sae", cfg, tensors))
    assert model.cfg.architecture == "topk" and model.cfg.k == 7
    assert_matches(model, Reference(cfg, tensors), activations())


def test_pre6_jumprelu(tmp_path: Path) -> None:
    cfg, tensors = pre6_cfg(architecture="jumprelu", hook_point="blocks.5.hook_mlp_out"), weights("jumprelu")
    model = import_sae(write(tmp_path / "sae", cfg, tensors))
    assert model.cfg.architecture == "jumprelu" and model.cfg.hook_name == "blocks.5.hook_mlp_out"
    assert_matches(model, Reference(cfg, tensors), activations())


def test_pre6_finetuning_scaling_factor_is_folded_into_the_decoder(tmp_path: Path) -> None:
    tensors = {**weights("standard"), "finetuning_scaling_factor": 0.5 + torch.rand(D_SAE)}
    cfg = pre6_cfg(finetuning_scaling_factor=True)
    model = import_sae(write(tmp_path / "sae", cfg, tensors))
    assert_matches(model, Reference(cfg, tensors), activations())


def test_an_all_ones_scaling_factor_is_dropped(tmp_path: Path) -> None:
    tensors = {**weights("standard"), "scaling_factor": torch.ones(D_SAE)}
    cfg = pre6_cfg()
    assert_matches(import_sae(write(tmp_path / "sae", cfg, tensors)), Reference(cfg, tensors), activations())


# --- provenance -----------------------------------------------------------------------------------


def test_lm_processing_follows_saelens_loading(tmp_path: Path) -> None:
    tensors = weights("standard")
    # Since 3.19.2 SAELens trains on from_pretrained_no_processing(**model_from_pretrained_kwargs).
    model = import_sae(write(tmp_path / "v6", v6_cfg("standard"), tensors))
    assert model.cfg.source["lm_processing"] == {"fold_ln": False, "center_writing_weights": False,
                                                 "center_unembed": False, "fold_value_biases": False}
    assert model.cfg.source["model_from_pretrained_kwargs"] == {"center_writing_weights": False}
    on = pre6_cfg(model_from_pretrained_kwargs={"center_writing_weights": True, "n_devices": 1})
    model = import_sae(write(tmp_path / "on", on, tensors))
    assert model.cfg.source["lm_processing"] == {"fold_ln": False, "center_writing_weights": True,
                                                 "center_unembed": False, "fold_value_biases": False}
    # Before, with no kwargs in the config, it trained on from_pretrained's defaults: everything processed.
    model = import_sae(write(tmp_path / "old", pre6_cfg(), tensors))
    assert model.cfg.source["lm_processing"] == {"fold_ln": True, "center_writing_weights": True,
                                                 "center_unembed": True, "fold_value_biases": True}
    assert model.cfg.source["original_cfg"] == pre6_cfg()


def test_dtype_comes_from_the_config(tmp_path: Path) -> None:
    tensors = {k: v.to(torch.bfloat16) for k, v in weights("topk").items()}
    model = import_sae(write(tmp_path / "sae", v6_cfg("topk", dtype="torch.float16"), tensors))
    assert model.cfg.dtype == "float16" and model.dtype == torch.float16
    model = import_sae(write(tmp_path / "plain", {k: v for k, v in v6_cfg("topk").items() if k != "dtype"}, tensors))
    assert model.cfg.dtype == "bfloat16"


def test_hook_z_and_hf_module_hooks(tmp_path: Path) -> None:
    tensors = weights("standard")
    cfg = v6_cfg("standard", reshape_activations="hook_z")
    cfg["metadata"]["hook_name"] = "blocks.2.attn.hook_z"
    assert import_sae(write(tmp_path / "z", cfg, tensors)).cfg.hook_name == "blocks.2.attn.hook_z"
    cfg = v6_cfg("standard")
    cfg["metadata"].update(hook_name="model.layers.4", model_class_name="AutoModelForCausalLM")
    model = import_sae(write(tmp_path / "hf", cfg, tensors))
    assert model.cfg.hook_name == "blocks.4.hook_resid_post" and "lm_processing" not in model.cfg.source


# --- refusals -------------------------------------------------------------------------------------


def refusal(tmp_path: Path, cfg: dict[str, Any], tensors: dict[str, Tensor], **extra: Any) -> str:
    folder = write(tmp_path / "bad", cfg, tensors, **extra)
    with pytest.raises(SAEImportError) as err:
        import_sae(folder)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("architecture,words", [
    ("gated", "gated"), ("transcoder", "transcoder"), ("jumprelu_transcoder", "transcoder"),
    ("matryoshka_batchtopk", "standard"), ("rsae", "rsae.load"),
])
def test_unsupported_architectures_are_refused(tmp_path: Path, architecture: str, words: str) -> None:
    message = refusal(tmp_path, v6_cfg(architecture), weights("standard"))
    assert repr(architecture) in message and words in message and "cfg.json" in message


def test_unsupported_pre6_activation_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, pre6_cfg(activation_fn_str="tanh-relu"), weights("standard"))
    assert "tanh-relu" in message


@pytest.mark.parametrize("scheme", ["constant_norm_rescale", "covariance_whitening", "per_token_magic"])
def test_unsupported_normalisation_is_refused(tmp_path: Path, scheme: str) -> None:
    message = refusal(tmp_path, v6_cfg("standard", normalize_activations=scheme), weights("standard"))
    assert scheme in message and "layer_norm" in message


def test_expected_average_without_a_factor_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, v6_cfg("standard", normalize_activations="expected_average_only_in"),
                      weights("standard"), **{"activation_scaler.json": {"scaling_factor": None}})
    assert "norm_scaling_factor" in message and "activation_scaler.json" in message


def test_topk_without_k_is_refused(tmp_path: Path) -> None:
    cfg = v6_cfg("topk")
    del cfg["k"]
    assert "k=None" in refusal(tmp_path, cfg, weights("topk"))


def test_missing_keys_are_refused(tmp_path: Path) -> None:
    tensors = weights("standard")
    del tensors["b_enc"]
    message = refusal(tmp_path, v6_cfg("standard"), tensors)
    assert "sae_weights.safetensors lacks b_enc" in message
    tensors = weights("jumprelu")
    del tensors["threshold"]
    assert "threshold" in refusal(tmp_path, v6_cfg("jumprelu"), tensors)


def test_wrong_shapes_are_refused(tmp_path: Path) -> None:
    tensors = weights("standard")
    tensors["W_enc"] = tensors["W_enc"].T  # [d_sae, d_in], the nn.Linear layout SAELens does not use
    message = refusal(tmp_path, v6_cfg("standard"), tensors)
    assert "W_enc has shape (48, 16), expected (16, 48)" in message


def test_nan_weights_are_refused(tmp_path: Path) -> None:
    tensors = weights("jumprelu")
    tensors["W_dec"][3, 2] = float("nan")
    assert "W_dec holds NaN/Inf" in refusal(tmp_path, v6_cfg("jumprelu"), tensors)


def test_unexpected_tensors_and_head_index_are_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, v6_cfg("standard"), {**weights("standard"), "b_gate": torch.zeros(D_SAE)})
    assert "b_gate" in message
    cfg = v6_cfg("standard")
    cfg["metadata"]["hook_head_index"] = 3
    assert "hook_head_index" in refusal(tmp_path, cfg, weights("standard"))
    cfg = v6_cfg("standard")
    del cfg["metadata"]["hook_name"]
    assert "hook" in refusal(tmp_path, cfg, weights("standard"))


def test_corrupt_files_are_refused(tmp_path: Path) -> None:
    folder = write(tmp_path / "sae", v6_cfg("standard"), weights("standard"))
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEImportError, match="not a readable safetensors file"):
        import_sae(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAEImportError, match="not readable JSON"):
        import_sae(folder)


def test_unknown_layout_and_wrong_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importers, "FORMATS", ("saelens", "sparsify"))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "weights.bin").write_bytes(b"\0")
    with pytest.raises(SAEImportError, match=r"holds no SAE in a known format \(found: weights.bin\)"):
        import_sae(tmp_path / "odd")
    folder = write(tmp_path / "sae", v6_cfg("standard"), weights("standard"))
    with pytest.raises(SAEImportError, match="holds no sparsify SAE"):
        import_sae(folder, format="sparsify")


# --- the reference against SAELens itself, where it is installed (it cannot share rsae's environment) ----------

SAELENS_LOADABLE: dict[str, tuple[dict[str, Any], str, float]] = {
    "standard": (v6_cfg("standard"), "standard", 1.0),
    "jumprelu-no-b_dec": (v6_cfg("jumprelu", apply_b_dec_to_input=False), "jumprelu", 1.0),
    "topk-rescaled": (v6_cfg("topk", rescale_acts_by_decoder_norm=True), "topk", 1.0),
    "layer_norm": (v6_cfg("standard", normalize_activations="layer_norm"), "standard", 1.0),
    "expected_average": (v6_cfg("jumprelu", normalize_activations="expected_average_only_in",
                                norm_scaling_factor=2.5), "jumprelu", 2.5),
    "pre6-topk": (pre6_cfg(activation_fn_str="topk", activation_fn_kwargs={"k": 7}), "standard", 1.0),
    "pre6-jumprelu": (pre6_cfg(architecture="jumprelu"), "jumprelu", 1.0),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", SAELENS_LOADABLE)
def test_reference_and_import_agree_with_saelens(tmp_path: Path, case: str) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    cfg, kind, scale = SAELENS_LOADABLE[case]
    tensors = weights(kind)
    if case == "topk-rescaled":
        tensors["W_dec"] = tensors["W_dec"] * (0.2 + 3 * torch.rand(D_SAE, 1))
    folder = write(tmp_path / "sae", cfg, tensors)
    sae, ref, model = sae_lens.SAE.load_from_disk(folder), Reference(cfg, tensors), import_sae(folder)
    # SAELens' load_from_disk leaves an expected_average_only_in SAE reading activations * factor.
    x = activations() * scale
    with torch.no_grad():
        codes = sae.encode(x)
        torch.testing.assert_close(ref.encode(x), codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode(x / scale), codes, rtol=1e-5, atol=1e-5)
        tolerance = 1e-4 if case == "layer_norm" else 1e-5
        torch.testing.assert_close(ref.forward(x), sae(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x / scale), sae(x) / scale, rtol=tolerance, atol=tolerance)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_folders_saelens_itself_writes(tmp_path: Path, architecture: str) -> None:
    """SAELens' trainer's `save_inference_model` (TopK: decoder norms folded, rescale flag kept) imports as what
    SAELens loads back."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata

    training_class, config_class = get_sae_training_class(architecture)
    metadata = SAEMetadata(hook_name=HOOK, model_name="gpt2", model_from_pretrained_kwargs={})
    extra = {"k": K} if architecture == "topk" else {}
    trained = training_class(config_class(d_in=D_IN, d_sae=D_SAE, metadata=metadata, **extra))
    tensors = weights(architecture)
    tensors["W_dec"] = tensors["W_dec"] * (0.2 + 3 * torch.rand(D_SAE, 1))
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(trained, name).copy_(value)
    trained.save_inference_model(tmp_path / "sae")
    sae, model = sae_lens.SAE.load_from_disk(tmp_path / "sae"), import_sae(tmp_path / "sae")
    assert model.cfg.architecture == FAMILIES_OF[architecture] and model.cfg.hook_name == HOOK
    x, z = activations(), torch.relu(torch.randn(8, D_SAE))
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(z), sae.decode(z), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), sae(x), rtol=1e-5, atol=1e-5)
        # and as the SAE in training computed it
        torch.testing.assert_close(model(x), trained(x), rtol=1e-4, atol=1e-4)
