"""What every format module returns, how it says no, and the readers they share (JSON, safetensors, a
weights-only torch pickle, Hugging Face block names)."""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from rsae.nn.config import SAEConfig


class SAEImportError(ValueError):
    """Files that cannot be imported as asked; the message names the file, the key or the value, and the fix."""


@dataclass
class Imported:
    """What a format module returns: the teacher's config and state dict (rsae names, rsae layouts)."""

    cfg: SAEConfig
    state_dict: dict[str, Tensor]
    files: list[Path] = field(default_factory=list)
    """The files the weights and config were read from (hashed into `cfg.source`)."""


def require(tensors: dict[str, Any], keys: tuple[str, ...], where: Path) -> None:
    """SAEImportError naming the file and the missing keys, if any of `keys` is absent."""
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise SAEImportError(f"{where} lacks {', '.join(missing)} (it holds {', '.join(sorted(tensors)) or 'nothing'})")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path` (the format modules' config reader); SAEImportError for anything else."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SAEImportError(f"{path} is not readable JSON ({err}); re-download it") from err
    if not isinstance(data, dict):
        raise SAEImportError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor in a safetensors file, on the CPU; SAEImportError naming a truncated or corrupt file."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise SAEImportError(f"{path} is not a readable safetensors file ({err}); re-download it") from err


def torch_state_dict(path: Path) -> dict[str, Any]:
    """The dict pickled in `path`, read by `torch.load(weights_only=True)` alone: tensors, numbers, strings and
    containers of them. A pickle of anything else is refused, never unpickled (a full unpickle can run code)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise SAEImportError(f"{path} is not a readable torch file ({err}); it is truncated or corrupt: "
                                 "download it again") from err
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"refers to {found.group(1)}" if found else "holds objects other than tensors, numbers and strings"
        raise SAEImportError(f"{path}: torch.load(weights_only=True) refuses it: the pickle {what}, and rsae "
                             "never runs a full unpickle (it can execute code); if you trust the file, load it "
                             "yourself and torch.save its plain state dict of tensors") from err
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SAEImportError(f"{path} is not a readable torch file ({reason}); it is truncated or corrupt: "
                             "download it again") from err
    if not isinstance(obj, dict):
        raise SAEImportError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    return obj


_BLOCK_OUTPUT = re.compile(r"(?:layers|h|model\.layers|gpt_neox\.layers|transformer\.h)\.(\d+)")


def resid_hook(module: str) -> str | None:
    """The TransformerLens hook of a Hugging Face decoder block's output (`layers.8` -> `blocks.8.hook_resid_post`),
    or None for any other module."""
    match = _BLOCK_OUTPUT.fullmatch(module)
    return f"blocks.{match.group(1)}.hook_resid_post" if match else None
