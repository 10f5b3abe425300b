"""Activations: language models, text corpora, the activation cache and its builder, `ActivationDataModule`.

Import the modules themselves (`rsae.data.lm`, `rsae.data.cache`, `rsae.data.datamodule`, ...): this package
file imports nothing, so that reading a cache never loads Lightning or transformers.
"""
