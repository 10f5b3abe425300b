"""ActivationDataModule: coverage, shuffling, DDP disjointness, mid-epoch resume, normalisation, on-the-fly."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from rsae.data.cache import CacheError
from rsae.data.datamodule import ActivationDataModule, OnTheFly, RowStream

from helpers import tiny_lm, write_cache_from_arrays

HOOK = "blocks.0.hook_resid_post"
D = 8
SEQ_LEN, SEQS_PER_SHARD, N_SHARDS = 9, 6, 10  # 8 kept rows per sequence, 48 rows per shard


def synthetic_cache(folder: Path, n_shards: int = N_SHARDS, last_short: bool = True) -> Path:
    """Rows whose first column is their global row id (exact in float16), others a fixed scale."""
    shards, row = [], 0
    for s in range(n_shards):
        n_seq = SEQS_PER_SHARD - (3 if last_short and s == n_shards - 1 else 0)
        tokens = np.ones((n_seq, SEQ_LEN), dtype=np.int32) * (s % 50 + 1)
        tokens[:, 0] = 0  # BOS
        n = n_seq * (SEQ_LEN - 1)
        acts = np.full((n, D), 2.0, dtype=np.float32)
        acts[:, 0] = np.arange(row, row + n)
        row += n
        shards.append((tokens, {HOOK: acts}))
    write_cache_from_arrays(folder, shards, model="synthetic", dtype="float16")
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    return str(synthetic_cache(tmp_path_factory.mktemp("data") / "cache"))


def ids(batches) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(v) for b in batches for v in b[:, 0].tolist()]


def test_attributes_splits_and_full_coverage(cache):  # type: ignore[no-untyped-def]
    dm = ActivationDataModule(cache, batch_size=32, shuffle_buffer=100, val_shards=1, test_shards=1)
    assert dm.d_in == D and dm.hook_name == HOOK and dm.model_name == "synthetic"
    assert dm.train_shards == list(range(8)) and dm.test_shard_ids == [8] and dm.val_shard_ids == [9]
    epoch0 = ids(dm.train_dataloader())
    assert sorted(epoch0) == list(range(8 * 48))  # every training row once
    assert epoch0 != sorted(epoch0)  # shuffled at token level
    assert ids(dm.train_dataloader()) == epoch0  # same seed, same epoch: same order
    dm.epoch = 1  # outside a Trainer the epoch is set by hand
    assert sorted(ids(dm.train_dataloader())) == sorted(epoch0) and ids(dm.train_dataloader()) != epoch0
    assert sorted(ids(dm.val_dataloader())) == list(range(9 * 48, 9 * 48 + 24))
    assert ids(dm.test_dataloader()) == list(range(8 * 48, 9 * 48))  # evaluation is not shuffled
    # rows from one window mix several shards (token-level shuffle across shard boundaries)
    first = next(iter(dm.train_dataloader()))
    assert len({int(v) // 48 for v in first[:, 0]}) >= 2


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
@pytest.mark.parametrize("normalize", [False, True])
def test_batches_equal_the_stored_rows_converted(tmp_path, stored, normalize):  # type: ignore[no-untyped-def]
    """Every stored dtype reaches fp32 batches with its values (a bf16 cache once read back as zeros)."""
    rng = np.random.default_rng(0)
    tokens = np.ones((4, SEQ_LEN), dtype=np.int32)
    tokens[:, 0] = 0
    rows = rng.normal(size=(4 * (SEQ_LEN - 1), D)).astype(np.float32) * 3
    cache = write_cache_from_arrays(tmp_path / "c", [(tokens, {HOOK: rows})] * 3, model="m", dtype=stored)
    dm = ActivationDataModule(cache.url, batch_size=8, val_shards=1, normalize=normalize, shuffle_block=1)
    expected = cache.activations(0, HOOK).float() * dm.norm_factor
    batch = next(iter(dm.val_dataloader()))
    assert batch.dtype == torch.float32 and batch.abs().sum() > 0
    torch.testing.assert_close(batch, expected[:8], rtol=1e-6, atol=0)


def test_token_ids_and_dtype(cache):  # type: ignore[no-untyped-def]
    dm = ActivationDataModule(cache, batch_size=16, return_token_ids=True, dtype="bfloat16", val_shards=1)
    acts, tok = next(iter(dm.train_dataloader()))
    assert acts.dtype == torch.bfloat16 and tok.dtype == torch.long and acts.shape == (16, D)
    # the same rows in float32 (row ids are not exact in bf16): the bf16 batch is their rounding
    dm32 = ActivationDataModule(cache, batch_size=16, return_token_ids=True, val_shards=1)
    acts32, tok32 = next(iter(dm32.train_dataloader()))
    assert acts32.dtype == torch.float32 and torch.equal(acts, acts32.to(torch.bfloat16)) and torch.equal(tok, tok32)
    shard = acts32[:, 0].long() // 48
    assert torch.equal(tok, shard % 50 + 1)  # each row carries its own token id


def test_normalisation_factor(cache):  # type: ignore[no-untyped-def]
    dm = ActivationDataModule(cache, batch_size=64, normalize=True, val_shards=1)
    rows = torch.cat(list(dm.train_dataloader()))
    raw = rows / dm.norm_factor
    # the factor comes from the manifest's per-shard norms (computed from the float32 activations)
    assert math.isclose(rows.norm(dim=-1).mean().item(), math.sqrt(D), rel_tol=1e-3)
    assert math.isclose(dm.metadata()["norm_factor"], math.sqrt(D) / raw.norm(dim=-1).mean().item(), rel_tol=1e-3)
    assert ActivationDataModule(cache, val_shards=1).norm_factor == 1.0


def test_bad_inputs(cache, tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="exactly one"):
        ActivationDataModule()
    with pytest.raises(CacheError, match="not in the cache"):
        ActivationDataModule(cache, hook_name="blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="must leave training shards"):
        ActivationDataModule(cache, val_shards=6, test_shards=4)
    with pytest.raises(ValueError, match="batch_size"):
        ActivationDataModule(cache, batch_size=0).train_dataloader()
    with pytest.raises(CacheError, match="no activation cache"):
        ActivationDataModule(str(tmp_path / "nothing"))
    partial = tmp_path / "partial"
    synthetic_cache(partial, n_shards=3)
    manifest = partial / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(CacheError, match="incomplete"):
        ActivationDataModule(str(partial))


def test_ranks_read_disjoint_rows_covering_the_epoch(cache):  # type: ignore[no-untyped-def]
    dm = ActivationDataModule(cache, batch_size=10, val_shards=1)
    seen = []
    for world in (2, 3):
        parts = []
        for rank in range(world):
            stream = dm._stream(dm.train_shards, True, lambda: 4)
            stream.rank_fn = lambda rank=rank, world=world: (rank, world)
            parts.append(ids(stream))
        assert len({len(p) for p in parts}) == 1  # equal number of rows and batches per rank
        union = [i for p in parts for i in p]
        assert len(union) == len(set(union))  # disjoint
        assert len(set(range(432)) - set(union)) < world  # the epoch, less < world_size rows
        seen.append(union)


class Recorder(pl.LightningModule):
    """A linear autoencoder that records the row ids of every training batch it is given."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D, D)
        self.seen: list[list[int]] = []
        self.stop_at = stop_at

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.seen.append(batch[:, 0].long().tolist())
        return (self.lin(batch) - batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.log("val_mse", (self.lin(batch) - batch).pow(2).mean())

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Crash(Exception):
    pass


class SaveThenCrash(pl.Callback):
    def __init__(self, path: Path, save_at: int, crash_at: int) -> None:
        self.path, self.save_at, self.crash_at = path, save_at, crash_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)
        if trainer.global_step == self.crash_at:
            raise Crash


