"""saprmarks/dictionary_learning: a trainer folder holding `ae.pt` (a torch state dict) and `config.json`
(`{"trainer": {...}, "buffer": {...}}`), as `dictionary_learning.training.trainSAE` writes them.

The class is `config.json`'s `trainer.dict_class` (what `dictionary_learning.utils.load_dictionary` reads), else
what the keys say. Each class `load_dictionary` knows is an rsae baseline exactly (F latents, D inputs):

  AutoEncoder              relu: `encoder.weight [F, D]`, `encoder.bias`, `decoder.weight [D, F]` and `bias`, the
                           b_dec subtracted before encoding. Decoder rows are scaled to unit norm and the encoder by
                           the inverse, as `AutoEncoder.from_pretrained` does by default: the same reconstructions,
                           and codes in the units the library hands out.
  AutoEncoderNew           relu without the subtraction (`apply_b_dec_to_input=False`); b_dec is `decoder.bias`.
  GatedAutoEncoder         jumprelu: with `h = e^r_mag * W (x - b_dec) + mag_bias`, the gate `W (x - b_dec) + gate_bias
                           > 0` is `h > mag_bias - e^r_mag * gate_bias`, a per-latent threshold (Rajamanoharan et al.
                           2024), and the library's ReLU(h) on that support is rsae's h where `h > max(theta, 0)`.
  JumpReluAutoEncoder      jumprelu in rsae's own layout (`W_enc [D, F]`, `W_dec [F, D]`). It encodes
                           `x @ W_enc + b_enc` (`apply_b_dec_to_input` is False in the library) and keeps
                           `ReLU(h * (h > threshold))`, which is rsae's `h > max(threshold, 0)`.
  AutoEncoderTopK          topk with k: its `encode` keeps the k largest ReLU'd pre-activations of each token. The
                           threshold it also tracks applies only on request (`use_threshold=True`), so it goes to
                           `cfg.source["inference_threshold"]`, not into the model.
  BatchTopKSAE,            jumprelu with one threshold for every latent. Their `encode` (so `forward`) keeps
  MatryoshkaBatchTopKSAE   `ReLU(h) * (ReLU(h) > theta)` with the scalar theta tracked in training: a JumpReLU rule,
                           which rsae reproduces token by token, where a per-token top-k would be another SAE (batch
                           top-k, the training rule, picks k * batch latents over a whole batch). Files saved before
                           the threshold existed (no `threshold` key, the library before December 2024) encoded by
                           batch top-k, which no per-token model matches; they become topk with the same k, the
                           per-token rule of the same mean L0. A threshold of -1 (never set: saved before
                           `threshold_start_step`) is refused: the library would then keep every positive latent.

Hook and LM come from `trainer.layer` and `trainer.lm_name`: the output of layer L (`buffer.io == "out"`, submodule
`resid_post_layer_L` or unnamed) is `blocks.L.hook_resid_post`; any other submodule is recorded as unknown. The
library reads the Hugging Face model through nnsight as it is (`lm_processing` None). `trainSAE` folds the
activation normalisation factor into the weights before it saves, so they are in raw units; an `ae.pt` holding the
mid-training backup (`step`, `ae`, `optimizer`) is not folded and is refused. `ae.pt` is a pickle: it is read with
`torch.load(weights_only=True)` only, never unpickled in full.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rsae.nn.config import SAEConfig
from rsae.zoo.importers.base import (
    Imported,
    SAEImportError,
    read_json,
    require,
    torch_state_dict,
)

NAME = "dictionary_learning"
WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
_WEIGHTS_NAME = re.compile(r"ae(_\d+)?\.pt")
"""`ae.pt`, or `ae_<step>.pt` in the trainer's `checkpoints/` folder."""


class _Mapped(NamedTuple):
    """One dictionary_learning class read as an rsae baseline."""

    architecture: str
    state_dict: dict[str, Tensor]
    options: dict[str, Any]
    """Further SAEConfig fields (k, apply_b_dec_to_input)."""
    notes: dict[str, Any]
    """What `cfg.source` should say about the mapping."""


def _autoencoder(t: dict[str, Tensor], trainer: dict[str, Any], where: Path) -> _Mapped:
    W_dec = t["decoder.weight"].T
    norms = W_dec.norm(dim=-1)
    # A zero decoder row contributes nothing at any scale; leaving it unscaled avoids 0/0 where the library
    # would produce NaN.
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    state = {"W_enc": t["encoder.weight"].T * norms, "b_enc": t["encoder.bias"] * norms,
             "W_dec": W_dec / norms[:, None], "b_dec": t["bias"]}
    return _Mapped("relu", state, {}, {"decoder_normalized": True})


def _autoencoder_new(t: dict[str, Tensor], trainer: dict[str, Any], where: Path) -> _Mapped:
    state = {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].T,
             "b_dec": t["decoder.bias"]}
    return _Mapped("relu", state, {"apply_b_dec_to_input": False}, {})


