"""Loader throughput: ActivationDataModule against a plain numpy memmap reader of the same cache.

    python benchmarks/bench_loader.py [--cache DIR] [--val-shards 1] [--batch 4096] [--shuffle-block 8] [--rounds 7]

Without --cache a synthetic bf16 cache (d=576, 400k tokens, ~460 MB) is written to a temp folder.
The baseline (the issue's "plain numpy memmap reader") reads each shard's memmap (opened once, outside
the timing, like the loader's) in contiguous batches and converts them to fresh float32 tensors with numpy
(bf16: the 16-bit shift; fp16: astype): no shuffle, no verification. A second reader converts with torch's
`.float()` instead, which is 3-4x faster on this machine: the stronger baseline, reported beside it. The
DataModule does its token-level shuffle (each `shuffle_buffer` window permuted in runs of `shuffle_block`
rows, gathered from the memmaps) and yields fresh float32 tensors of the same rows: as configured by
default outside a Trainer (no prefetch thread) and with `prefetch=2` (what a fit on an accelerator uses).
All are timed over the training shards, in interleaved rounds after a warm-up pass (page cache hot); the
ratios of the medians are printed and written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from rsae.data.cache import ActivationCache, from_storage  # noqa: E402
from rsae.data.datamodule import ActivationDataModule  # noqa: E402

from helpers import write_cache_from_arrays  # noqa: E402


def synthetic(folder: Path, d: int = 576, n_shards: int = 13, seqs: int = 256, seq_len: int = 128) -> str:
    rng = np.random.default_rng(0)
    shards = []
    for _ in range(n_shards):
        tokens = rng.integers(3, 49152, size=(seqs, seq_len), dtype=np.int32)
        tokens[:, 0] = 1
        acts = rng.standard_normal(((seq_len - 1) * seqs, d), dtype=np.float32)
        shards.append((tokens, {"blocks.15.hook_resid_post": acts}))
    write_cache_from_arrays(folder, shards, model="synthetic-576", dtype="bfloat16", bos_token_id=1,
                            special_token_ids=(0, 1, 2))
    return str(folder)


def open_memmaps(cache: ActivationCache, hook: str, shards: list[int]) -> list[np.ndarray]:
    return [np.load(cache.store.path(cache.shards[i]["files"][hook]["path"]), mmap_mode="r") for i in shards]


def numpy_float32(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows as float32, the numpy way: bf16 is the high half of an fp32 (a 16-bit shift)."""
    if dtype == "bfloat16":
        return np.left_shift(rows, 16, dtype=np.uint32).view(np.float32)  # a uint16 loop would shift every bit out
    return rows.astype(np.float32)


def plain_memmap(cache: ActivationCache, memmaps: list[np.ndarray], batch: int, use_torch: bool = False
                 ) -> Iterator[Tensor]:
    """Contiguous batches of each shard's memmap as fresh float32 tensors, converted by numpy (the plain
    reader) or by torch's `.float()` (`use_torch`)."""
    for mm in memmaps:
        for lo in range(0, len(mm), batch):
            if use_torch:
                yield from_storage(mm[lo: lo + batch], cache.dtype).float()
            else:
                yield torch.from_numpy(numpy_float32(mm[lo: lo + batch], cache.dtype))


def drain(batches: Iterable[Tensor]) -> int:
    return sum(x.shape[0] for x in batches)


def checksum(batches: Iterable[Tensor]) -> tuple[int, float]:
    """(rows, float64 sum of every value): equal for any order of the same rows."""
    rows, total = 0, 0.0
    for x in batches:
        rows, total = rows + x.shape[0], total + float(x.double().sum())
    return rows, total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--shuffle-buffer", type=int, default=1 << 17)
    parser.add_argument("--shuffle-block", type=int, default=8)
    parser.add_argument("--val-shards", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        url = args.cache or synthetic(Path(tmp) / "cache")
        t0 = time.perf_counter()
        dm = ActivationDataModule(url, batch_size=args.batch, shuffle_buffer=args.shuffle_buffer,
                                  val_shards=args.val_shards, shuffle_block=args.shuffle_block)
        setup_s = time.perf_counter() - t0  # includes the SHA-256 of every shard on first read? (no: lazy)
        cache, hook = dm.cache, dm.hook_name
        t0 = time.perf_counter()
        cache.verify("sha256")
        verify_s = time.perf_counter() - t0
        memmaps = open_memmaps(cache, hook, dm.train_shards)
        n_rows, total = checksum(plain_memmap(cache, memmaps, args.batch))
        loaded = checksum(dm.train_dataloader())  # warm-up (page cache hot) and a check: the same rows' values
        assert loaded[0] == n_rows and abs(loaded[1] - total) <= 1e-9 * max(abs(total), 1.0), (loaded, total)
        ahead = ActivationDataModule(url, batch_size=args.batch, shuffle_buffer=args.shuffle_buffer,
                                     val_shards=args.val_shards, shuffle_block=args.shuffle_block, prefetch=2)
        base, ours, torch_base, ours_ahead = [], [], [], []
        for r in range(args.rounds):
            dm.epoch = ahead.epoch = r
            for times, batches in ((base, lambda: plain_memmap(cache, memmaps, args.batch)),
                                   (ours, dm.train_dataloader),
                                   (torch_base, lambda: plain_memmap(cache, memmaps, args.batch, use_torch=True)),
                                   (ours_ahead, ahead.train_dataloader)):
                t0 = time.perf_counter()
                drain(batches())
                times.append(time.perf_counter() - t0)
        b, o, tb, oa = (statistics.median(t) for t in (base, ours, torch_base, ours_ahead))
        result = {"cache": args.cache or "synthetic", "model": cache.model, "hook": hook,
                  "train_shards": len(dm.train_shards), "rounds": args.rounds, "rows": n_rows, "d_in": dm.d_in,
                  "dtype": cache.dtype, "batch": args.batch,
                  "shuffle_buffer": args.shuffle_buffer, "shuffle_block": args.shuffle_block,
                  "memmap_tokens_per_s": round(n_rows / b),
                  "loader_tokens_per_s": round(n_rows / o), "ratio": round(b / o, 3),
                  "memmap_torch_float_tokens_per_s": round(n_rows / tb),
                  "ratio_vs_torch_float_reader": round(tb / o, 3),
                  "loader_prefetch2_tokens_per_s": round(n_rows / oa), "ratio_prefetch2": round(b / oa, 3),
                  "sha256_verify_s": round(verify_s, 3), "setup_s": round(setup_s, 3),
                  "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                  "load_avg_1m": round(os.getloadavg()[0], 2),
                  "memmap_s": [round(t, 4) for t in base], "loader_s": [round(t, 4) for t in ours],
                  "loader_prefetch2_s": [round(t, 4) for t in ours_ahead]}
        print(json.dumps(result, indent=1))
        print(f"loader / plain numpy memmap reader throughput ratio: {result['ratio']:.3f} (target >= 0.9); "
              f"with prefetch=2: {result['ratio_prefetch2']:.3f}; "
              f"against a reader using torch's .float(): {result['ratio_vs_torch_float_reader']:.3f}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_loader.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