def trainer(tmp_path: Path, **kw) -> pl.Trainer:  # type: ignore[no-untyped-def]
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      num_sanity_val_steps=0, **kw)


@pytest.mark.parametrize("save_at", [5, 16, 21])  # mid-epoch 0, right at the epoch boundary, mid-epoch 1
def test_fit_resumes_mid_epoch_without_repeating_or_skipping(cache, tmp_path, save_at):  # type: ignore[no-untyped-def]
    def dm() -> ActivationDataModule:
        return ActivationDataModule(cache, batch_size=27, shuffle_buffer=80, val_shards=1, seed=3)

    # 432 training rows / 27 = 16 batches per epoch
    reference = Recorder()
    trainer(tmp_path, max_epochs=2).fit(reference, datamodule=dm())
    assert len(reference.seen) == 32 and sorted(sum(reference.seen[:16], [])) == list(range(432))
    assert reference.seen[:16] != reference.seen[16:]  # a new shuffle each epoch

    ckpt = tmp_path / "mid.ckpt"
    crashed = Recorder()
    with pytest.raises(Crash):
        crash = SaveThenCrash(ckpt, save_at, save_at + 3)
        trainer(tmp_path, max_epochs=2, callbacks=[crash]).fit(crashed, datamodule=dm())
    assert crashed.seen == reference.seen[: save_at + 3]
    resumed, resumed_dm = Recorder(), dm()
    trainer(tmp_path, max_epochs=2).fit(resumed, datamodule=resumed_dm, ckpt_path=ckpt)
    assert crashed.seen[:save_at] + resumed.seen == reference.seen
    state = resumed_dm.state_dict()  # what a second checkpoint would store: exact again
    assert (state["epoch"], state["rows"]) == (1, 432)


