"""Shared test helpers: tiny models and a synthetic dictionary-learning task with a known answer."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rsae._io import Store
from rsae.data.cache import FORMAT_VERSION, MANIFEST, ActivationCache, CacheError, storage_dtype
from rsae.data.caching import CacheRequest, write_shard
from rsae.data.lm import LanguageModel
from rsae.nn.config import SAEConfig
from rsae.nn.registry import build_model
from rsae.nn.sae import SparseAutoencoder, TrainingLoss

D_IN, D_SAE, K = 32, 128, 4
HOOK = "blocks.3.hook_resid_post"


def tiny_lm(n_layers: int = 2, d_model: int = 16, d_vocab: int = 64, n_ctx: int = 64, seed: int = 0,
            name: str | None = None) -> LanguageModel:
    """A random TL-native transformer for unit tests (no tokenizer: BOS is token 0)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=d_model, d_head=d_model // 2, n_heads=2, n_layers=n_layers, n_ctx=n_ctx,
                                  d_vocab=d_vocab, d_mlp=4 * d_model, act_fn="gelu", normalization_type="LN",
                                  seed=seed, model_name=name or f"tiny-{n_layers}l-{d_model}d-s{seed}")
    bridge = TransformerBridge.boot_native(cfg)
    bridge.eval()
    return LanguageModel(bridge=bridge, tokenizer=None, name=cfg.model_name, n_layers=n_layers, d_model=d_model,
                         d_vocab=d_vocab, bos_token_id=0, special_token_ids=frozenset({0}), source="native")


