"""Rational Sparse Autoencoders: upgrade ReLU, JumpReLU and TopK SAEs with a trainable rational gate.

`import rsae` loads torch, numpy and safetensors only: no Lightning, transformers or matplotlib, no change
to the environment or to warning filters. Training lives in `rsae.train`, data in `rsae.data`, evaluation
in `rsae.eval`.
"""

from rsae.nn import RSAE, JumpReLUSAE, Latents, ReLUSAE, SAEConfig, SAEOutput, SparseAutoencoder, TopKSAE, TrainingLoss
from rsae.rational import RationalGate
from rsae.zoo.checkpoint import CheckpointError, load, save
from rsae.zoo.importers import SAEImportError, import_sae

__version__ = "0.1.0"

__all__ = [
    "RSAE",
    "CheckpointError",
    "JumpReLUSAE",
    "Latents",
    "RationalGate",
    "SAEImportError",
    "ReLUSAE",
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoder",
    "TopKSAE",
    "TrainingLoss",
    "import_sae",
    "load",
    "save",
]
