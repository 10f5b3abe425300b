"""SAE families and the RSAE (torch only): config, the shared SAE shape, ReLU, JumpReLU, TopK, RSAE, registry."""

from rsae.nn.config import SAEConfig
from rsae.nn.jumprelu import JumpReLUSAE
from rsae.nn.rational_sae import RSAE
from rsae.nn.registry import build_model, model_class
from rsae.nn.relu import ReLUSAE
from rsae.nn.sae import Latents, SAEOutput, SparseAutoencoder, TrainingLoss
from rsae.nn.topk import TopKSAE

__all__ = ["RSAE", "JumpReLUSAE", "Latents", "ReLUSAE", "SAEConfig", "SAEOutput", "SparseAutoencoder", "TopKSAE",
           "TrainingLoss", "build_model", "model_class"]
