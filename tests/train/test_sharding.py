"""FSDP2-sharded SAE training (`rsae.train.sharding`) on 2 CPU processes (gloo): against one unsharded process,
and through Lightning (`rsae fit` with ModelParallelStrategy) against DDP.

Each rank takes its half of every batch; FSDP averages the two halves' gradients. The reference takes the same
steps in one process on both halves, with the loss the mean of the two halves' losses (the mean over the whole
batch, as the halves are equal). Both runs do what `SAEModule` does around a step: an evaluation forward before it
(as validation does), b_dec set to the data mean before the first step, dead latents from firing counts over both
halves (fed to AuxK), the gradient projection and the unit-norm renormalisation of the decoder rows.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml

import rsae
from rsae.nn.config import SAEConfig
from rsae.nn.registry import build_model
from rsae.nn.sae import SparseAutoencoder
from rsae.train.sharding import copy_full_, full_state_dict, set_decoder_norm_to_unit_norm, shard_sae

from helpers import D_IN, dictionary_cache, sparse_dictionary_data

WORLD, STEPS, ROWS = 2, 8, 64  # rows per rank and step
LR, AUXK, WINDOW = 1e-2, 1 / 32, 2 * ROWS  # dead: not fired over the last step's tokens (both ranks)

CASES: dict[str, dict[str, Any]] = {
    "topk": {"architecture": "topk", "d_sae": 64, "k": 4},
    "topk-uneven": {"architecture": "topk", "d_sae": 63, "k": 4},  # W_dec rows 32 / 31, W_enc falls back to dim 0
    "relu": {"architecture": "relu", "d_sae": 64, "sparsity": 5e-3},  # training_loss nests run()
    "jumprelu": {"architecture": "jumprelu", "d_sae": 64, "sparsity": 1e-3},
    # W_dec sharded by columns: each row's norm spans both ranks, and the renormalisation must all-reduce it.
    "topk-columns": {"architecture": "topk", "d_sae": 64, "k": 4, "placement": "columns"},
    # Negative controls, which must not match: renormalising by the local shard's partial norm, and the SAE's own
    # `W_dec.data = ...` (what SAEModule called before sharding), which FSDP never sees.
    "broken-partial-norm": {"architecture": "topk", "d_sae": 64, "k": 4, "placement": "columns", "renorm": "local"},
    "broken-data-assign": {"architecture": "topk", "d_sae": 64, "k": 4, "renorm": "data"},
}
REFERENCE = {"topk-columns": "topk", "broken-partial-norm": "topk", "broken-data-assign": "topk"}


def make_sae(case: dict[str, Any]) -> SparseAutoencoder:
    cfg = SAEConfig(d_in=D_IN, d_sae=case["d_sae"], architecture=case["architecture"], k=case.get("k"),
                    jumprelu_bandwidth=0.05, jumprelu_init_threshold=0.05)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model(cfg)


def batches() -> list[torch.Tensor]:
    return list(sparse_dictionary_data(n_tokens=STEPS * WORLD * ROWS, seed=1).split(WORLD * ROWS))


def local_renorm(sae: SparseAutoencoder) -> None:
    """A wrong renormalisation: each rank normalises its shard's rows by their local (partial) norms."""
    with torch.no_grad():
        local = sae.W_dec.to_local()
        local.copy_(F.normalize(local, dim=-1))


