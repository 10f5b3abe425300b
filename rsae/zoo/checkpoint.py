"""The rsae checkpoint: one folder per model holding `cfg.json` and `weights.safetensors`.

No pickle anywhere. A save writes a sibling temporary folder and renames it into place, so a
killed save leaves either the previous checkpoint or nothing at the target, never half a folder.
`cfg.json` records the format version and a SHA-256 of the weights, so bit rot and truncation are
caught at load time and named, instead of loading garbage.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rsae._io import atomic_folder, sha256_file
from rsae.nn.config import DTYPES, SAEConfig
from rsae.nn.registry import build_model
from rsae.nn.sae import SparseAutoencoder

FORMAT_VERSION = 1
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "weights.safetensors"
_BOOKKEEPING_KEYS = ("format_version", "weights_sha256")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file, the key and the fix."""


def save(model: SparseAutoencoder, folder: str | os.PathLike[str]) -> Path:
    """Write `model` to `folder` atomically and return the folder's path.

    An existing rsae checkpoint at `folder` is replaced; any other non-empty folder is refused."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / CONFIG_FILE).exists():
        raise FileExistsError(
            f"{folder} exists and is not an rsae checkpoint (no {CONFIG_FILE}); refusing to overwrite it. "
            "Choose an empty or new folder."
        )
    with atomic_folder(folder) as staging:
        tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        cfg = {
            "format_version": FORMAT_VERSION,
            **model.cfg.to_dict(),
            "weights_sha256": sha256_file(staging / WEIGHTS_FILE),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def load(folder: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: str | None = None,
         ) -> SparseAutoencoder:
    """Load a checkpoint written by `save`, verifying format version, checksum, keys, shapes and dtypes.

    `dtype` (e.g. "float32" for a checkpoint stored in bfloat16) casts the parameters after the checks; None keeps
    the stored dtype."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no rsae checkpoint folder at {folder}")
    cfg_dict = read_config(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing; the checkpoint is incomplete. Re-export it with rsae.save.")
    expected_sha = cfg_dict.get("weights_sha256")
    if expected_sha is not None and sha256_file(weights_path) != expected_sha:
        raise CheckpointError(
            f"{weights_path} is corrupt: its SHA-256 does not match the one recorded in {CONFIG_FILE}. "
            "Restore it from the source (re-download or re-export)."
        )
    try:
        cfg = SAEConfig.from_dict({k: v for k, v in cfg_dict.items() if k not in _BOOKKEEPING_KEYS})
        model = build_model(cfg)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {err}") from err
    model.load_state_dict(_read_weights(weights_path, model), strict=True)
    if dtype is not None and dtype != cfg.dtype:
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
        # A model built in the new dtype decides each tensor's dtype (an RSAE's gate stays fp32 in any dtype).
        cast = build_model(dataclasses.replace(cfg, dtype=dtype))
        wanted = cast.state_dict()
        cast.load_state_dict({name: t.to(wanted[name].dtype) for name, t in model.state_dict().items()})
        model = cast
    return model.to(device)


def read_config(folder: Path) -> dict[str, Any]:
    """Parse and version-check `cfg.json` without touching the weights."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; expected an rsae checkpoint folder written by rsae.save.")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the file is corrupt.") from err
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(cfg).__name__}.")
    version = cfg.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: key 'format_version' is missing or not an int; expected {FORMAT_VERSION}.")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} is newer than this rsae understands ({FORMAT_VERSION}); "
            "upgrade rsae (pip install -U rsae)."
        )
    return cfg


def _read_weights(path: Path, model: SparseAutoencoder) -> dict[str, torch.Tensor]:
    expected = model.state_dict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            found = set(f.keys())
            missing, unexpected = sorted(set(expected) - found), sorted(found - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"{path}: keys do not match a {model.cfg.architecture!r} model: "
                    f"missing {missing}, unexpected {unexpected}."
                )
            tensors = {name: f.get_tensor(name) for name in expected}
    except SafetensorError as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({err}); restore or re-export it.") from err
    for name, tensor in tensors.items():
        want = expected[name]
        if tensor.shape != want.shape:
            raise CheckpointError(
                f"{path}: key {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(want.shape)} from {CONFIG_FILE}."
            )
        if tensor.dtype != want.dtype:
            raise CheckpointError(f"{path}: key {name!r} has dtype {tensor.dtype}, expected {want.dtype}.")
    return tensors