def tiny_hf_lm(folder: Path, n_layers: int = 2, d_model: int = 32, seed: int = 0) -> Path:
    """A random GPT-2-architecture LM with a byte-level BPE tokenizer trained on a few sentences, saved as a local
    Hugging Face folder (`load_lm(folder)` boots it through `TransformerBridge.boot_transformers`)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = ["The quick brown fox jumps over the lazy dog. " * 20, "To be, or not to be, that is the question. " * 20]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=d_model,
                                           n_layer=n_layers, n_head=2, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_cache_from_arrays(out: str | os.PathLike[str], shards: list[tuple[np.ndarray, dict[str, Any]]], model: str,
                            dtype: str = "float16", bos_token_id: int = 0, special_token_ids: tuple[int, ...] = (0,),
                            corpus: str = "arrays") -> ActivationCache:
    """Write a complete cache from in-memory shards `(tokens [n_seq, seq_len], {hook: acts [n_kept, d]})`
    (for tests and benchmarks). Rows must follow the module's kept-position convention."""
    store = Store(out)
    store.makedirs()
    if store.exists(MANIFEST):
        raise CacheError(f"{store.url} already holds a cache; refusing to overwrite it")
    hooks = list(shards[0][1])
    d_model = int(next(iter(shards[0][1].values())).shape[1])
    tokens0 = shards[0][0]
    request = CacheRequest(out=store.url, model=model, hooks=tuple(hooks), corpus=corpus, seq_len=int(tokens0.shape[1]),
                           sequences_per_shard=int(tokens0.shape[0]), dtype=dtype)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "model": model, "hooks": hooks, "dtype": dtype, "corpus": corpus,
        "seq_len": request.seq_len, "sequences_per_shard": request.sequences_per_shard, "d_model": d_model,
        "bos_token_id": bos_token_id, "special_token_ids": sorted(special_token_ids),
        "storage_dtype": str(storage_dtype(dtype)), "complete": False, "shards": [],
    }
    special = np.asarray(sorted(special_token_ids))
    for index, (tokens, acts) in enumerate(shards):
        n_kept = int((~np.isin(tokens, special)).sum())
        for hook, values in acts.items():
            if values.shape != (n_kept, d_model):
                raise CacheError(f"shard {index} hook {hook}: expected [{n_kept}, {d_model}] rows, got {values.shape}")
        tensors = {h: torch.as_tensor(np.asarray(v, dtype=np.float32)) for h, v in acts.items()}
        manifest["shards"].append(write_shard(store, index, torch.as_tensor(tokens), tensors, request))
        store.write_atomic(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    manifest["complete"] = True
    store.write_atomic(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return ActivationCache(store.url)


def make_sae(family: str, seed: int = 0, **overrides: object) -> SparseAutoencoder:
    torch.manual_seed(seed)
    fields = {"d_in": D_IN, "d_sae": D_SAE, "architecture": family, "hook_name": HOOK,
              "model_name": "synthetic", "jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.05}
    if family == "topk":
        fields["k"] = K
    fields.update(overrides)
    return build_model(SAEConfig(**fields))


def sparse_dictionary_data(n_tokens: int = 2048, n_atoms: int = 64, active: int = 3, seed: int = 0) -> Tensor:
    """x = sum of `active` random unit atoms in R^32 with coefficients in [0.5, 1.5], an offset, and noise."""
    gen = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(n_atoms, D_IN, generator=gen), dim=-1)
    chosen = torch.rand(n_tokens, n_atoms, generator=gen).topk(active, dim=-1).indices
    coefficients = torch.zeros(n_tokens, n_atoms).scatter(-1, chosen, torch.rand(n_tokens, active, generator=gen) + 0.5)
    offset = 0.5 * torch.randn(D_IN, generator=gen)
    return coefficients @ atoms + offset + 0.01 * torch.randn(n_tokens, D_IN, generator=gen)


def fraction_of_variance_unexplained(model: SparseAutoencoder, x: Tensor) -> float:
    with torch.no_grad():
        residual = (model(x) - x).pow(2).sum(-1).mean()
    return float(residual / (x - x.mean(0)).pow(2).sum(-1).mean())


def train(model: SparseAutoencoder, x: Tensor, steps: int = 300, batch: int = 256, lr: float = 3e-3,
          **loss_kwargs: object) -> TrainingLoss:
    """Adam on shuffled minibatches; returns the last step's loss."""
    # Subnormal floats turn up in these tiny CPU runs and slow them 10x or more; torch's default is off.
    torch.set_flush_denormal(True)
    try:
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(1)
        batches_per_epoch = len(x) // batch
        for step in range(steps):
            if step % batches_per_epoch == 0:
                order = torch.randperm(len(x), generator=gen)
            rows = order[(step % batches_per_epoch) * batch:][:batch]
            loss = model.training_loss(x[rows], **loss_kwargs)
            optimiser.zero_grad()
            loss.total.backward()
            optimiser.step()
    finally:
        torch.set_flush_denormal(False)
    return loss


def dictionary_cache(folder: Path, n_shards: int = 8, rows_per_shard: int = 512, row_ids: bool = False) -> Path:
    """A float16 activation cache of `sparse_dictionary_data` (hook blocks.3.hook_resid_post, d_in 32) with
    sequences of 33 tokens (BOS + 32 kept rows). With `row_ids`, column 0 holds each row's global index (exact in
    float16 up to 2048 rows)."""
    x = sparse_dictionary_data(n_tokens=n_shards * rows_per_shard, seed=0).numpy()
    if row_ids:
        x[:, 0] = np.arange(len(x))
    tokens = np.ones((rows_per_shard // 32, 33), dtype=np.int32)
    tokens[:, 0] = 0
    shards = [(tokens, {HOOK: x[s * rows_per_shard:(s + 1) * rows_per_shard]}) for s in range(n_shards)]
    write_cache_from_arrays(folder, shards, model="synthetic", dtype="float16")
    return folder


class RecordRows(pl.Callback):
    """Writes `<out>/rank<r>.json`: the column-0 values (row ids) of every training batch this rank saw and a
    hash of its final weights."""

    def __init__(self, out: str) -> None:
        self.out, self.rows = Path(out), []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.rows += [int(v) for v in batch[:, 0].tolist()]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, value in sorted(pl_module.sae.state_dict().items()):
            digest.update(name.encode() + value.detach().cpu().numpy().tobytes())
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"rows": self.rows,
                                                                              "weights": digest.hexdigest()}))


class KillAt(pl.Callback):
    """Ends the process abruptly (like `kill -9`) when training reaches `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            os._exit(3)