def train(sae: SparseAutoencoder, case: dict[str, Any], rank: int | None) -> dict[str, Any]:
    """STEPS steps on every batch: rank r on its half (sharded), or rank None on both halves (the reference)."""
    optimiser = torch.optim.Adam(sae.parameters(), lr=LR)
    unit_norm = case["architecture"] != "relu"
    counters = torch.zeros(case["d_sae"], dtype=torch.long)
    losses, dead_steps = [], 0
    for t, batch in enumerate(batches()):
        halves = batch.chunk(WORLD)
        xs = halves if rank is None else [halves[rank]]
        with torch.no_grad():
            sae.run(xs[0])  # an evaluation forward (validation, the sanity check) between steps
        if t == 0:  # b_dec from the data: the mean of the halves' means (all-reduced under sharding)
            mean = torch.stack([x.mean(0) for x in xs]).sum(0)
            if rank is not None:
                dist.all_reduce(mean)
            copy_full_(sae.b_dec, mean / WORLD)
        dead = counters >= WINDOW
        dead_steps += int(dead.any())
        outs = [sae.training_loss(x, case.get("sparsity", 0.0), dead if dead.any() else None, AUXK) for x in xs]
        (sum(o.total for o in outs) / len(xs)).backward()
        if unit_norm:
            sae.remove_gradient_parallel_to_decoder_directions()
        optimiser.step()
        optimiser.zero_grad()
        if unit_norm:
            {"helper": set_decoder_norm_to_unit_norm, "local": local_renorm,
             "data": type(sae).set_decoder_norm_to_unit_norm}[case.get("renorm", "helper")](sae)
        fired = torch.zeros(case["d_sae"])
        loss = torch.zeros(())
        for o in outs:
            latents = o.output.latents
            if latents.indices is None:
                fired += (latents.values != 0).any(0).float()
            else:
                fired.index_add_(0, latents.indices[latents.values != 0], torch.ones(int((latents.values != 0).sum())))
            loss += o.total.detach() / len(xs)
        if rank is not None:
            dist.all_reduce(fired)
            dist.all_reduce(loss)
            loss /= WORLD
        counters += WORLD * ROWS
        counters[fired > 0] = 0
        losses.append(float(loss))
    return {"losses": losses, "dead_steps": dead_steps}


FSDP_CONFIG = Path(__file__).resolve().parents[2] / "rsae" / "configs" / "topk-teacher-fsdp.yaml"
STEP3 = "epoch=0-step=3.ckpt"
Runs = tuple[dict[str, Any], dict[str, Any], Path]


def lightning_config(path: Path, cache: str, run: Path, strategy: str | None = None) -> Path:
    """The shipped FSDP config (its strategy, unless `strategy`), shrunk to this machine: 2 CPU processes, a
    256-latent SAE, 6 steps of 64 rows per rank, validation (and the sanity check) between steps, checkpoints every
    3 steps."""
    config = yaml.safe_load(FSDP_CONFIG.read_text())
    trainer = config["trainer"]
    assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    if strategy is not None:
        trainer["strategy"] = strategy
    trainer.update(accelerator="cpu", devices=WORLD, max_steps=6, precision="32-true", val_check_interval=3,
                   limit_val_batches=2, default_root_dir=str(run), logger=False, enable_progress_bar=False,
                   enable_model_summary=False,
                   callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                               "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True,
                                             "every_n_train_steps": 3, "save_top_k": -1}}])
    config["model"]["init_args"].update(d_sae=256, k=4, lr=3e-3, warmup_steps=2, dead_window_tokens=2 * ROWS,
                                        export_dir=str(run / "sae"), evaluation={"ce_sequences": 0})
    config["data"].update(cache=cache, batch_size=ROWS, verify="header")
    path.write_text(yaml.safe_dump(config))
    return path


