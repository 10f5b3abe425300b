"""What every format module returns, and how it says no."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
