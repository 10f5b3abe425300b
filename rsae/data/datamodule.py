"""`ActivationDataModule`: stream LM activations to a Lightning fit, from a cache or straight from the LM.

How an epoch is read
  * The split's shards (train: all but the held-out ones; validation: the last `val_shards`; test: the
    `test_shards` before them) are put in an order: a seeded permutation per epoch for training, the
    natural order for evaluation. Their rows form one virtual sequence of N rows.
  * Under DDP (or any `world_size`) rank r reads rows [r*M, (r+1)*M) of it with M = N // world_size:
    ranks read disjoint rows, the same number of batches each, and together the whole epoch
    (less at most world_size - 1 rows).
  * Token-level shuffle: each rank's range is cut into windows of `shuffle_buffer` rows (rounded to a
    multiple of `batch_size`, spanning shard boundaries), and each window's rows are permuted, in runs of
    `shuffle_block` consecutive rows (default 8; 1 = single rows), with a generator seeded by (seed, epoch,
    rank, window). Batches are slices of that permutation, gathered from the memory-mapped shards
    (sorted inside a batch) in the stored dtype, then converted to the output dtype (and scaled).
  * Mid-epoch state: the DataModule counts the training batches Lightning actually consumes
    (`on_before_batch_transfer`, so prefetching does not count) and `state_dict()` returns
    {epoch, rows}; Lightning stores it in checkpoints and a resumed fit continues at exactly the
    next unseen row (the permutation is recomputed, not stored). If your LightningModule overrides
    `on_before_batch_transfer` itself, Lightning does not call the DataModule's and resume restarts the epoch.

Normalisation: with `normalize=True` activations are multiplied by `norm_factor` so their mean L2 norm
over the training shards is `target_norm` (default sqrt(d_in), the SAELens convention). The factor comes
from the per-shard mean norms in the cache manifest (no extra pass), is exposed as `self.norm_factor`
and in `self.metadata()`, and an SAE trained on scaled activations is turned into one for raw
activations by dividing `b_dec` and the decoder output by it (fold it into W_dec/b_dec on export).

On-the-fly mode (`on_the_fly=OnTheFly(...)`): no cache; "virtual shards" of `sequences_per_shard`
sequences are tokenised up front (cheap) and their activations computed by the LM when a window
needs them. Same splits, shuffling, DDP split and resume; the factor comes from a sample of shards.
"""

from __future__ import annotations

import math
import queue
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from rsae.data.cache import ActivationCache, CacheError, from_storage
from rsae.data.lm import hook_activations
from rsae.nn.batches import activations_of

# --- row sources ---------------------------------------------------------------------------------


class CacheRows:
    """Rows of one hook from an activation cache (memory-mapped shards)."""

    def __init__(self, cache: ActivationCache, hook: str) -> None:
        self.cache, self.hook = cache, hook
        self.shard_rows = [int(s["n_rows"]) for s in cache.shards]
        self.d_in = cache.d_model
        self.dtype = cache.dtype
        self._rows: dict[int, torch.Tensor] = {}
        self._ids: dict[int, np.ndarray] = {}

    def rows(self, shard: int) -> torch.Tensor:
        """The shard's activations as a tensor of the cache dtype over the memory map (no copy)."""
        if shard not in self._rows:
            self._rows[shard] = from_storage(self.cache.activations_array(shard, self.hook), self.dtype)
        return self._rows[shard]

    def token_ids(self, shard: int) -> np.ndarray:
        if shard not in self._ids:
            self._ids[shard] = self.cache.token_ids(shard)
        return self._ids[shard]

    def mean_norm(self, shards: list[int]) -> float:
        return self.cache.mean_norm(self.hook, shards)


@dataclass
class OnTheFly:
    """Run the LM inside the loader instead of reading a cache."""

    model: str = "smollm2-135m"
    hook_name: str = "blocks.15.hook_resid_post"
    corpus: str = "shakespeare"
    n_tokens: int = 100_000
    seq_len: int = 128
    sequences_per_shard: int = 64
    batch_size: int = 16
    autocast_bf16: bool = True
    device: str = "cpu"
    lm: Any = None
    """An already loaded `rsae.data.lm.LanguageModel` (else `model` is loaded)."""


