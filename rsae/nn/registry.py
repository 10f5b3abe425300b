"""Architecture name -> model class, the one place that knows every model rsae can build or load."""

from __future__ import annotations

import importlib

from rsae.nn.config import ARCHITECTURES, SAEConfig
from rsae.nn.sae import SparseAutoencoder

# Imported lazily so that `rsae.nn.config` and `rsae.nn.sae` stay importable from every model module.
_MODEL_CLASSES: dict[str, tuple[str, str]] = {
    "relu": ("rsae.nn.relu", "ReLUSAE"),
    "jumprelu": ("rsae.nn.jumprelu", "JumpReLUSAE"),
    "topk": ("rsae.nn.topk", "TopKSAE"),
    "rsae": ("rsae.nn.rational_sae", "RSAE"),
}
assert set(_MODEL_CLASSES) == set(ARCHITECTURES)


def model_class(architecture: str) -> type[SparseAutoencoder]:
    if architecture not in _MODEL_CLASSES:
        raise ValueError(f"unknown architecture {architecture!r}; known architectures are {sorted(_MODEL_CLASSES)}")
    module_name, class_name = _MODEL_CLASSES[architecture]
    return getattr(importlib.import_module(module_name), class_name)


def build_model(cfg: SAEConfig) -> SparseAutoencoder:
    return model_class(cfg.architecture)(cfg)