def _gated(t: dict[str, Tensor], trainer: dict[str, Any], where: Path) -> _Mapped:
    scale = t["r_mag"].exp()
    state = {"W_enc": t["encoder.weight"].T * scale, "b_enc": t["mag_bias"], "W_dec": t["decoder.weight"].T,
             "b_dec": t["decoder_bias"], "threshold": t["mag_bias"] - scale * t["gate_bias"]}
    return _Mapped("jumprelu", state, {}, {})


def _jumprelu(t: dict[str, Tensor], trainer: dict[str, Any], where: Path) -> _Mapped:
    state = {key: t[key] for key in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    return _Mapped("jumprelu", state, {"apply_b_dec_to_input": False}, {})


def _linear_topk_state(t: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].T,
            "b_dec": t["b_dec"]}


def _topk(t: dict[str, Tensor], trainer: dict[str, Any], where: Path) -> _Mapped:
    theta = _scalar(t, "threshold", where) if "threshold" in t else -1.0
    notes = {"inference_threshold": theta} if theta >= 0 else {}
    return _Mapped("topk", _linear_topk_state(t), {"k": _k(t, trainer, where)}, notes)


def _batch_topk(t: dict[str, Tensor], trainer: dict[str, Any], where: Path) -> _Mapped:
    return _thresholded(_linear_topk_state(t), t, trainer, where)


def _matryoshka(t: dict[str, Tensor], trainer: dict[str, Any], where: Path) -> _Mapped:
    # The library activates every group once loaded (`active_groups = len(group_sizes)`): no latent is masked.
    mapped = _thresholded({key: t[key] for key in ("W_enc", "b_enc", "W_dec", "b_dec")}, t, trainer, where)
    return mapped._replace(notes={**mapped.notes, "group_sizes": t["group_sizes"].tolist()})


def _thresholded(state: dict[str, Tensor], t: dict[str, Tensor], trainer: dict[str, Any], where: Path) -> _Mapped:
    """BatchTopK's inference rule: a jumprelu with one threshold for all latents (see the module docstring)."""
    k = _k(t, trainer, where)
    if "threshold" not in t:
        return _Mapped("topk", state, {"k": k}, {"inference": "per-token top-k (the file predates the library's "
                                                               "inference threshold; it encoded by batch top-k)"})
    theta = _scalar(t, "threshold", where)
    if theta < 0:
        raise SAEImportError(f"{where}: threshold is {theta:g}, never set (saved before threshold_start_step), and "
                             "the library's encode would keep every positive latent; import an ae.pt saved later "
                             "in training")
    d_sae = state["W_enc"].shape[1]
    threshold = torch.full((d_sae,), theta, dtype=state["b_enc"].dtype)
    return _Mapped("jumprelu", {**state, "threshold": threshold}, {},
                   {"inference": "global threshold", "inference_threshold": theta, "k": k})


_CLASSES: dict[str, tuple[Callable[[dict[str, Tensor], dict[str, Any], Path], _Mapped], tuple[str, ...],
                          tuple[str, ...]]] = {
    "AutoEncoder": (_autoencoder, ("encoder.weight", "encoder.bias", "decoder.weight", "bias"), ()),
    "AutoEncoderNew": (_autoencoder_new, ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"), ()),
    "GatedAutoEncoder": (_gated, ("encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias",
                                  "mag_bias"), ()),
    "JumpReluAutoEncoder": (_jumprelu, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), ()),
    "AutoEncoderTopK": (_topk, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), ("k", "threshold")),
    "BatchTopKSAE": (_batch_topk, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), ("k", "threshold")),
    "MatryoshkaBatchTopKSAE": (_matryoshka, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "group_sizes"), ("k",)),
}
"""dict_class -> (reader, keys the state dict must hold, keys it may hold)."""

_MATRICES = ("encoder.weight", "decoder.weight", "W_enc", "W_dec")


def detect(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() if path.is_dir() else bool(_WEIGHTS_NAME.fullmatch(path.name))


def load(path: Path) -> Imported:
    weights, config_path = _files(path)
    config = read_json(config_path) if config_path is not None else {}
    trainer, buffer = _section(config, "trainer", config_path), _section(config, "buffer", config_path)
    tensors = torch_state_dict(weights)
    if {"ae", "optimizer"} <= set(tensors):
        raise SAEImportError(f"{weights} is trainSAE's mid-training backup (step, ae, optimizer), whose weights are "
                             "not yet rescaled to raw activations; import the ae.pt written when training finished")
    not_tensors = sorted(key for key, value in tensors.items() if not isinstance(value, Tensor))
    if not_tensors:
        raise SAEImportError(f"{weights}: {', '.join(map(str, not_tensors))} are not tensors; a dictionary_learning "
                             "ae.pt is a state dict of tensors")
    dict_class = trainer.get("dict_class") or _class_from_keys(tensors, weights)
    if not isinstance(dict_class, str) or dict_class not in _CLASSES:
        raise SAEImportError(f"{config_path}: trainer.dict_class {dict_class!r} is not one rsae imports; known: "
                             f"{', '.join(_CLASSES)}")
    reader, keys, optional = _CLASSES[dict_class]
    require(tensors, keys, weights)
    unexpected = sorted(set(tensors) - set(keys) - set(optional))
    if unexpected:
        raise SAEImportError(f"{weights}: unexpected keys {', '.join(map(str, unexpected))} (a {dict_class} state "
                             f"dict holds {', '.join(keys + optional)}); is trainer.dict_class in {CONFIG_FILE} right?")
    for key in set(_MATRICES) & set(keys):
        if tensors[key].ndim != 2:
            raise SAEImportError(f"{weights}: {key} has shape {tuple(tensors[key].shape)}, expected a matrix")
    mapped = reader(tensors, trainer, weights)
    d_in, d_sae = mapped.state_dict["W_enc"].shape
    site, site_notes = _site(trainer, buffer)
    source: dict[str, Any] = {"dict_class": dict_class, "lm_processing": None, **site_notes, **mapped.notes}
    if config:
        source["original_cfg"] = config
    try:
        cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), architecture=mapped.architecture,
                        dtype=str(mapped.state_dict["W_dec"].dtype).removeprefix("torch."), source=source,
                        **site, **mapped.options)
    except ValueError as err:
        raise SAEImportError(f"{weights}: {err}") from err
    return Imported(cfg, mapped.state_dict, [weights] + ([config_path] if config_path is not None else []))


