"""EleutherAI sparsify SAE folders: one folder per hookpoint, named after it, holding `cfg.json` + `sae.safetensors`.

sparsify's `SparseCoder` encodes `topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias), k)` and decodes
`z @ W_dec + b_dec`; `encoder.weight` is an `nn.Linear` weight, `[d_sae, d_in]`, so rsae's `W_enc` is its
transpose. rsae's TopK takes the top k first and applies the ReLU after: the two give the same codes. Where a token
has k or more positive pre-activations both keep its k largest; where it has fewer, sparsify fills the remaining
slots with zeros of the ReLU'd negatives and rsae with its largest negatives ReLU'd to zero, so the dense codes and
the reconstruction agree. They may differ only in which of several exactly tied positive values at the k-th place
is kept, which torch.topk leaves unspecified in both.

A hookpoint is a Hugging Face module name relative to the base model; the output of decoder block N (`layers.N`,
`h.N` for GPT-2, and the full names `model.layers.N`, `gpt_neox.layers.N`, `transformer.h.N`) is TransformerLens'
`blocks.N.hook_resid_post`. Other hookpoints are refused. The activations are those of the Hugging Face model as
it is, so no `lm_processing` is recorded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rsae.nn.config import DTYPES, SAEConfig
from rsae.zoo.importers.base import (
    Imported,
    SAEImportError,
    read_json,
    read_safetensors,
    require,
    resid_hook,
)

NAME = "sparsify"

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
RUN_CONFIG_FILE = "config.json"
"""The trainer's run config, beside the hookpoint folders: its `model` names the LM."""

DEFAULTS: dict[str, Any] = {"activation": "topk", "expansion_factor": 32, "num_latents": 0, "k": 32,
                            "transcode": False, "skip_connection": False}
"""`SparseCoderConfig`'s defaults, which sparsify's loader fills in for keys an older cfg.json lacks."""



def _is_hookpoint(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def _hookpoints(folder: Path) -> list[Path]:
    return sorted((child for child in folder.iterdir() if child.is_dir() and _is_hookpoint(child)),
                  key=lambda child: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", child.name)])


def _folder(path: Path) -> Path:
    return path.parent if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE) else path


def detect(path: Path) -> bool:
    folder = _folder(path)
    return folder.is_dir() and (_is_hookpoint(folder) or bool(_hookpoints(folder)))


def load(path: Path) -> Imported:
    folder = _hookpoint_folder(_folder(path))
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    raw = read_json(cfg_path)
    settings = {**DEFAULTS, **raw}
    _refuse_unsupported(settings, cfg_path)
    tensors = read_safetensors(weights_path)
    require(tensors, KEYS, weights_path)
    extra = sorted(set(tensors) - set(KEYS))
    if extra:
        raise SAEImportError(f"{weights_path} holds {', '.join(extra)}, which a sparsify SAE does not have"
                             + (" (W_skip: a skip connection, which rsae's SAEs lack)" if "W_skip" in extra else ""))
    encoder = tensors["encoder.weight"]
    if encoder.ndim != 2:
        raise SAEImportError(f"{weights_path}: encoder.weight has shape {tuple(encoder.shape)}, expected "
                             "[num_latents, d_in]")
    d_in = settings.get("d_in", encoder.shape[1])
    # sparsify sizes the dictionary from the expansion factor unless num_latents is set (non-zero).
    d_sae = settings["num_latents"] or (d_in * settings["expansion_factor"] if isinstance(d_in, int) else None)
    # sparsify builds the whole module in the dtype of the file's first tensor.
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise SAEImportError(f"{weights_path} holds {dtype} weights; rsae stores {', '.join(DTYPES)}")
    hook_name = resid_hook(folder.name)
    if hook_name is None:
        raise SAEImportError(f"{folder}: hookpoint {folder.name!r} is not a decoder block's output (layers.N, h.N, "
                             "model.layers.N, gpt_neox.layers.N, transformer.h.N); rsae maps only those to its hook "
                             "points. Pass the folder of a block-output hookpoint")
    try:
        cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=settings["k"],  # type: ignore[arg-type]
                        hook_name=hook_name, model_name=_model_name(folder.parent), dtype=dtype,
                        apply_b_dec_to_input=True, source={"hookpoint": folder.name, "original_cfg": raw})
    except ValueError as err:
        raise SAEImportError(f"{cfg_path}: {err}") from err
    state_dict = {"W_enc": encoder.T.contiguous(), "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"],
                  "b_dec": tensors["b_dec"]}
    return Imported(cfg, state_dict, [cfg_path, weights_path])


def _hookpoint_folder(folder: Path) -> Path:
    """`folder` itself, or its one hookpoint folder; refuses a choice of several, listing them."""
    if _is_hookpoint(folder):
        return folder
    found = _hookpoints(folder) if folder.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise SAEImportError(f"{folder} holds no sparsify SAE ({CONFIG_FILE} + {WEIGHTS_FILE}, or folders of them)")
    names = ", ".join(child.name for child in found)
    raise SAEImportError(f"{folder} holds SAEs for {len(found)} hookpoints ({names}); import one of them, e.g. "
                         f"{found[0]}")


def _refuse_unsupported(settings: dict[str, Any], cfg_path: Path) -> None:
    if settings["activation"] != "topk":
        raise SAEImportError(f"{cfg_path}: activation {settings['activation']!r} is not importable; rsae imports "
                             "sparsify's 'topk' SAEs")
    if settings["transcode"]:
        raise SAEImportError(f"{cfg_path}: transcode is true: a transcoder predicts a module's output from its "
                             "input; rsae imports autoencoders only")
    if settings["skip_connection"]:
        raise SAEImportError(f"{cfg_path}: skip_connection is true: rsae's SAEs have no linear skip connection")


def _model_name(parent: Path) -> str:
    run_config = parent / RUN_CONFIG_FILE
    if run_config.is_file():
        try:
            model = json.loads(run_config.read_text()).get("model")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return "unknown"
        if isinstance(model, str) and model:
            return model
    return "unknown"
