"""Rational Sparse Autoencoders: upgrade ReLU, JumpReLU and TopK SAEs with a trainable rational gate."""

from rsae.checkpoint import CheckpointError, load, save
from rsae.config import SAEConfig
from rsae.gate import RationalGate
from rsae.jumprelu_sae import JumpReLUSAE
from rsae.rational_sae import RSAE
from rsae.relu_sae import ReLUSAE
from rsae.sae import Latents, SAEOutput, SparseAutoencoder, TrainingLoss
from rsae.topk_sae import TopKSAE

__version__ = "0.1.0"

__all__ = [
    "RSAE",
    "CheckpointError",
    "JumpReLUSAE",
    "Latents",
    "RationalGate",
    "ReLUSAE",
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoder",
    "TopKSAE",
    "TrainingLoss",
    "load",
    "save",
]
