"""sparsify folders written from known weights in sparsify's layout (`SparseCoder.save_to_disk`: an `nn.Linear`
encoder, `W_dec`, `b_dec`; cfg.json = `SparseCoderConfig.to_dict()` + `d_in`), imported, and checked against a
reference forward pass written from `sparsify/sparse_coder.py` and `fused_encoder.py`, not from rsae's loader."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from rsae.zoo.importers import SAEImportError, import_sae
from rsae.zoo.importers.sparsify import resid_hook

D_IN, EXPANSION, K = 12, 4, 6
D_SAE = D_IN * EXPANSION


def weights(d_sae: int = D_SAE, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {"encoder.weight": torch.randn(d_sae, D_IN, generator=gen) / math.sqrt(D_IN),  # nn.Linear: [out, in]
           "encoder.bias": 0.2 * torch.randn(d_sae, generator=gen),
           "W_dec": torch.randn(d_sae, D_IN, generator=gen) / math.sqrt(d_sae),
           "b_dec": torch.randn(D_IN, generator=gen)}
    return {k: v.to(dtype) for k, v in out.items()}


def sparsify_cfg(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"activation": "topk", "expansion_factor": EXPANSION, "normalize_decoder": True,
                           "num_latents": 0, "k": K, "multi_topk": False, "skip_connection": False,
                           "transcode": False, "d_in": D_IN}
    cfg.update(overrides)
    return cfg


def write(folder: Path, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae.safetensors"))
    return folder


def reference(tensors: dict[str, Tensor], x: Tensor, k: int = K) -> tuple[Tensor, Tensor]:
    """sparsify's forward: (dense codes, reconstruction). `encode` subtracts b_dec, `fused_encoder` takes
    `relu(linear(x, W, b))` then its top k, `decode` sums `top_acts * W_dec[top_indices]` and adds b_dec."""
    pre_acts = torch.relu(torch.nn.functional.linear(x - tensors["b_dec"], tensors["encoder.weight"],
                                                     tensors["encoder.bias"]))
    top_acts, top_indices = torch.topk(pre_acts, k, dim=-1, sorted=False)
    out = torch.nn.functional.embedding_bag(top_indices, tensors["W_dec"], per_sample_weights=top_acts, mode="sum")
    codes = torch.zeros_like(pre_acts).scatter_(-1, top_indices, top_acts)
    return codes, out + tensors["b_dec"]


def activations(n: int = 64, seed: int = 1) -> Tensor:
    return 1.5 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def assert_matches(model: Any, tensors: dict[str, Tensor], x: Tensor, k: int = K) -> None:
    codes, out = reference(tensors, x, k)
    torch.testing.assert_close(model.encode(x), codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    z = torch.relu(torch.randn(8, tensors["W_dec"].shape[0]))
    torch.testing.assert_close(model.decode(z), z @ tensors["W_dec"] + tensors["b_dec"])


def test_hookpoint_folder_matches_sparsify(tmp_path: Path) -> None:
    tensors = weights()
    folder = write(tmp_path / "run" / "layers.8", sparsify_cfg(), tensors)
    for model in (import_sae(folder), import_sae(folder, format="sparsify"), import_sae(folder / "sae.safetensors")):
        assert model.cfg.architecture == "topk" and model.cfg.k == K
        assert model.cfg.d_in == D_IN and model.cfg.d_sae == D_SAE
        # `layers.8` is the output of decoder block 8 (zero-based): TransformerLens' resid_post of block 8.
        assert model.cfg.hook_name == "blocks.8.hook_resid_post" and model.cfg.hook_layer == 8
        assert model.cfg.apply_b_dec_to_input is True
        assert model.cfg.source["format"] == "sparsify" and model.cfg.source["hookpoint"] == "layers.8"
        assert "lm_processing" not in model.cfg.source
        # The encoder is nn.Linear's [d_sae, d_in]: rsae holds its transpose.
        torch.testing.assert_close(model.W_enc.detach(), tensors["encoder.weight"].T)
        assert_matches(model, tensors, activations())


def test_square_encoder_is_transposed(tmp_path: Path) -> None:
    # d_sae == d_in: a missing transpose would pass every shape check and give other codes.
    tensors = weights(d_sae=D_IN)
    model = import_sae(write(tmp_path / "layers.0", sparsify_cfg(num_latents=D_IN), tensors))
    assert_matches(model, tensors, activations())


def test_num_latents_zero_means_d_in_times_expansion_factor(tmp_path: Path) -> None:
    model = import_sae(write(tmp_path / "layers.1", sparsify_cfg(num_latents=0, expansion_factor=EXPANSION), weights()))
    assert model.cfg.d_sae == D_IN * EXPANSION
    tensors = weights(d_sae=20)
    model = import_sae(write(tmp_path / "layers.2", sparsify_cfg(num_latents=20), tensors))
    assert model.cfg.d_sae == 20
    assert_matches(model, tensors, activations())


def test_a_cfg_without_d_in_reads_it_from_the_weights(tmp_path: Path) -> None:
    cfg = sparsify_cfg()
    del cfg["d_in"]
    tensors = weights()
    model = import_sae(write(tmp_path / "layers.3", cfg, tensors))
    assert model.cfg.d_in == D_IN
    assert_matches(model, tensors, activations())


def test_tokens_with_fewer_than_k_positive_pre_activations(tmp_path: Path) -> None:
    """sparsify fills the spare top-k slots with ReLU'd zeros, rsae with its largest negatives ReLU'd to zero: the
    codes and reconstructions agree."""
    tensors = weights()
    tensors["encoder.bias"] = tensors["encoder.bias"] - 2.5  # most pre-activations negative
    model = import_sae(write(tmp_path / "layers.4", sparsify_cfg(), tensors))
    x = activations()
    positive = (reference(tensors, x)[0] > 0).sum(-1)
    assert bool((positive < K).any()) and bool((positive > 0).any())
    assert_matches(model, tensors, x)


def test_dtype_comes_from_the_file(tmp_path: Path) -> None:
    tensors = weights(dtype=torch.bfloat16)
    model = import_sae(write(tmp_path / "layers.5", sparsify_cfg(), tensors))
    assert model.cfg.dtype == "bfloat16" and model.dtype == torch.bfloat16
    assert torch.equal(model.W_enc.detach(), tensors["encoder.weight"].T)


@pytest.mark.parametrize("hookpoint,hook", [
    ("layers.0", "blocks.0.hook_resid_post"), ("layers.11", "blocks.11.hook_resid_post"),
    ("h.3", "blocks.3.hook_resid_post"), ("model.layers.7", "blocks.7.hook_resid_post"),
    ("gpt_neox.layers.3", "blocks.3.hook_resid_post"), ("transformer.h.10", "blocks.10.hook_resid_post"),
    ("layers.8.mlp", None), ("embed_tokens", None), ("h.3.attn", None), ("layers.x", None), ("xlayers.2", None),
])
def test_hookpoint_mapping(hookpoint: str, hook: str | None) -> None:
    assert resid_hook(hookpoint) == hook


def test_other_hookpoints_are_refused(tmp_path: Path) -> None:
    folder = write(tmp_path / "layers.8.mlp", sparsify_cfg(), weights())
    with pytest.raises(SAEImportError, match=r"hookpoint 'layers.8.mlp' is not a decoder block's output"):
        import_sae(folder)


def test_a_run_folder_of_several_hookpoints_asks_for_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for name in ("layers.10", "layers.2", "layers.9"):
        write(run / name, sparsify_cfg(), weights())
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "sae": sparsify_cfg()}))
    with pytest.raises(SAEImportError, match=r"3 hookpoints \(layers.2, layers.9, layers.10\); import one of them"):
        import_sae(run)
    model = import_sae(run / "layers.9")
    assert model.cfg.model_name == "EleutherAI/pythia-70m" and model.cfg.hook_name == "blocks.9.hook_resid_post"


def test_a_folder_of_one_hookpoint_is_that_hookpoint(tmp_path: Path) -> None:
    tensors = weights()
    write(tmp_path / "run" / "gpt_neox.layers.3", sparsify_cfg(), tensors)
    model = import_sae(tmp_path / "run")
    assert model.cfg.hook_name == "blocks.3.hook_resid_post" and model.cfg.model_name == "unknown"
    assert_matches(model, tensors, activations())


@pytest.mark.parametrize("overrides,words", [
    ({"activation": "groupmax"}, "activation 'groupmax'"),
    ({"transcode": True}, "transcoder"),
    ({"skip_connection": True}, "skip connection"),
    ({"k": 0}, "SAEConfig.k=0"),
])
def test_unsupported_configs_are_refused(tmp_path: Path, overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(SAEImportError, match=words) as err:
        import_sae(write(tmp_path / "layers.1", sparsify_cfg(**overrides), weights()))
    assert "\n" not in str(err.value) and "cfg.json" in str(err.value)


def test_bad_weights_are_refused(tmp_path: Path) -> None:
    tensors = weights()
    del tensors["encoder.bias"]
    with pytest.raises(SAEImportError, match="sae.safetensors lacks encoder.bias"):
        import_sae(write(tmp_path / "a" / "layers.1", sparsify_cfg(), tensors))
    with pytest.raises(SAEImportError, match="W_skip"):
        import_sae(write(tmp_path / "b" / "layers.1", sparsify_cfg(), {**weights(), "W_skip": torch.zeros(D_IN, D_IN)}))
    with pytest.raises(SAEImportError, match=r"W_enc has shape \(12, 20\), expected \(12, 48\)"):
        import_sae(write(tmp_path / "c" / "layers.1", sparsify_cfg(), weights(d_sae=20)))
    tensors = weights()
    tensors["W_dec"][0, 0] = float("inf")
    with pytest.raises(SAEImportError, match="W_dec holds NaN/Inf"):
        import_sae(write(tmp_path / "d" / "layers.1", sparsify_cfg(), tensors))