class RankRecorder(Recorder):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = str(out)

    def on_train_end(self) -> None:
        np.save(Path(self.out) / f"rank{self.global_rank}.npy", np.asarray(sum(self.seen, []), dtype=np.int64))


def test_ddp_two_cpu_processes_read_disjoint_data(cache, tmp_path):  # type: ignore[no-untyped-def]
    trainer_ = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0, default_root_dir=tmp_path)

    dm = ActivationDataModule(cache, batch_size=25, shuffle_buffer=100, val_shards=1)
    trainer_.fit(RankRecorder(tmp_path), datamodule=dm)
    rank0, rank1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    assert len(rank0) == len(rank1) == 432 // 2
    assert not set(rank0.tolist()) & set(rank1.tolist())
    assert sorted(rank0.tolist() + rank1.tolist()) == list(range(432))


def test_on_the_fly_matches_the_lm_and_splits(tmp_path):  # type: ignore[no-untyped-def]
    lm = tiny_lm(n_layers=2)
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"word{i % 37} w{i % 11}" for i in range(400)))
    spec = OnTheFly(model=lm.name, hook_name="blocks.1.hook_resid_post", corpus=str(corpus), n_tokens=640,
                    seq_len=16, sequences_per_shard=8, lm=lm, autocast_bf16=False)
    dm = ActivationDataModule(on_the_fly=spec, batch_size=32, val_shards=1, normalize=True)
    assert dm.d_in == 16 and dm.hook_name == "blocks.1.hook_resid_post" and dm.norm_factor > 0
    rows = torch.cat(list(dm.train_dataloader())) / dm.norm_factor
    assert rows.shape == (4 * 8 * 15, 16)
    tokens = dm.source.tokens[0]
    _, direct = lm.bridge.run_with_cache(tokens)
    expected = direct["blocks.1.hook_resid_post"][:, 1:].reshape(-1, 16)
    # every LM row of shard 0 appears among the shuffled rows
    dist = torch.cdist(expected, rows).min(dim=1).values
    assert dist.max() < 1e-2  # rounding of x * factor / factor
    assert isinstance(dm._train, RowStream) and len(list(dm.val_dataloader())) == math.ceil(120 / 32)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_corrupt_shard_stops_the_loader_and_is_named(tmp_path, prefetch):  # type: ignore[no-untyped-def]
    from rsae.data.cache import CorruptShardError

    folder = synthetic_cache(tmp_path / "cache", n_shards=4)
    victim = folder / "shard-00002.blocks.0.hook_resid_post.npy"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01
    victim.write_bytes(bytes(data))
    dm = ActivationDataModule(str(folder), batch_size=16, val_shards=1, prefetch=prefetch)
    with pytest.raises(CorruptShardError, match=r"shard-00002\.blocks\.0\.hook_resid_post\.npy"):
        list(dm.train_dataloader())  # with prefetch: raised in the background thread, re-raised in the consumer