class LMRows:
    """Rows computed by the LM on demand, one virtual shard at a time (the last one is kept)."""

    def __init__(self, spec: OnTheFly) -> None:
        from rsae.data.lm import load_lm, special_mask
        from rsae.data.text import corpus_sequences, lm_encoder

        self.spec = spec
        self.lm = spec.lm if spec.lm is not None else load_lm(spec.model, device=spec.device)
        self.hook = self.lm.check_hooks([spec.hook_name])[0]
        self._stop = self.lm.stop_layer([self.hook])
        encode, eos = lm_encoder(self.lm)
        n_seq = math.ceil(spec.n_tokens / spec.seq_len)
        tokens = list(corpus_sequences(spec.corpus, encode, spec.seq_len, self.lm.bos_token_id, eos,
                                       max_sequences=n_seq))
        if not tokens:
            raise CacheError(f"corpus {spec.corpus!r} yields no sequence of {spec.seq_len} tokens")
        all_tokens = torch.from_numpy(np.stack(tokens)).long()
        self.tokens = list(all_tokens.split(spec.sequences_per_shard))
        self.keep = [~special_mask(t, self.lm.special_token_ids) for t in self.tokens]
        self.shard_rows = [int(k.sum()) for k in self.keep]
        self.d_in = self.lm.d_model
        self.dtype = "float32"
        self.model_name = self.lm.name
        self._cached: tuple[int, torch.Tensor] | None = None

    def rows(self, shard: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != shard:
            parts = []
            for tok, keep in zip(self.tokens[shard].split(self.spec.batch_size),
                                 self.keep[shard].split(self.spec.batch_size), strict=True):
                acts = hook_activations(self.lm, tok, [self.hook], self._stop, self.spec.autocast_bf16)[self.hook]
                parts.append(acts[keep.to(acts.device)].float().cpu())
            self._cached = (shard, torch.cat(parts))
        return self._cached[1]

    def token_ids(self, shard: int) -> np.ndarray:
        return self.tokens[shard][self.keep[shard]].numpy().astype(np.int32)

    def mean_norm(self, shards: list[int]) -> float:
        sample = shards[: max(1, min(len(shards), 2))]
        norms = [np.linalg.norm(self.rows(s).double().numpy(), axis=-1) for s in sample]
        return float(np.concatenate(norms).mean())


# --- the stream ----------------------------------------------------------------------------------


class RowStream(IterableDataset):
    """Batches of rows of a split, shuffled at token level, split across ranks, resumable.

    Iterating yields `[batch_size, d_in]` tensors (or `(acts, token_ids)` with `return_token_ids`)."""

    def __init__(self, source: Any, shards: list[int], batch_size: int, shuffle: bool, shuffle_buffer: int,
                 seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32, return_token_ids: bool = False,
                 rank_fn: Callable[[], tuple[int, int]] | None = None, epoch_fn: Callable[[], int] | None = None,
                 prefetch: int = 0, shuffle_block: int = 8) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size}: expected a positive number of tokens")
        if not shards:
            raise ValueError("this split has no shards")
        if shuffle_block <= 0:
            raise ValueError(f"shuffle_block={shuffle_block}: expected a positive number of rows")
        self.shuffle_block = shuffle_block
        self.source, self.shards, self.batch_size = source, list(shards), batch_size
        self.shuffle, self.seed, self.scale, self.dtype = shuffle, seed, scale, dtype
        self.window = max(1, shuffle_buffer // batch_size) * batch_size
        self.return_token_ids = return_token_ids
        self.prefetch = prefetch
        self.rank_fn = rank_fn or _dist_rank
        self.epoch_fn = epoch_fn
        self._own_epoch = 0
        self.resume: tuple[int, int] | None = None
        """(epoch, rows already consumed on this rank): the next iteration of that epoch starts there."""
        self.rows_yielded = 0

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(self.shards)
        rng = np.random.default_rng([self.seed, epoch, 0x5A])
        return [self.shards[i] for i in rng.permutation(len(self.shards))]

    def rank_range(self, epoch: int) -> tuple[list[int], int, int]:
        """(shard order, first row, row count) of this rank's part of the epoch."""
        rank, world = self.rank_fn()
        order = self.order(epoch)
        total = sum(self.source.shard_rows[s] for s in order)
        per_rank = total // world
        return order, rank * per_rank, per_rank

    def n_batches(self, epoch: int = 0) -> int:
        return math.ceil(self.rank_range(epoch)[2] / self.batch_size)

    def __len__(self) -> int:
        return self.n_batches()

    def _segments(self, order: list[int], start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(shard, local start, local stop) pieces of the virtual rows [start, stop)."""
        offset = 0
        for shard in order:
            n = self.source.shard_rows[shard]
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                yield shard, lo - offset, hi - offset
            offset += n
            if offset >= stop:
                return

    def permutation(self, epoch: int, rank: int, window: int, n: int) -> np.ndarray:
        """The order in which window `window` (of `n` rows) of this rank is read: its rows cut into blocks of
        `shuffle_block` contiguous rows, the blocks permuted with a generator seeded by (seed, epoch, rank,
        window). With `shuffle_block=1` that is a plain row permutation."""
        rng = np.random.default_rng([self.seed, epoch, rank, window])
        r = self.shuffle_block
        if r == 1:
            return rng.permutation(n)
        n_blocks = -(-n // r)
        perm = (rng.permutation(n_blocks)[:, None] * r + np.arange(r)).ravel()
        return perm if n % r == 0 else perm[perm < n]

    def _batches(self, epoch: int, rank: int, order: list[int], first: int, count: int, skip: int, gather: _Gather
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, int]]:
        """(batch, token ids or None, rows consumed after them) from row `skip` of this rank's range on.

        Each window's permutation is cut into batches and each batch's indices are sorted (order inside a
        batch carries no information for SAE training), then the rows are gathered straight from the
        (memory-mapped) shards by `_Gather`."""
        for w_start in range((skip // self.window) * self.window, count, self.window):
            w_stop = min(w_start + self.window, count)
            pieces = list(self._segments(order, first + w_start, first + w_stop))
            starts = np.cumsum([0] + [hi - lo for _, lo, hi in pieces])
            perm = self.permutation(epoch, rank, w_start // self.window, w_stop - w_start) if self.shuffle else None
            for b in range(max(skip - w_start, 0), w_stop - w_start, self.batch_size):
                n = min(self.batch_size, w_stop - w_start - b)
                idx = np.arange(b, b + n) if perm is None else np.sort(perm[b: b + n])
                cuts = np.searchsorted(idx, starts)
                parts = [(shard, int(cuts[k]), idx[cuts[k]: cuts[k + 1]] - (starts[k] - lo))
                         for k, (shard, lo, _) in enumerate(pieces) if cuts[k] < cuts[k + 1]]
                ids = None
                if self.return_token_ids:
                    ids = np.empty(n, dtype=np.int32)
                    for shard, at, local in parts:
                        np.take(self.source.token_ids(shard), local, out=ids[at: at + len(local)], mode="clip")
                yield gather(n, parts), (torch.from_numpy(ids).long() if ids is not None else None), w_start + b + n

    def current_epoch(self) -> int:
        return self.epoch_fn() if self.epoch_fn is not None else self._own_epoch

    def __iter__(self) -> Iterator[Any]:
        epoch = self.current_epoch()
        rank, _ = self.rank_fn()
        order, first, count = self.rank_range(epoch)
        skip = 0
        if self.resume is not None and self.resume[0] == epoch:
            skip = min(self.resume[1], count)
        self.resume = None
        self.rows_yielded = skip
        gather = _Gather(self.source, self.dtype, self.scale)
        batches = self._batches(epoch, rank, order, first, count, skip, gather)
        for batch, ids, consumed in (_prefetch(batches, self.prefetch) if self.prefetch > 0 else batches):
            self.rows_yielded = consumed
            yield (batch, ids) if ids is not None else batch
        if self.epoch_fn is None:
            self._own_epoch += 1


class _Gather:
    """Rows of the shards gathered into a fresh batch of the output dtype, converted and scaled on the way.

    torch's `index_select` gathers the stored rows (in parallel, a row copy each) into a staging buffer of
    the stored dtype that this producer keeps and reuses; one conversion then writes the fresh batch. That
    is a random gather of the stored bytes on top of the conversion a sequential reader pays too
    (benchmarks/results/bench_loader.md has the figures). Without a conversion (output dtype = stored
    dtype) the rows are gathered straight into the batch."""

    def __init__(self, source: Any, dtype: torch.dtype, scale: float) -> None:
        self.source, self.dtype, self.scale = source, dtype, scale
        self.stored = getattr(torch, source.dtype)
        self.stage = torch.empty(0, source.d_in, dtype=self.stored)

    def __call__(self, n: int, parts: list[tuple[int, int, np.ndarray]]) -> torch.Tensor:
        """The batch of `n` rows: rows `local` of `shard` land at `at:at + len(local)`, for each part."""
        direct = self.dtype == self.stored
        if direct:
            out = torch.empty(n, self.source.d_in, dtype=self.stored)
        else:
            if self.stage.shape[0] < n:
                self.stage = torch.empty(n, self.source.d_in, dtype=self.stored)
            out = self.stage[:n]
        for shard, at, local in parts:
            torch.index_select(self.source.rows(shard), 0, torch.from_numpy(local), out=out[at: at + len(local)])
        if not direct:
            out = out.to(self.dtype)
        return out.mul_(self.scale) if self.scale != 1.0 else out


def _prefetch(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run `items` in a background thread, `depth` items ahead (numpy's take and ufuncs release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as err:  # handed to the consumer, raised there
            q.put(err)

    thread = threading.Thread(target=produce, daemon=True, name="rsae-loader")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def _dist_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# --- the DataModule ------------------------------------------------------------------------------


class ActivationDataModule(pl.LightningDataModule):
    """Lightning DataModule over an activation cache (or the LM itself, `on_the_fly`).

    Args:
        cache: URL/path of a cache written by `rsae cache` (None with `on_the_fly`).
        hook_name: which cached hook to read (default: the cache's only hook).
        batch_size: tokens per batch (per rank).
        shuffle_buffer: rows shuffled together (token level) per window.
        shuffle_block: the shuffle moves runs of this many consecutive rows of a window (1: single rows).
            Runs of consecutive rows make the gather cheaper than single rows (`benchmarks/bench_loader.py`)
            while each batch still draws batch_size / 8 runs from all over the window, across shards.
        prefetch: batches prepared ahead in a background thread. None (default): 2 when the Trainer runs
            on an accelerator, where the thread overlaps the device's step; 0 on CPU, where it would compete
            with the step for the same cores (`benchmarks/results/bench_loader.md`).
        val_shards / test_shards: shards held out from training (the last ones).
        seed: seeds the shard order and the shuffles (same seed, same data order).
        normalize / target_norm: scale activations to this mean L2 norm (default sqrt(d_in)).
        dtype: dtype of the yielded batches.
        return_token_ids: yield `(activations, token_ids)` instead of activations alone.
        verify: shard verification before first read: 'sha256' (default), 'header' or 'none'.
        on_the_fly: an `OnTheFly` spec: run the LM in the loader instead of reading a cache.
    """

    def __init__(self, cache: str | None = None, hook_name: str | None = None, batch_size: int = 4096,
                 shuffle_buffer: int = 1 << 17, val_shards: int = 1, test_shards: int = 0, seed: int = 0,
                 normalize: bool = False, target_norm: float | None = None, dtype: str = "float32",
                 return_token_ids: bool = False, verify: str = "sha256", on_the_fly: OnTheFly | None = None,
                 shuffle_block: int = 8, prefetch: int | None = None) -> None:
        super().__init__()
        if (cache is None) == (on_the_fly is None):
            raise ValueError("pass exactly one of cache= (a cache folder/URL) and on_the_fly= (an OnTheFly spec)")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={dtype!r}: expected 'float32', 'bfloat16' or 'float16'")
        if on_the_fly is not None:
            self.source: Any = LMRows(on_the_fly)
            self.hook_name = self.source.hook
            self.model_name = self.source.model_name
            self.cache = None
        else:
            self.cache = ActivationCache(cache, verify=verify)
            self.hook_name = self.cache.check_hook(hook_name)
            self.source = CacheRows(self.cache, self.hook_name)
            self.model_name = self.cache.model
        self.d_in: int = self.source.d_in
        n = len(self.source.shard_rows)
        if val_shards < 0 or test_shards < 0 or val_shards + test_shards >= n:
            raise ValueError(
                f"val_shards={val_shards} + test_shards={test_shards} must leave training shards: the data has {n} "
                "shards (cache more tokens or use smaller shards)"
            )
        self.train_shards = list(range(n - val_shards - test_shards))
        self.test_shard_ids = list(range(n - val_shards - test_shards, n - val_shards))
        self.val_shard_ids = list(range(n - val_shards, n))
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.shuffle_block = shuffle_block
        if prefetch is not None and prefetch < 0:
            raise ValueError(f"prefetch={prefetch}: expected None (automatic) or a number of batches >= 0")
        self.prefetch = prefetch
        self.dtype = getattr(torch, dtype)
        self.return_token_ids = return_token_ids
        self.normalize = normalize
        self.target_norm = float(target_norm) if target_norm is not None else math.sqrt(self.d_in)
        self.mean_norm = self.source.mean_norm(self.train_shards)
        self.norm_factor: float = self.target_norm / self.mean_norm if normalize and self.mean_norm > 0 else 1.0
        self._train: RowStream | None = None
        self._consumed = 0
        self._consumed_epoch = 0
        self._pending_state: dict[str, Any] | None = None
        self.epoch = 0
        """Epoch used for the shuffle outside a Trainer (inside one, `trainer.current_epoch`)."""

    def metadata(self) -> dict[str, Any]:
        """Provenance to store with a trained SAE (e.g. in `SAEConfig.extra`)."""
        return {"model_name": self.model_name, "hook_name": self.hook_name, "d_in": self.d_in,
                "norm_factor": self.norm_factor, "target_norm": self.target_norm if self.normalize else None,
                "mean_norm": self.mean_norm, "cache": self.cache.url if self.cache is not None else "on-the-fly",
                "seed": self.seed, "train_shards": len(self.train_shards)}

    def _rank(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return _dist_rank()

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def _epoch(self) -> int:
        trainer = self._trainer_or_none()
        return trainer.current_epoch if trainer is not None else self.epoch

    def _stream(self, shards: list[int], shuffle: bool, epoch_fn: Callable[[], int] | None) -> RowStream:
        return RowStream(self.source, shards, self.batch_size, shuffle, self.shuffle_buffer, self.seed,
                         self.norm_factor, self.dtype, self.return_token_ids, self._rank, epoch_fn,
                         prefetch=self._prefetch_depth(), shuffle_block=self.shuffle_block)

    def _prefetch_depth(self) -> int:
        if self.prefetch is not None:
            return self.prefetch
        return 2 if self._device_type() != "cpu" else 0

    def _device_type(self) -> str:
        trainer = self._trainer_or_none()
        return trainer.strategy.root_device.type if trainer is not None else "cpu"

    def _loader(self, stream: RowStream) -> DataLoader:
        # Pinned host batches let Lightning's non-blocking copy to a GPU overlap the step before it.
        return DataLoader(stream, batch_size=None, num_workers=0, pin_memory=self._device_type() == "cuda")

    def train_dataloader(self) -> DataLoader:
        self._train = self._stream(self.train_shards, True, self._epoch)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        return self._loader(self._train)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_shard_ids:
            return []
        return self._loader(self._stream(self.val_shard_ids, False, lambda: 0))

    def test_dataloader(self) -> DataLoader | list:
        if not self.test_shard_ids:
            return []
        return self._loader(self._stream(self.test_shard_ids, False, lambda: 0))

    # --- mid-epoch state ---------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self._trainer_or_none()
        if trainer is not None and trainer.training:
            epoch = trainer.current_epoch
            if epoch != self._consumed_epoch:
                self._consumed_epoch, self._consumed = epoch, 0
            self._consumed += _batch_rows(batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        _, world = self._rank()
        return {"epoch": self._consumed_epoch, "rows": self._consumed, "world_size": world, "seed": self.seed,
                "batch_size": self.batch_size, "norm_factor": self.norm_factor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._train is None:
            self._pending_state = dict(state)
        else:
            self._apply_state(state)

    def _apply_state(self, state: dict[str, Any]) -> None:
        _, world = self._rank()
        if state.get("seed") != self.seed or state.get("world_size") != world:
            warnings.warn(
                f"ActivationDataModule: checkpoint was taken with seed={state.get('seed')}, "
                f"world_size={state.get('world_size')}; now seed={self.seed}, world_size={world}. "
                "The interrupted epoch restarts from its beginning.", stacklevel=2)
            return
        assert self._train is not None
        self._consumed_epoch, self._consumed = int(state["epoch"]), int(state["rows"])
        self._train.resume = (self._consumed_epoch, self._consumed)


def _batch_rows(batch: Any) -> int:
    return int(activations_of(batch).shape[0])
