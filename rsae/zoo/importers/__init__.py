"""Importers of public SAE formats: one module per format, each turning its files into an rsae teacher.

A format module (`saelens`, `sparsify`, `dictionary_learning`, `gemma_scope`, `openai`) defines

    NAME: str                                  the format's name (`--format`)
    def detect(folder: Path) -> bool           whether the files in `folder` are in this format
    def load(folder: Path) -> Imported         the rsae config and state dict of the SAE in `folder`

and nothing else: `import_sae` finds the files (a local folder or file, `hf:REPO[/PATH][@REVISION]` through
`huggingface_hub` and the standard HF cache, or `saelens:RELEASE/SAE_ID` through SAELens' own directory),
detects the format, builds the model, and checks it (keys, shapes, finite weights). Every imported
config records where it came from in `cfg.source`: the format, the files with their sha256, and the LM
processing the teacher was trained under, which `rsae upgrade` must reproduce.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch

from rsae._io import sha256_file
from rsae.nn.registry import build_model
from rsae.nn.sae import SparseAutoencoder
from rsae.zoo.importers.base import Imported, SAEImportError, require
from rsae.zoo.importers.sources import resolve

__all__ = ["FORMATS", "Imported", "SAEImportError", "detect_format", "import_sae", "require"]

FORMATS: tuple[str, ...] = ("saelens", "sparsify", "dictionary_learning", "gemma_scope", "openai")
"""Known formats, in the order `detect` tries them."""


def format_module(name: str) -> Any:
    if name not in FORMATS:
        raise SAEImportError(f"unknown SAE format {name!r}; known formats: {', '.join(FORMATS)}")
    return importlib.import_module(f"rsae.zoo.importers.{name}")


def detect_format(folder: Path) -> str:
    """The format of the files in `folder`; SAEImportError listing what was found and the known formats."""
    for name in FORMATS:
        if format_module(name).detect(folder):
            return name
    found = sorted(p.name for p in folder.iterdir())[:20] if folder.is_dir() else [folder.name]
    raise SAEImportError(f"{folder} holds no SAE in a known format (found: {', '.join(found) or 'nothing'}); "
                         f"known formats: {', '.join(FORMATS)}; pass --format to choose one")


def import_sae(source: str | os.PathLike[str], format: str | None = None, device: str | torch.device = "cpu",
               revision: str | None = None, endpoint: str | None = None, token: str | None = None,
               ) -> SparseAutoencoder:
    """The SAE at `source` as an rsae teacher (a baseline model: relu, jumprelu or topk).

    `source`: a local folder or file, `hf:REPO_ID[/PATH][@REVISION]`, or `saelens:RELEASE/SAE_ID`.
    `format`: one of `FORMATS` (default: detected from the files)."""
    folder, where = resolve(os.fspath(source), revision=revision, endpoint=endpoint, token=token)
    name = format or detect_format(folder)
    imported = format_module(name).load(folder)
    imported.cfg.source = {"format": name, "location": where, **imported.cfg.source,
                           "files": {p.name: sha256_file(p) for p in imported.files}}
    return build_checked(imported, f"{where} ({name})").to(device)


def build_checked(imported: Imported, where: str) -> SparseAutoencoder:
    """Build the model and load the state dict, refusing missing or unexpected keys, wrong shapes or NaN/Inf."""
    try:
        model = build_model(imported.cfg)
    except ValueError as err:
        raise SAEImportError(f"{where}: {err}") from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(imported.state_dict))
    unexpected = sorted(set(imported.state_dict) - set(expected))
    if missing or unexpected:
        raise SAEImportError(f"{where}: weights do not fit a {imported.cfg.architecture} SAE: missing {missing}, "
                             f"unexpected {unexpected}")
    for key, tensor in imported.state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            want = tuple(expected[key].shape)
            raise SAEImportError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {want} for "
                                 f"d_in={imported.cfg.d_in}, d_sae={imported.cfg.d_sae}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SAEImportError(f"{where}: {key} holds NaN/Inf values; the file is corrupt or was saved mid-training")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in imported.state_dict.items()})
    return model