def test_prefetch_yields_the_same_batches_and_is_automatic_per_device(cache):  # type: ignore[no-untyped-def]
    plain = ActivationDataModule(cache, batch_size=32, val_shards=1, normalize=True, return_token_ids=True)
    ahead = ActivationDataModule(cache, batch_size=32, val_shards=1, normalize=True, return_token_ids=True,
                                 prefetch=2)
    for (x, i), (y, j) in zip(plain.train_dataloader(), ahead.train_dataloader(), strict=True):
        assert torch.equal(x, y) and torch.equal(i, j)
    assert plain.train_dataloader().dataset.prefetch == 0  # no Trainer: nothing to overlap with

    def on(device: str) -> int:
        plain.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), global_rank=0,
                                        world_size=1, current_epoch=0, training=True)
        return plain.train_dataloader().dataset.prefetch

    assert on("cpu") == 0 and on("cuda") == 2
    assert plain.train_dataloader().pin_memory and plain.test_dataloader() == []  # cuda: pinned host batches
    on("cpu")
    assert not plain.train_dataloader().pin_memory
    with pytest.raises(ValueError, match="prefetch"):
        ActivationDataModule(cache, prefetch=-1)


@pytest.mark.parametrize("block", [1, 5, 8])
def test_shuffle_block_covers_the_epoch_and_moves_runs(cache, block):  # type: ignore[no-untyped-def]
    dm = ActivationDataModule(cache, batch_size=32, shuffle_buffer=100, val_shards=1, shuffle_block=block)
    rows = ids(dm.train_dataloader())
    assert sorted(rows) == list(range(9 * 48)) and rows != sorted(rows)
    stream = dm._stream(dm.train_shards, True, lambda: 0)
    perm = stream.permutation(0, 0, 0, 96)
    assert sorted(perm.tolist()) == list(range(96))  # a permutation of the window, in runs of `block` rows
    if 96 % block == 0:  # (otherwise the last, partial run lands anywhere)
        assert all(perm[i + 1] == perm[i] + 1 for i in range(95) if i % block != block - 1)
    with pytest.raises(ValueError, match="shuffle_block"):
        ActivationDataModule(cache, shuffle_block=0).train_dataloader()


def test_a_cache_on_a_non_local_fsspec_filesystem_is_built_and_streamed(tmp_path):  # type: ignore[no-untyped-def]
    """`memory://` stands in for a shared filesystem (S3, GCS, NFS through fsspec): `rsae cache` writes there,
    resumes there, and the DataModule streams the same batches as from a local copy of the same request."""
    import fsspec

    from rsae.data.caching import CacheRequest, build_cache

    lm = tiny_lm(n_layers=2)
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    url = f"memory://rsae-test-{tmp_path.name}/cache"
    fields = dict(model=lm.name, hooks=(HOOK,), corpus=str(corpus), n_tokens=1200, seq_len=16, sequences_per_shard=15,
                  batch_size=16, progress=False)
    remote = build_cache(CacheRequest(out=url, **fields), lm=lm, log=lambda *a: None)
    local = build_cache(CacheRequest(out=str(tmp_path / "local"), **fields), lm=lm, log=lambda *a: None)
    assert remote.manifest["shards"] == local.manifest["shards"] and not remote.store.local
    assert fsspec.filesystem("memory").exists(f"/rsae-test-{tmp_path.name}/cache/manifest.json")
    rerun = build_cache(CacheRequest(out=url, **fields), lm=lm, log=lambda *a: None)  # resumes: nothing to do
    assert rerun.manifest["shards"] == remote.manifest["shards"]
    a = ActivationDataModule(url, batch_size=32, val_shards=1, normalize=True, return_token_ids=True)
    b = ActivationDataModule(str(tmp_path / "local"), batch_size=32, val_shards=1, normalize=True,
                             return_token_ids=True)
    assert a.norm_factor == b.norm_factor and a.d_in == b.d_in == lm.d_model
    for (x, i), (y, j) in zip(a.train_dataloader(), b.train_dataloader(), strict=True):
        assert torch.equal(x, y) and torch.equal(i, j)
