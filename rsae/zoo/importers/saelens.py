"""SAELens SAE folders: `cfg.json` + `sae_weights.safetensors`, in SAELens' v6 config schema or the pre-6 one.

The weights are in SAELens' layouts, which are rsae's: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`,
`b_dec [d_in]`, and `threshold [d_sae]` for JumpReLU (`log_threshold` in older training checkpoints: exp of it).
SAELens encodes `act((norm(x) - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)` and decodes `z @ W_dec + b_dec`,
then undoes `norm`. How each SAELens setting becomes rsae's:

- architecture: v6 `standard` (ReLU), `jumprelu`, `topk` (`k`); pre-6 `standard`/`jumprelu` with `activation_fn`
  (`activation_fn_str`) `relu`, or `topk` with `activation_fn_kwargs.k`, which SAELens reads as a TopK SAE.
- JumpReLU: SAELens computes `relu(h) * (h > theta)`, rsae `h * (h > max(theta, 0))`, the same for every theta,
  so the threshold is copied as it is.
- `normalize_activations`: `layer_norm` is rsae's `input_normalization="layer_norm"`; `expected_average_only_in`
  (inputs multiplied by a constant norm scaling factor) is folded into the weights as SAELens'
  `fold_activation_norm_scaling_factor` does, so the teacher reads raw activations; other schemes are refused.
- TopK `rescale_acts_by_decoder_norm` (pre-activations times `||W_dec_i||`, codes divided by it before decoding)
  is folded into the weights, as SAELens' `_fold_norm_topk` does.
- pre-6 `finetuning_scaling_factor` (codes times a per-latent factor before decoding) is folded into `W_dec`.
- `cfg.source["lm_processing"]`: the HookedTransformer weight processing the SAE was trained under. SAELens
  (since 3.19.2, when `model_from_pretrained_kwargs` entered the SAE config) loads the LM with
  `HookedTransformer.from_pretrained_no_processing(**model_from_pretrained_kwargs)`: every option off unless
  the kwargs turn it on. A config without the key predates that and was trained under `from_pretrained`'s
  defaults: every option on.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rsae.nn.config import DTYPES, LM_PROCESSING_OPTIONS, SAEConfig
from rsae.zoo.importers.base import (
    Imported,
    SAEImportError,
    read_json,
    read_safetensors,
    require,
    resid_hook,
)

NAME = "saelens"

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
"""Where SAELens' trainer keeps the norm scaling factor of a checkpoint saved before the factor was folded."""

FAMILIES: dict[str, str] = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
"""SAELens architecture -> rsae family."""

_PRE6_RENAMES: dict[str, str] = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                                 "hook_point_layer": "hook_layer", "activation_fn_str": "activation_fn"}
_REFUSED: dict[str, str] = {
    "gated": "a gated SAE (two encoder paths) has no rsae counterpart",
    "rsae": "this is an RSAE exported by rsae; load the rsae checkpoint it came from with rsae.load, or load it "
            "in SAELens after rsae.integrations.saelens.register()",
    "transcoder": "a transcoder maps one hook point to another; rsae imports autoencoders only",
    "skip_transcoder": "a transcoder maps one hook point to another; rsae imports autoencoders only",
    "jumprelu_transcoder": "a transcoder maps one hook point to another; rsae imports autoencoders only",
}


def _folder(path: Path) -> Path:
    return path.parent if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE) else path