def _worker(rank: int, port: int, out: str, commands: list[list[str]]) -> None:
    """Both parts in one pair of processes (each process pays seconds of imports): the cases on plain torch, then
    the `rsae fit` commands. The processes are made here, as a launcher (torchrun, SLURM) would make them:
    Lightning joins them and their process group instead of re-running the command line."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      NODE_RANK="0", RSAE_COMPILE="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(minutes=3))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for name, case in CASES.items():
        sae = make_sae(case)
        kwargs = {}
        if case.get("placement") == "columns":
            kwargs["shard_placement_fn"] = lambda p: Shard(1) if p.ndim == 2 else Shard(0)
        shard_sae(sae, mesh, **kwargs)
        result = train(sae, case, rank)
        result["shards"] = {n: (tuple(p.placements), tuple(p.to_local().shape)) for n, p in sae.named_parameters()}
        result["state"] = full_state_dict(sae)  # every rank takes part; rank 0 gets the weights
        results[name] = result
    if rank == 0:
        torch.save(results, Path(out) / "sharded.pt")

    from rsae.cli import main

    for command in commands:
        os.environ["WORLD_SIZE"] = str(WORLD)  # Lightning's teardown removes it
        assert main(command) == 0, command
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """(sharded results, unsharded results, folder of the Lightning runs)."""
    out = tmp_path_factory.mktemp("sharding")
    cache = str(dictionary_cache(out / "cache", rows_per_shard=256))
    ddp = lightning_config(out / "ddp.yaml", cache, out / "ddp", strategy="ddp")
    fsdp = lightning_config(out / "fsdp.yaml", cache, out / "fsdp")
    resumed = lightning_config(out / "resumed.yaml", cache, out / "resumed")
    commands = [["fit", "--config", str(ddp)], ["fit", "--config", str(fsdp)],
                ["fit", "--config", str(resumed), "--ckpt_path", str(out / "fsdp" / "checkpoints" / STEP3)]]
    mp.spawn(_worker, args=(free_port(), str(out), commands), nprocs=WORLD)
    sharded = torch.load(out / "sharded.pt", weights_only=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reference = {}
    for name, case in CASES.items():
        if name not in REFERENCE:
            sae = make_sae(case)
            reference[name] = {**train(sae, case, None), "state": sae.state_dict()}
    torch.set_num_threads(threads)
    return sharded, reference, out


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("broken")])
def test_sharded_steps_match_the_unsharded_steps(runs: Runs, name: str) -> None:
    sharded, reference, _ = runs
    mine, theirs = sharded[name], reference[REFERENCE.get(name, name)]
    torch.testing.assert_close(mine["losses"], theirs["losses"], rtol=1e-5, atol=1e-6)
    assert mine["state"].keys() == theirs["state"].keys()
    for key, value in theirs["state"].items():
        torch.testing.assert_close(mine["state"][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    assert mine["losses"][-1] < 0.9 * mine["losses"][0]  # and it learns
    if CASES[name]["architecture"] != "relu":
        norms = mine["state"]["W_dec"].norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    if CASES[name]["architecture"] == "topk":
        assert mine["dead_steps"] > 0  # AuxK had dead latents to train


def test_parameters_are_sharded_on_the_latent_dim(runs: Runs) -> None:
    from torch.distributed.tensor import Shard

    shards = runs[0]["topk"]["shards"]  # rank 0's shards
    assert shards["W_enc"] == ((Shard(1),), (D_IN, 32)) and shards["W_dec"] == ((Shard(0),), (32, D_IN))
    assert shards["b_enc"] == ((Shard(0),), (32,)) and shards["b_dec"] == ((Shard(0),), (D_IN // 2,))
    uneven = runs[0]["topk-uneven"]["shards"]
    assert uneven["W_dec"] == ((Shard(0),), (32, D_IN)) and uneven["W_enc"][0] == (Shard(0),)
    assert runs[0]["jumprelu"]["shards"]["threshold"] == ((Shard(0),), (32,))
    assert runs[0]["topk-columns"]["shards"]["W_dec"] == ((Shard(1),), (64, D_IN // 2))


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("broken")])
def test_a_renormalisation_that_breaks_under_sharding_is_caught(runs: Runs, name: str) -> None:
    sharded, reference, _ = runs
    mine, theirs = sharded[name]["state"]["W_dec"], reference["topk"]["state"]["W_dec"]
    assert (mine - theirs).abs().max() > 1e-4
    assert (mine.norm(dim=-1) - 1).abs().max() > 1e-4  # the rows are off the unit sphere


def test_lightning_model_parallel_fit_matches_ddp_and_resumes(runs: Runs) -> None:
    """`rsae fit` with the shipped FSDP config (ModelParallelStrategy, `SAEModule.configure_model`) on 2 CPU
    processes ends with DDP's weights, and so does a fit resumed from its sharded step-3 checkpoint."""
    out = runs[2]
    step3 = out / "fsdp" / "checkpoints" / STEP3
    assert step3.is_dir() and len(list(step3.glob("*.distcp"))) == WORLD  # one shard file per rank
    reference = rsae.load(out / "ddp" / "sae").state_dict()
    for run in ("fsdp", "resumed"):
        state = rsae.load(out / run / "sae").state_dict()
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=f"{run}: {key}")
    norms = reference["W_dec"].norm(dim=-1)  # unit norm in the data's normalised scale, exported for raw activations
    torch.testing.assert_close(norms, torch.full_like(norms, float(norms.mean())))
