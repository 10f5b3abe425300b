"""`rsae cache`'s engine: run the LM over a corpus and write activation shards (format: `rsae.data.cache`).

Resumable: the manifest is rewritten atomically after every finished shard, and a rerun of the same
request continues after the last one; a request that differs in model, hooks, dtype or corpus from
the cache already at `out` is refused. NaN/Inf activations are counted and refused before a shard is
written (unless `allow_nonfinite`).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rsae._io import Store, npy_bytes
from rsae.data.cache import (
    CACHE_DTYPES,
    FORMAT_VERSION,
    IDENTITY_FIELDS,
    MANIFEST,
    ActivationCache,
    CacheError,
    NonFiniteActivationsError,
    shard_file,
    storage_dtype,
    to_storage,
)
from rsae.data.lm import hook_activations, load_lm, special_mask
from rsae.data.text import corpus_sequences, lm_encoder


@dataclass
class CacheRequest:
    out: str
    model: str = "smollm2-135m"
    hooks: tuple[str, ...] = ("blocks.15.hook_resid_post",)
    corpus: str = "shakespeare"
    n_tokens: int = 100_000
    seq_len: int = 128
    sequences_per_shard: int = 256
    batch_size: int = 16
    dtype: str = "bfloat16"
    autocast_bf16: bool = True
    allow_nonfinite: bool = False
    device: str = "cpu"
    progress: bool = True
    lm_processing: dict[str, bool] | None = None
    """HookedTransformer weight processing of the LM (`rsae.data.lm.apply_processing`); None: its own weights."""


def planned_bytes(n_sequences: int, seq_len: int, rows_per_sequence: float, d_model: int, n_hooks: int) -> int:
    """Disk use of a cache: int32 tokens plus 2-byte activations per kept row and hook."""
    return int(n_sequences * seq_len * 4 + n_sequences * rows_per_sequence * d_model * 2 * n_hooks)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _identity(request: CacheRequest, lm: Any) -> dict[str, Any]:
    return {
        "model": lm.name,
        "hooks": list(request.hooks),
        "dtype": request.dtype,
        "corpus": request.corpus,
        "seq_len": request.seq_len,
        "sequences_per_shard": request.sequences_per_shard,
        "d_model": lm.d_model,
        "bos_token_id": lm.bos_token_id,
        "special_token_ids": sorted(lm.special_token_ids),
        "lm_processing": lm.processing,
    }


def _check_identity(existing: dict[str, Any], wanted: dict[str, Any], url: str) -> None:
    diffs = [f"{k}: cache has {existing.get(k)!r}, request has {wanted[k]!r}"
             for k in IDENTITY_FIELDS if existing.get(k) != wanted[k]]
    if diffs:
        raise CacheError(
            f"refusing to mix activations: the cache at {url} was built for a different request:\n  "
            + "\n  ".join(diffs) + "\nChoose another --out folder, or delete this cache to rebuild it."
        )


def forward_throughput(lm: Any, tokens: torch.Tensor, stop: int | None, autocast_bf16: bool, repeats: int = 2) -> float:
    """Tokens/s of the LM's plain forward (no hooks) up to `stop`, the ceiling for caching."""
    tokens = tokens.to(lm.device)
    with torch.no_grad(), torch.autocast(device_type=lm.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        lm.bridge(tokens, return_type=None, stop_at_layer=stop)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            lm.bridge(tokens, return_type=None, stop_at_layer=stop)
    return repeats * tokens.numel() / (time.perf_counter() - start)


def build_cache(request: CacheRequest, lm: Any = None, log: Any = print) -> ActivationCache:
    """Cache `request.n_tokens` tokens of activations (resuming a partial cache at `request.out`)."""
    if request.dtype not in CACHE_DTYPES:
        raise CacheError(f"dtype={request.dtype!r}: expected one of {CACHE_DTYPES}")
    if request.n_tokens <= 0 or request.seq_len < 2 or request.sequences_per_shard <= 0 or request.batch_size <= 0:
        raise CacheError("n_tokens, sequences_per_shard and batch_size must be positive and seq_len >= 2")
    if lm is None:
        lm = load_lm(request.model, device=request.device, processing=request.lm_processing)
    hooks = lm.check_hooks(list(request.hooks))
    request.hooks = tuple(hooks)
    stop = lm.stop_layer(hooks)
    store = Store(request.out)
    store.makedirs()
    wanted = _identity(request, lm)

    n_sequences = math.ceil(request.n_tokens / request.seq_len)
    n_shards = math.ceil(n_sequences / request.sequences_per_shard)
    if store.exists(MANIFEST):
        manifest = json.loads(store.read_bytes(MANIFEST))
        _check_identity(manifest, wanted, store.url)
    else:
        manifest = {"format_version": FORMAT_VERSION, **wanted, "shards": []}
    manifest.update(
        storage_dtype=str(storage_dtype(request.dtype)), model_source=getattr(lm, "source", ""),
        autocast_bf16=request.autocast_bf16, n_tokens_requested=request.n_tokens, n_shards_planned=n_shards,
        complete=False, format_version=FORMAT_VERSION,
    )
    reader = ActivationCache(store.url, verify="header", require_complete=False) if manifest["shards"] else None
    if reader is not None:
        reader.manifest = manifest
        reader.verify("header")  # a damaged finished shard must be rebuilt by hand, never extended silently
    done = len(manifest["shards"])

    rows_per_seq = request.seq_len - 1
    total = planned_bytes(n_sequences, request.seq_len, rows_per_seq, lm.d_model, len(hooks))
    remaining = planned_bytes(max(n_sequences - done * request.sequences_per_shard, 0), request.seq_len,
                              rows_per_seq, lm.d_model, len(hooks))
    free = store.free_bytes()
    log(f"rsae cache: {lm.name} hooks {hooks} -> {store.url}\n"
        f"  {n_sequences} sequences x {request.seq_len} tokens = {n_sequences * request.seq_len} tokens in "
        f"{n_shards} shards ({request.dtype}); planned disk use {_human(total)} (about {_human(remaining)} still "
        f"to write{'' if free is None else f', {_human(free)} free'}); {done} shards already done")
    if free is not None and remaining > free:
        raise CacheError(f"not enough disk at {store.url}: {_human(remaining)} needed, {_human(free)} free")
    if done >= n_shards:
        manifest["complete"] = True
        store.write_atomic(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        log("  nothing to do: every shard is already cached")
        return ActivationCache(store.url, verify="header")

    store.write_atomic(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())  # the request, before any shard
    encode, eos = lm_encoder(lm)
    sequences = corpus_sequences(request.corpus, encode, request.seq_len, lm.bos_token_id, eos,
                                 max_sequences=n_sequences, start=done * request.sequences_per_shard)
    progress = _progress(total=(n_sequences - done * request.sequences_per_shard) * request.seq_len,
                         enabled=request.progress)
    start_time = time.perf_counter()
    forward_seconds = 0.0
    cached_tokens = 0
    forward_tps = None
    for index in range(done, n_shards):
        expected = min(request.sequences_per_shard, n_sequences - index * request.sequences_per_shard)
        chunk = list(_take(sequences, expected))
        if len(chunk) < expected:
            progress.close()
            got = index * request.sequences_per_shard + len(chunk)
            raise CacheError(
                f"corpus {request.corpus!r} ran out after {got} sequences of {request.seq_len} tokens; "
                "ask for fewer tokens (--n-tokens) or give a bigger corpus"
            )
        tokens = torch.from_numpy(np.stack(chunk)).long()
        if forward_tps is None:
            sample = tokens[: request.batch_size]
            forward_tps = forward_throughput(lm, sample, stop, request.autocast_bf16, repeats=1)
        keep = ~special_mask(tokens, lm.special_token_ids)
        outputs: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
        for lo in range(0, len(tokens), request.batch_size):
            batch = tokens[lo: lo + request.batch_size]
            t0 = time.perf_counter()
            acts = hook_activations(lm, batch, hooks, stop, request.autocast_bf16)
            forward_seconds += time.perf_counter() - t0
            batch_keep = keep[lo: lo + request.batch_size]
            for h in hooks:
                outputs[h].append(acts[h][batch_keep.to(acts[h].device)].float().cpu())
            progress.update(batch.numel())
        shard = write_shard(store, index, tokens, {h: torch.cat(v) for h, v in outputs.items()}, request)
        manifest["shards"].append(shard)
        store.write_atomic(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        cached_tokens += tokens.numel()
        elapsed = time.perf_counter() - start_time
        progress.set_postfix_str(f"shard {index + 1}/{n_shards}, {cached_tokens / elapsed:,.0f} tok/s")
    progress.close()
    manifest["complete"] = True
    elapsed = time.perf_counter() - start_time
    manifest.setdefault("runs", []).append({"tokens": cached_tokens, "seconds": round(elapsed, 2),
                                            "tokens_per_s": round(cached_tokens / elapsed, 1),
                                            "forward_only_tokens_per_s": round(forward_tps or 0.0, 1)})
    store.write_atomic(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    log(f"  cached {cached_tokens} tokens in {elapsed:.1f} s: {cached_tokens / elapsed:,.0f} tokens/s "
        f"(LM forward alone, up to layer {lm.n_layers if stop is None else stop}: {forward_tps or 0:,.0f} tokens/s)")
    return ActivationCache(store.url, verify="header")


def _take(iterator: Iterator[np.ndarray], n: int) -> Iterator[np.ndarray]:
    for _ in range(n):
        try:
            yield next(iterator)
        except StopIteration:
            return


def write_shard(store: Store, index: int, tokens: torch.Tensor, acts: dict[str, torch.Tensor],
                 request: CacheRequest) -> dict[str, Any]:
    files: dict[str, Any] = {}
    nonfinite: dict[str, int] = {}
    norms: dict[str, float] = {}
    arrays: dict[str, np.ndarray] = {"tokens": tokens.numpy().astype(np.int32)}
    for hook, values in acts.items():
        bad = ~torch.isfinite(values)
        count = int(bad.any(-1).sum())
        nonfinite[hook] = count
        if count and not request.allow_nonfinite:
            first = int(bad.any(-1).nonzero()[0, 0])
            raise NonFiniteActivationsError(
                f"hook {hook!r} produced NaN/Inf activations in {count} of {len(values)} kept tokens of shard {index} "
                f"(first at row {first}; the shard was not written). Check the model weights and the dtype "
                f"(--no-autocast-bf16), or pass --allow-nonfinite to keep them."
            )
        finite = values.masked_fill(bad, 0.0)
        norms[hook] = float(finite.double().norm(dim=-1).mean()) if len(values) else 0.0
        arrays[hook] = to_storage(values, request.dtype)
    for what, array in arrays.items():
        name = shard_file(index, what)
        data = npy_bytes(array)
        store.write_atomic(name, data)
        files[what] = {"path": name, "shape": list(array.shape), "dtype": str(array.dtype), "nbytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()}
    n_rows = int(next(iter(acts.values())).shape[0]) if acts else 0
    return {"index": index, "n_sequences": int(tokens.shape[0]), "n_rows": n_rows, "files": files,
            "mean_norm": norms, "nonfinite": nonfinite}


class _NoProgress:
    def update(self, n: int) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return _NoProgress()
    return tqdm(total=total, unit="tok", unit_scale=True, desc="caching", file=sys.stderr, dynamic_ncols=True)
