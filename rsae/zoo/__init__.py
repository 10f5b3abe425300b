"""Trained SAEs on disk: the rsae checkpoint format (`save` / `load`)."""

from rsae.zoo.checkpoint import CheckpointError, load, save

__all__ = ["CheckpointError", "load", "save"]