def detect(path: Path) -> bool:
    folder = _folder(path)
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def load(path: Path) -> Imported:
    folder = _folder(path)
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    raw = read_json(cfg_path)
    version = _version(raw)
    pre6 = version is None or _major(version) < 6
    settings = _settings(raw, pre6)
    family, k = _family(settings, pre6, cfg_path)
    tensors = read_safetensors(weights_path)
    require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), weights_path)
    dtype = _dtype(settings, tensors["W_enc"], cfg_path)
    # SAELens casts every tensor to the config's dtype before using it; folding in that dtype matches it.
    tensors = {key: t.to(getattr(torch, dtype)) for key, t in tensors.items()}
    if family == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    _fold_finetuning_scaling_factor(tensors, settings, weights_path)
    # Before the norm factor: with the file's decoder norms the codes stay those the SAE gives on its own inputs.
    if family == "topk" and settings.get("rescale_acts_by_decoder_norm"):
        _fold_decoder_norm(tensors)
    input_normalization, norm_factor = _normalization(settings, pre6, folder)
    if norm_factor is not None:  # SAELens' fold_activation_norm_scaling_factor
        tensors["W_enc"] = tensors["W_enc"] * norm_factor
        tensors["W_dec"] = tensors["W_dec"] / norm_factor
        tensors["b_dec"] = tensors["b_dec"] / norm_factor
    hook_name, model_class = _hook(settings, cfg_path)
    kwargs = settings.get("model_from_pretrained_kwargs")
    source: dict[str, Any] = {"sae_lens_version": version, "model_class_name": model_class,
                              "model_from_pretrained_kwargs": kwargs, "original_cfg": raw}
    if model_class == "HookedTransformer":
        source["lm_processing"] = lm_processing(kwargs if isinstance(kwargs, dict) else None)
    if norm_factor is not None:
        source["norm_scaling_factor_folded"] = norm_factor
    try:
        cfg = SAEConfig(d_in=settings.get("d_in"), d_sae=settings.get("d_sae"),  # type: ignore[arg-type]
                        architecture=family, k=k, hook_name=hook_name,  # type: ignore[arg-type]
                        model_name=str(settings.get("model_name") or "unknown"), dtype=dtype,
                        apply_b_dec_to_input=bool(settings.get("apply_b_dec_to_input", True)),
                        input_normalization=input_normalization, source=source)  # type: ignore[arg-type]
    except ValueError as err:
        raise SAEImportError(f"{cfg_path}: {err}") from err
    return Imported(cfg, tensors, [cfg_path, weights_path])


def lm_processing(kwargs: dict[str, Any] | None) -> dict[str, bool]:
    """The HookedTransformer processing options SAELens trained under, given the config's
    `model_from_pretrained_kwargs` (None: a config from before SAELens recorded them)."""
    default = kwargs is None
    return {option: bool((kwargs or {}).get(option, default)) for option in LM_PROCESSING_OPTIONS}


def _version(raw: dict[str, Any]) -> str | None:
    """The SAELens version that wrote the config, looked up where SAELens looks (top level, then metadata)."""
    metadata = raw.get("metadata")
    version = raw.get("sae_lens_version") or (metadata.get("sae_lens_version") if isinstance(metadata, dict) else None)
    return str(version) if version else None


def _major(version: str) -> int:
    match = re.match(r"\s*v?(\d+)", version)
    return int(match.group(1)) if match else 0


def _settings(raw: dict[str, Any], pre6: bool) -> dict[str, Any]:
    """One flat dict of the config: v6 keeps LM facts under `metadata`, pre-6 at the top level under older names."""
    metadata = raw.get("metadata")
    flat = {**raw, **(metadata if isinstance(metadata, dict) else {})}
    return {_PRE6_RENAMES.get(key, key): value for key, value in flat.items()} if pre6 else flat


def _family(settings: dict[str, Any], pre6: bool, cfg_path: Path) -> tuple[str, int | None]:
    """(rsae family, k or None), refusing what rsae cannot import."""
    architecture = settings.get("architecture", "standard")
    k = settings.get("k")
    if pre6:
        activation = settings.get("activation_fn", "relu")
        pre6_k = (settings.get("activation_fn_kwargs") or {}).get("k")
        if activation == "topk" and pre6_k is not None:
            architecture, k = "topk", pre6_k
        elif activation != "relu":
            raise SAEImportError(f"{cfg_path}: activation_fn {activation!r} (activation_fn_kwargs "
                                 f"{settings.get('activation_fn_kwargs')}) is not importable; rsae imports ReLU, "
                                 "JumpReLU and TopK (activation_fn 'topk' with activation_fn_kwargs.k) SAEs")
    if architecture not in FAMILIES:
        why = _REFUSED.get(architecture, "rsae imports SAELens' standard (ReLU), jumprelu and topk SAEs")
        raise SAEImportError(f"{cfg_path}: architecture {architecture!r} is not importable: {why}")
    family = FAMILIES[architecture]
    if family != "topk":
        return family, None
    if not (isinstance(k, int) and k > 0):
        raise SAEImportError(f"{cfg_path}: a topk SAE needs k, a positive int, got k={k!r}"
                             + ("; pre-6 configs give it as activation_fn_kwargs.k" if pre6 else ""))
    return family, k


