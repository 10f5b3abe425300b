"""`rsae quickstart`: the whole RSAE pipeline on the built-in model and text, with one table at the end.

1. cache `--n-tokens` tokens of SmolLM2-135M's residual stream after block `--layer` (Shakespeare);
2. train a baseline teacher (`--family`, default TopK) on them;
3. stage 1: `RemezInit` + gate calibration of an RSAE (`--mode`, default masked) on the frozen teacher;
4. stage 2: fine-tune the RSAE, and the control (the teacher, same recipe and steps);
5. test all four (teacher, RSAE-init, RSAE, control) on held-out shards: MSE, explained variance, L0,
   alive fraction, CE degradation and loss recovered with the SAE spliced into the LM.

Every stage runs through the same LightningModules and DataModule as `rsae fit`, and every stage is
resumable: a finished stage (its exported checkpoint folder) is reused, an interrupted one continues from its
last Lightning checkpoint, and a second run reuses the cache.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from rsae.cache import CacheRequest, build_cache
from rsae.checkpoint import CONFIG_FILE
from rsae.data import ActivationDataModule
from rsae.evaluation import EvalConfig
from rsae.training import Evaluation, FineTuning, GateCalibration, SAEModule, TeacherTraining

TABLE_METRICS = ["mse", "explained_variance", "l0", "alive_fraction", "ce_degradation", "loss_recovered"]


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output folder")
    parser.add_argument("--model", default="smollm2-135m", help="LM: built-in name or a local HF folder")
    parser.add_argument("--corpus", default="shakespeare", help="text: 'shakespeare' or a .txt/.jsonl file/folder")
    parser.add_argument("--layer", type=int, default=15, help="residual stream after this block")
    parser.add_argument("--n-tokens", type=int, default=204_800, help="tokens to cache (BOS included)")
    parser.add_argument("--family", choices=("topk", "relu", "jumprelu"), default="topk", help="teacher family")
    parser.add_argument("--mode", choices=("masked", "pure", "thresholded"), default="masked", help="RSAE gate mode")
    parser.add_argument("--d-sae", type=int, default=4608, help="number of latents")
    parser.add_argument("--k", type=int, default=32, help="active latents per token (topk)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="sparsity coefficient (relu / jumprelu; default per family)")
    parser.add_argument("--teacher-epochs", type=int, default=10, help="passes over the training shards")
    parser.add_argument("--finetune-epochs", type=int, default=4, help="fine-tuning passes (RSAE and control)")
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    parser.add_argument("--ce-sequences", type=int, default=64, help="held-out sequences for the spliced CE")
    parser.add_argument("--precision", default="bf16-mixed", help="trainer precision ('32-true' for fp32)")
    parser.add_argument("--seed", type=int, default=0)


DEFAULT_SPARSITY = {"relu": 5.0, "jumprelu": 0.5, "topk": 0.0}
"""Per-family sparsity coefficients for normalised activations (mean norm sqrt(d_in)), tuned for L0 ~ 30-60."""


def run_quickstart(args: argparse.Namespace) -> int:
    # Subnormal floats turn up in small CPU runs and slow them down up to 10x; off again afterwards, since
    # the setting is global to the process (torch's default is off).
    torch.set_flush_denormal(True)
    try:
        return _run(args)
    finally:
        torch.set_flush_denormal(False)


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out: Path = args.out
    hook = f"blocks.{args.layer}.hook_resid_post"
    print(f"rsae quickstart: {args.model} {hook}, {args.n_tokens} tokens, {args.family} teacher "
          f"(d_sae={args.d_sae}), RSAE mode {args.mode} -> {out}", flush=True)
    cache = out / "cache"
    build_cache(CacheRequest(out=str(cache), model=args.model, hooks=(hook,), corpus=args.corpus,
                             n_tokens=args.n_tokens, sequences_per_shard=max(args.n_tokens // 128 // 10, 1)))
    datamodule = ActivationDataModule(str(cache), batch_size=args.batch_size, val_shards=1, test_shards=1,
                                      seed=args.seed, normalize=True, verify="header")
    sparsity = DEFAULT_SPARSITY[args.family] if args.sparsity is None else args.sparsity
    recipe: dict[str, Any] = {"sparsity_coefficient": sparsity, "evaluation": EvalConfig(ce_sequences=0)}
    linked = {"d_in": datamodule.d_in, "hook_name": datamodule.hook_name, "model_name": datamodule.model_name}

    folders = {"teacher": out / "teacher", "rsae-init": out / "rsae-init", "rsae": out / "rsae",
               "control": out / "control"}
    sae = {name: str(folder / "sae") for name, folder in folders.items()}
    fit_stage("teacher", folders["teacher"], datamodule, args, args.teacher_epochs,
              lambda: TeacherTraining(family=args.family, d_sae=args.d_sae, k=args.k, seed=args.seed, lr=4e-4,
                                      warmup_steps=50, sparsity_warmup_steps=100, dead_window_tokens=200_000,
                                      export_dir=sae["teacher"], **recipe, **linked))
    fit_stage("rsae-init", folders["rsae-init"], datamodule, args, 0.25,
              lambda: GateCalibration(teacher=sae["teacher"], mode=args.mode, lr=1e-3,
                                      export_dir=sae["rsae-init"], **recipe, **linked))
    finetune = {"lr": 1e-4, "gate_lr": 1e-3, "warmup_steps": 20, "dead_window_tokens": 200_000, **recipe, **linked}
    fit_stage("rsae", folders["rsae"], datamodule, args, args.finetune_epochs,
              lambda: FineTuning(init=sae["rsae-init"], export_dir=sae["rsae"], **finetune))
    fit_stage("control", folders["control"], datamodule, args, args.finetune_epochs,
              lambda: FineTuning(init=sae["teacher"], export_dir=sae["control"], **finetune))

    from rsae.report import compare, plot_mse_vs_l0, read_report

    reports = []
    for name in folders:
        evaluation = EvalConfig(report_dir=str(out / "reports" / name), ce_sequences=args.ce_sequences)
        module = Evaluation(checkpoint=sae[name], name=name, evaluation=evaluation, **linked)
        trainer(out / "reports", args, max_epochs=1, logger=False).test(module, datamodule=datamodule, verbose=False)
        reports.append(read_report(out / "reports" / name))
    plot_mse_vs_l0(reports, out / "mse_vs_l0.png")
    plot_training_curves(folders, out / "training_curves.png")
    print("\n" + compare(reports, TABLE_METRICS))
    print(f"\nreports, plots and checkpoints in {out}/ (gate shapes: {out}/reports/rsae/gate_shapes.png, "
          f"training curves: {out}/training_curves.png); {time.perf_counter() - start:.0f} s in all")
    return 0


def trainer(root: Path, args: argparse.Namespace, **kwargs: Any) -> pl.Trainer:
    from lightning.pytorch.callbacks import RichProgressBar

    return pl.Trainer(default_root_dir=str(root), accelerator="auto", devices=1, precision=args.precision,
                      callbacks=[RichProgressBar(leave=True), *kwargs.pop("callbacks", [])],
                      enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def fit_stage(name: str, folder: Path, datamodule: ActivationDataModule, args: argparse.Namespace,
              epochs: float, build: Any) -> None:
    """Fit one stage unless its export exists; resume from its last Lightning checkpoint if one was left."""
    if (folder / "sae" / CONFIG_FILE).is_file():
        print(f"[{name}] done already: {folder / 'sae'}", flush=True)
        return
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    pl.seed_everything(args.seed, verbose=False)
    module: SAEModule = build()
    steps = max(int(epochs * len(datamodule.train_dataloader())), 1)
    last = folder / "checkpoints" / "last.ckpt"
    print(f"[{name}] {type(module).__name__}: {steps} steps of {args.batch_size} tokens"
          + (" (resuming)" if last.is_file() else ""), flush=True)
    checkpoints = ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True, every_n_train_steps=50)
    fit = trainer(folder, args, max_steps=steps, callbacks=[checkpoints], gradient_clip_val=1.0,
                  logger=CSVLogger(folder, name="logs", version=0), log_every_n_steps=10, limit_val_batches=4)
    fit.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)


def plot_training_curves(folders: dict[str, Path], path: Path) -> None:
    """Training MSE of every stage against step, from the stages' CSV logs."""
    from rsae.report import plot_curves

    runs = {}
    for name, folder in folders.items():
        log = folder / "logs" / "version_0" / "metrics.csv"
        if log.is_file():
            with log.open() as handle:
                rows = [r for r in csv.DictReader(handle) if r.get("train/mse")]
            if rows:
                runs[name] = ([int(r["step"]) for r in rows], [float(r["train/mse"]) for r in rows])
    plot_curves({"training MSE (normalised units)": runs}, path)
