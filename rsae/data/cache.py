"""The activation cache: `rsae cache` writes it, `ActivationCache` reads it.

Layout of a cache folder (any fsspec URL; plain paths and `file://` URLs are local):

    manifest.json                              written last, atomically, after every finished shard
    shard-00000.tokens.npy                     int32 [n_sequences, seq_len]: every position, BOS included
    shard-00000.blocks.15.hook_resid_post.npy  [n_rows, d_model]: one row per *kept* position
    ...

Kept positions are those whose token is not special (BOS/EOS/PAD, `manifest["special_token_ids"]`),
in row-major order of the tokens array, so `tokens[~isin(tokens, special)]` are the rows' token ids
(`ActivationCache.token_ids(shard)`). BOS positions, whose norm is ~150x the others', are never stored.

Storage dtype: `float16` is stored as numpy float16. `bfloat16` has no numpy dtype: it is stored as
its raw bits in a `uint16` array (`manifest["storage_dtype"] == "uint16"`); read it back with
`torch.from_numpy(a).view(torch.bfloat16)` (what `ActivationCache.activations` does).

The manifest records the request (model, hooks, dtype, corpus, seq_len, shard size), and for every
finished shard its row/sequence counts, per-file shape, dtype and SHA-256, the mean activation norm
per hook and the NaN/Inf count. A rerun of the same command resumes after the last finished shard;
a cache built for a different model, hook set or dtype is refused. `complete: true` marks the end.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np
import torch

from rsae._io import Store, check_verify

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CACHE_DTYPES = ("bfloat16", "float16")
# Fields of the manifest that must match a resumed request exactly; anything else may be extended.
IDENTITY_FIELDS = ("model", "hooks", "dtype", "corpus", "seq_len", "sequences_per_shard", "d_model",
                   "bos_token_id", "special_token_ids", "lm_processing")


class CacheError(ValueError):
    """A cache that cannot be used as asked; the message names the shard/file/field and the fix."""


class CorruptShardError(CacheError):
    """A shard file whose size, header, shape, dtype or SHA-256 differs from the manifest."""


class NonFiniteActivationsError(CacheError):
    """The LM produced NaN/Inf activations (refused unless `allow_nonfinite`)."""


def shard_file(index: int, what: str) -> str:
    """File name of shard `index`'s tokens (`what="tokens"`) or of one hook's activations."""
    return f"shard-{index:05d}.{what}.npy"


def storage_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(np.float16)


def to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """Activations [n, d] as the numpy array stored on disk (bf16 as uint16 bits)."""
    if dtype == "bfloat16":
        return acts.to(torch.bfloat16).contiguous().view(torch.uint16).numpy()
    return acts.to(torch.float16).contiguous().numpy()


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The stored numpy array as a torch tensor of the cache dtype (no copy for a contiguous array)."""
    with warnings.catch_warnings():  # read-only memmaps: the loaders never write into them
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(np.asarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


# --- reading ------------------------------------------------------------------------------------


class ActivationCache:
    """Read a cache: manifest, per-shard memory-mapped activations and token ids, verification.

    Every shard file is checked before its first read in this process (size, .npy header shape and
    dtype against the manifest; SHA-256 too with `verify="sha256"`, the default)."""

    def __init__(self, url: str | os.PathLike[str], verify: str = "sha256", require_complete: bool = True) -> None:
        check_verify(verify)
        self.store = Store(url)
        self.url = self.store.url
        if not self.store.exists(MANIFEST):
            raise CacheError(f"no activation cache at {self.url} ({MANIFEST} missing); build one with `rsae cache`")
        self.manifest = json.loads(self.store.read_bytes(MANIFEST))
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{self.url}: cache format {self.manifest.get('format_version')} is not {FORMAT_VERSION}")
        if require_complete and not self.manifest.get("complete"):
            raise CacheError(
                f"{self.url}: the cache is incomplete ({len(self.shards)} shards finished); rerun the same "
                "`rsae cache` command to finish it, or pass require_complete=False"
            )
        self.verify_mode = verify
        self._verified: set[tuple[int, str]] = set()
        self._special = np.asarray(sorted(self.manifest["special_token_ids"]), dtype=np.int32)

    # manifest facts
    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def n_rows(self) -> int:
        return sum(s["n_rows"] for s in self.shards)

    def check_hook(self, hook: str | None) -> str:
        if hook is None:
            if len(self.hooks) != 1:
                raise CacheError(f"{self.url} holds hooks {self.hooks}; choose one with hook_name=")
            return self.hooks[0]
        if hook not in self.hooks:
            raise CacheError(f"hook {hook!r} is not in the cache at {self.url}; it holds {self.hooks}")
        return hook

    def mean_norm(self, hook: str, shards: list[int] | None = None) -> float:
        """Mean L2 norm of the stored activations of `hook` over `shards` (all by default)."""
        chosen = [self.shards[i] for i in (range(len(self.shards)) if shards is None else shards)]
        rows = sum(s["n_rows"] for s in chosen)
        return sum(s["mean_norm"][hook] * s["n_rows"] for s in chosen) / max(rows, 1)

    # verification
    def verify_file(self, index: int, what: str, mode: str | None = None) -> None:
        """Check one shard file against the manifest, raising CorruptShardError naming it."""
        mode = mode or self.verify_mode
        if mode == "none" or (index, what) in self._verified:
            return
        info = self.shards[index]["files"][what]
        name = info["path"]
        where = f"{self.url}/{name} (shard {index}, {what})"
        if not self.store.exists(name):
            raise CorruptShardError(f"{where} is missing; rerun `rsae cache` with the same arguments to rebuild it")
        size = self.store.size(name)
        if size != info["nbytes"]:
            raise CorruptShardError(
                f"{where} is truncated or corrupt: {size} bytes on disk, {info['nbytes']} recorded in the manifest. "
                "Delete it and its manifest entry, or rebuild the cache"
            )
        try:
            array = self.store.load_npy(name, mmap=True)
        except (ValueError, OSError) as err:
            raise CorruptShardError(f"{where} has an unreadable .npy header: {err}") from err
        if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"]:
            raise CorruptShardError(
                f"{where} holds {array.dtype}{list(array.shape)}, manifest says {info['dtype']}{info['shape']}"
            )
        del array
        if mode == "sha256" and self.store.sha256(name) != info["sha256"]:
            raise CorruptShardError(f"{where} is corrupt: its SHA-256 differs from the manifest's")
        self._verified.add((index, what))

    def verify(self, mode: str = "sha256") -> None:
        """Check every file of every shard (see `verify_file`)."""
        for index, shard in enumerate(self.shards):
            for what in shard["files"]:
                self.verify_file(index, what, mode)

    # data
    def activations_array(self, index: int, hook: str) -> np.ndarray:
        """Shard `index`'s stored array for `hook` (memory-mapped where local; bf16 as uint16)."""
        self.verify_file(index, hook)
        return self.store.load_npy(self.shards[index]["files"][hook]["path"])

    def activations(self, index: int, hook: str) -> torch.Tensor:
        """Shard `index`'s activations for `hook` as a [n_rows, d_model] tensor of the cache dtype."""
        return from_storage(self.activations_array(index, hook), self.dtype)

    def tokens(self, index: int) -> np.ndarray:
        """Shard `index`'s full token sequences [n_sequences, seq_len] (int32, BOS included)."""
        self.verify_file(index, "tokens")
        return self.store.load_npy(self.shards[index]["files"]["tokens"]["path"])

    def token_ids(self, index: int) -> np.ndarray:
        """Token id of every activation row of shard `index` [n_rows] (the kept, non-special positions)."""
        tokens = np.asarray(self.tokens(index))
        return tokens[~np.isin(tokens, self._special)]