def _files(path: Path) -> tuple[Path, Path | None]:
    """(the weights file, its trainer's config.json or None)."""
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise SAEImportError(f"{path} holds no {WEIGHTS_FILE}; a dictionary_learning trainer folder holds "
                             f"{WEIGHTS_FILE} and {CONFIG_FILE}")
    # checkpoints/ae_<step>.pt sits one folder below its trainer's config.json.
    folders = (weights.parent, weights.parent.parent) if weights.parent.name == "checkpoints" else (weights.parent,)
    config = next((folder / CONFIG_FILE for folder in folders if (folder / CONFIG_FILE).is_file()), None)
    return weights, config


def _section(config: dict[str, Any], name: str, where: Path | None) -> dict[str, Any]:
    section = config.get(name, {})
    if not isinstance(section, dict):
        raise SAEImportError(f"{where}: {name!r} must be a JSON object, found {type(section).__name__}")
    return section


def _class_from_keys(tensors: dict[str, Tensor], where: Path) -> str:
    """The class whose state dict `tensors` is, for an ae.pt without config.json."""
    keys = set(tensors)
    if "r_mag" in keys:
        return "GatedAutoEncoder"
    if "group_sizes" in keys:
        return "MatryoshkaBatchTopKSAE"
    if "W_enc" in keys:
        return "JumpReluAutoEncoder"
    if "bias" in keys:
        return "AutoEncoder"
    if "decoder.bias" in keys:
        return "AutoEncoderNew"
    if "b_dec" in keys:
        raise SAEImportError(f"{where}: an AutoEncoderTopK and a BatchTopKSAE hold the same keys but encode "
                             f"differently, and no {CONFIG_FILE} says which; put the trainer's {CONFIG_FILE} "
                             "(trainer.dict_class) next to it")
    raise SAEImportError(f"{where} is no dictionary_learning state dict (it holds "
                         f"{', '.join(sorted(map(str, keys))) or 'nothing'}); pass --format to choose another format")


def _scalar(t: dict[str, Tensor], key: str, where: Path) -> float:
    if t[key].numel() != 1:
        raise SAEImportError(f"{where}: {key} has shape {tuple(t[key].shape)}, expected a scalar")
    return float(t[key])


def _k(t: dict[str, Tensor], trainer: dict[str, Any], where: Path) -> int:
    """k from the state dict's `k` buffer and config.json's `trainer.k`, which must agree (as `from_pretrained`)."""
    from_file = int(_scalar(t, "k", where)) if "k" in t else None
    from_config = trainer.get("k")
    if from_file is not None and from_config is not None and from_file != from_config:
        raise SAEImportError(f"{where}: k is {from_file} but {CONFIG_FILE} says trainer.k={from_config!r}; one of "
                             "the two files belongs to another trainer")
    k = from_file if from_file is not None else from_config
    if not isinstance(k, int) or isinstance(k, bool):
        raise SAEImportError(f"{where} holds no k buffer and {CONFIG_FILE} no integer trainer.k; put the trainer's "
                             f"{CONFIG_FILE} next to it")
    return k


def _site(trainer: dict[str, Any], buffer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(SAEConfig fields naming the LM and hook point, notes for `cfg.source` when the hook is unknown)."""
    fields: dict[str, Any] = {}
    if isinstance(trainer.get("lm_name"), str):
        fields["model_name"] = trainer["lm_name"]
    layer, submodule, io = trainer.get("layer"), trainer.get("submodule_name"), buffer.get("io", "out")
    if isinstance(layer, int) and submodule in (None, f"resid_post_layer_{layer}") and io == "out":
        fields["hook_name"] = f"blocks.{layer}.hook_resid_post"
        return fields, {}
    return fields, {"hook_unknown": f"trainer.layer={layer!r}, trainer.submodule_name={submodule!r}, "
                                    f"buffer.io={io!r} name no residual-stream output"}
