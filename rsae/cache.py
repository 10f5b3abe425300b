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

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CACHE_DTYPES = ("bfloat16", "float16")
# Fields of the manifest that must match a resumed request exactly; anything else may be extended.
IDENTITY_FIELDS = ("model", "hooks", "dtype", "corpus", "seq_len", "sequences_per_shard", "d_model",
                   "bos_token_id", "special_token_ids")


class CacheError(ValueError):
    """A cache that cannot be used as asked; the message names the shard/file/field and the fix."""


class CorruptShardError(CacheError):
    """A shard file whose size, header, shape, dtype or SHA-256 differs from the manifest."""


class NonFiniteActivationsError(CacheError):
    """The LM produced NaN/Inf activations (refused unless `allow_nonfinite`)."""


# --- storage: fsspec where installed, plain local paths otherwise ------------------------------


def normalize_url(url: str | os.PathLike[str]) -> str:
    """`file://` and plain paths become absolute local paths; other URLs pass through for fsspec."""
    url = os.fspath(url)
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


class Store:
    """A folder of cache files behind a URL: local filesystem, or any fsspec filesystem."""

    def __init__(self, url: str | os.PathLike[str]) -> None:
        self.url = normalize_url(url)
        self.local = "://" not in self.url
        self.fs: Any = None
        if not self.local:
            try:
                import fsspec
            except ImportError as err:  # pragma: no cover - fsspec ships with most stacks
                raise CacheError(f"cache URL {self.url!r} needs fsspec (pip install fsspec)") from err
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        else:
            self.root = self.url

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def makedirs(self) -> None:
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        else:
            self.fs.makedirs(self.root, exist_ok=True)

    def exists(self, name: str) -> bool:
        return os.path.exists(self.path(name)) if self.local else self.fs.exists(self.path(name))

    def size(self, name: str) -> int:
        return os.path.getsize(self.path(name)) if self.local else int(self.fs.size(self.path(name)))

    def read_bytes(self, name: str) -> bytes:
        if self.local:
            return Path(self.path(name)).read_bytes()
        return self.fs.cat_file(self.path(name))

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write-then-rename locally (with fsync); one put on object stores, which are atomic per object."""
        if not self.local:
            self.fs.pipe_file(self.path(name), data)
            return
        target = Path(self.path(name))
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_npy(self, name: str, mmap: bool = True) -> np.ndarray:
        if self.local:
            return np.load(self.path(name), mmap_mode="r" if mmap else None, allow_pickle=False)
        return np.load(io.BytesIO(self.read_bytes(name)), allow_pickle=False)

    def sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        if self.local:
            with open(self.path(name), "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
        else:
            with self.fs.open(self.path(name), "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
        return digest.hexdigest()

    def free_bytes(self) -> int | None:
        if not self.local:
            return None
        probe = Path(self.root)
        while not probe.exists():
            probe = probe.parent
        return shutil.disk_usage(probe).free


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


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
        if verify not in ("sha256", "header", "none"):
            raise ValueError(f"verify={verify!r}: expected 'sha256', 'header' or 'none'")
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


# --- writing ------------------------------------------------------------------------------------


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
    }


def _check_identity(existing: dict[str, Any], wanted: dict[str, Any], url: str) -> None:
    diffs = [f"{k}: cache has {existing.get(k)!r}, request has {wanted[k]!r}"
             for k in IDENTITY_FIELDS if existing.get(k) != wanted[k]]
    if diffs:
        raise CacheError(
            f"refusing to mix activations: the cache at {url} was built for a different request:\n  "
            + "\n  ".join(diffs) + "\nChoose another --out folder, or delete this cache to rebuild it."
        )


def _forward_cache(lm: Any, tokens: torch.Tensor, hooks: list[str], stop: int | None, autocast_bf16: bool,
                   ) -> dict[str, torch.Tensor]:
    with torch.no_grad(), torch.autocast(device_type=lm.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        _, cache = lm.bridge.run_with_cache(tokens.to(lm.device), names_filter=lambda n: n in hooks,
                                            stop_at_layer=stop, return_cache_object=False)
    return {h: cache[h] for h in hooks}


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
    from rsae.lm import load_lm, special_mask
    from rsae.text import corpus_sequences, lm_encoder

    if request.dtype not in CACHE_DTYPES:
        raise CacheError(f"dtype={request.dtype!r}: expected one of {CACHE_DTYPES}")
    if request.n_tokens <= 0 or request.seq_len < 2 or request.sequences_per_shard <= 0 or request.batch_size <= 0:
        raise CacheError("n_tokens, sequences_per_shard and batch_size must be positive and seq_len >= 2")
    if lm is None:
        lm = load_lm(request.model, device=request.device)
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
            acts = _forward_cache(lm, batch, hooks, stop, request.autocast_bf16)
            forward_seconds += time.perf_counter() - t0
            batch_keep = keep[lo: lo + request.batch_size]
            for h in hooks:
                outputs[h].append(acts[h][batch_keep.to(acts[h].device)].float().cpu())
            progress.update(batch.numel())
        shard = _write_shard(store, index, tokens, {h: torch.cat(v) for h, v in outputs.items()}, request)
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


def _write_shard(store: Store, index: int, tokens: torch.Tensor, acts: dict[str, torch.Tensor],
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
        data = _npy_bytes(array)
        store.write_atomic(name, data)
        files[what] = {"path": name, "shape": list(array.shape), "dtype": str(array.dtype), "nbytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()}
    n_rows = int(next(iter(acts.values())).shape[0]) if acts else 0
    return {"index": index, "n_sequences": int(tokens.shape[0]), "n_rows": n_rows, "files": files,
            "mean_norm": norms, "nonfinite": nonfinite}


def write_cache_from_arrays(out: str | os.PathLike[str], shards: list[tuple[np.ndarray, dict[str, Any]]], model: str,
                            dtype: str = "float16", bos_token_id: int = 0, special_token_ids: tuple[int, ...] = (0,),
                            corpus: str = "arrays") -> ActivationCache:
    """Write a complete cache from in-memory shards `(tokens [n_seq, seq_len], {hook: acts [n_kept, d]})`
    (for importers and tests). Rows must follow the module's kept-position convention."""
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
        manifest["shards"].append(_write_shard(store, index, torch.as_tensor(tokens), tensors, request))
        store.write_atomic(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    manifest["complete"] = True
    store.write_atomic(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return ActivationCache(store.url)


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


# --- the `rsae cache` command -----------------------------------------------------------------


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="cache folder: a path, file:// or any fsspec URL")
    parser.add_argument("--model", default="smollm2-135m",
                        help="'smollm2-135m' (built in, offline), a local Hugging Face folder or a Hub name")
    parser.add_argument("--hook", dest="hooks", action="append", default=None, metavar="HOOK",
                        help="TransformerLens hook point, repeatable (default blocks.15.hook_resid_post)")
    parser.add_argument("--corpus", default="shakespeare",
                        help="'shakespeare' (built in), a .txt/.jsonl file or folder, or hf:NAME[:CONFIG][:SPLIT]")
    parser.add_argument("--n-tokens", type=int, default=100_000, help="tokens to cache, BOS positions included")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, BOS included")
    parser.add_argument("--sequences-per-shard", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per LM forward")
    parser.add_argument("--dtype", choices=CACHE_DTYPES, default="bfloat16", help="storage dtype of activations")
    parser.add_argument("--no-autocast-bf16", dest="autocast_bf16", action="store_false",
                        help="run the LM in fp32 instead of bf16 autocast")
    parser.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf activations (counted)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run_cache(args: argparse.Namespace) -> int:
    request = CacheRequest(out=args.out, model=args.model, hooks=tuple(args.hooks or ("blocks.15.hook_resid_post",)),
                           corpus=args.corpus, n_tokens=args.n_tokens, seq_len=args.seq_len,
                           sequences_per_shard=args.sequences_per_shard, batch_size=args.batch_size,
                           dtype=args.dtype, autocast_bf16=args.autocast_bf16, allow_nonfinite=args.allow_nonfinite,
                           device=args.device, progress=args.progress)
    try:
        build_cache(request)
    except (CacheError, ValueError) as err:
        print(f"rsae cache: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rsae cache", description="cache LM activations for SAE training")
    add_cache_arguments(parser)
    return run_cache(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