def _dtype(settings: dict[str, Any], W_enc: Tensor, cfg_path: Path) -> str:
    """The config's dtype (SAELens runs the SAE in it), else the weights'."""
    dtype = str(settings.get("dtype") or W_enc.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise SAEImportError(f"{cfg_path}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


def _fold_finetuning_scaling_factor(tensors: dict[str, Tensor], settings: dict[str, Any], path: Path) -> None:
    """Pre-6 SAELens decodes `(z * s) @ W_dec`; `z @ (s[:, None] * W_dec)` is the same. SAELens itself dropped an
    all-ones factor that some versions saved anyway (as `scaling_factor`)."""
    key = next((k for k in ("finetuning_scaling_factor", "scaling_factor") if k in tensors), None)
    if key is None:
        return
    factor = tensors.pop(key)
    if torch.allclose(factor, torch.ones_like(factor)):
        return
    if not settings.get("finetuning_scaling_factor"):
        raise SAEImportError(f"{path} holds a {key} that is not all ones but {CONFIG_FILE} says "
                             "finetuning_scaling_factor is false; SAELens refuses this file too")
    if tuple(factor.shape) != (tensors["W_dec"].shape[0],):
        raise SAEImportError(f"{path}: {key} has shape {tuple(factor.shape)}, expected "
                             f"({tensors['W_dec'].shape[0]},), one factor per latent")
    tensors["W_dec"] = tensors["W_dec"] * factor[:, None]


def _fold_decoder_norm(tensors: dict[str, Tensor]) -> None:
    """TopK on `h * ||W_dec_i||` then decoding `z / ||W_dec_i||` is TopK with those norms moved into the encoder."""
    norms = tensors["W_dec"].norm(dim=-1)
    tensors["W_enc"] = tensors["W_enc"] * norms
    tensors["b_enc"] = tensors["b_enc"] * norms
    tensors["W_dec"] = tensors["W_dec"] / norms[:, None]


def _normalization(settings: dict[str, Any], pre6: bool, folder: Path) -> tuple[str, float | None]:
    """(rsae's input_normalization, the norm scaling factor to fold or None)."""
    scheme = settings.get("normalize_activations")
    if pre6 and isinstance(scheme, bool):
        scheme = "expected_average_only_in" if scheme else "none"
    if scheme in (None, "none"):
        return "none", None
    if scheme == "layer_norm":
        return "layer_norm", None
    if scheme == "expected_average_only_in":
        return "none", _norm_scaling_factor(settings, folder)
    raise SAEImportError(f"{folder / CONFIG_FILE}: normalize_activations={scheme!r} is not importable; rsae reads "
                         "'none', 'layer_norm' and 'expected_average_only_in' (a constant factor it folds into the "
                         "weights). Fold the normalisation into the weights in SAELens and save the SAE again")


def _norm_scaling_factor(settings: dict[str, Any], folder: Path) -> float:
    """The factor SAELens multiplies inputs by: from the trainer's `activation_scaler.json` beside the config, or a
    `norm_scaling_factor` in the config (the name SAELens' directory of pretrained SAEs gives it)."""
    factor: Any = None
    if (folder / SCALER_FILE).is_file():
        factor = read_json(folder / SCALER_FILE).get("scaling_factor")
    if factor is None:
        factor = settings.get("norm_scaling_factor")
    if factor is None:
        raise SAEImportError(
            f"{folder / CONFIG_FILE}: normalize_activations='expected_average_only_in' needs the norm scaling factor "
            f"the SAE was trained with, and neither {SCALER_FILE} nor a 'norm_scaling_factor' key in {CONFIG_FILE} "
            "gives it; SAELens lists it per release in its pretrained_saes.yaml: add it to the config as "
            "\"norm_scaling_factor\"")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise SAEImportError(f"{folder}: norm scaling factor {factor!r} is not a positive finite number")
    return float(factor)


def _hook(settings: dict[str, Any], cfg_path: Path) -> tuple[str, str]:
    """(rsae hook name, the LM class SAELens hooked)."""
    hook = settings.get("hook_name")
    if not isinstance(hook, str) or not hook:
        raise SAEImportError(f"{cfg_path} names no hook point (v6: metadata.hook_name; pre-6: hook_name or "
                             "hook_point); add the TransformerLens hook name the SAE was trained on")
    head = settings.get("hook_head_index")
    if head is not None:
        raise SAEImportError(f"{cfg_path}: the SAE reads attention head {head} of {hook} only (hook_head_index); "
                             "rsae reads whole hook points")
    model_class = str(settings.get("model_class_name") or "HookedTransformer")
    if model_class != "AutoModelForCausalLM":
        return hook, model_class
    # SAELens hooks a Hugging Face model by module name, as sparsify does.
    mapped = resid_hook(hook)
    if mapped is None:
        raise SAEImportError(f"{cfg_path}: Hugging Face module {hook!r} is not a decoder block's output "
                             "(layers.N, model.layers.N, gpt_neox.layers.N, transformer.h.N, h.N); rsae maps only "
                             "those to its hook points")
    return mapped, model_class
