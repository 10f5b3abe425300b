"""`rsae quickstart`: the whole RSAE pipeline on the built-in model and text, with one table at the end.

1. cache `--n-tokens` tokens of SmolLM2-135M's residual stream after block `--layer` (`--corpus`, default
   Shakespeare), and with `--eval-corpus` `--eval-tokens` of a held-out corpus to evaluate on;
2. train a baseline teacher (`--family`, default TopK) on them;
3. stage 1: `RemezInit` + gate calibration of an RSAE (`--mode`, default masked) on the frozen teacher;
4. stage 2: fine-tune the RSAE, and the control (the teacher, same recipe and steps);
5. test all four (teacher, RSAE-init, RSAE, control) on held-out shards (of `--eval-corpus` if given): MSE, explained variance, L0,
   alive fraction, CE degradation and loss recovered with the SAE spliced into the LM.

Each stage is the `rsae fit` of its YAML file in `configs/` (`<family>-teacher.yaml`, `-calibrate`, `-finetune`,
`-control`; `evaluate.yaml` for the tests), with the quickstart's flags as overrides: the recipe lives in one
place. `--print-configs` prints every stage's merged config and the equivalent `rsae fit` command. Every stage is
resumable: a finished stage (its exported checkpoint folder) is reused, an interrupted one continues from its
last Lightning checkpoint, and a second run reuses the cache.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

STAGES = ("teacher", "rsae-init", "rsae", "control")
CONFIG_OF_STAGE = {"teacher": "teacher", "rsae-init": "calibrate", "rsae": "finetune", "control": "control"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output folder")
    parser.add_argument("--model", default="smollm2-135m", help="LM: built-in name or a local HF folder")
    parser.add_argument("--layer", type=int, default=15, help="residual stream after this block")
    add_data_arguments(parser)
    parser.add_argument("--family", choices=("topk", "relu", "jumprelu"), default="topk", help="teacher family")
    parser.add_argument("--mode", choices=("masked", "pure", "thresholded"), default="masked", help="RSAE gate mode")
    parser.add_argument("--d-sae", type=int, default=4608, help="number of latents")
    parser.add_argument("--k", type=int, default=32, help="active latents per token (topk)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="sparsity coefficient (relu / jumprelu; default: the family's config)")
    parser.add_argument("--target-l0", type=float, default=None,
                        help="L0 the relu / jumprelu teacher is held at by adapting the coefficient (default: the "
                             "family's config, 32)")
    parser.add_argument("--teacher-epochs", type=float, default=10, help="passes over the training shards")
    parser.add_argument("--finetune-epochs", type=float, default=4, help="fine-tuning passes (RSAE and control)")
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    parser.add_argument("--ce-sequences", type=int, default=64, help="held-out sequences for the spliced CE")
    parser.add_argument("--precision", default="bf16-mixed", help="trainer precision ('32-true' for fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-configs", action="store_true",
                        help="print every stage's config (the YAML in configs/ with these flags applied) and stop")


EVAL_SHARDS = 5
"""Shards of an `--eval-corpus` cache: the first sets the (unused) normalisation, the other four are tested."""


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The text a pipeline trains on and the text it is evaluated on (`rsae quickstart`, `rsae upgrade`)."""
    parser.add_argument("--corpus", default="shakespeare",
                        help="training text: a built-in corpus (shakespeare, mixed, django-docs) or a .txt/.jsonl "
                             "file/folder")
    parser.add_argument("--n-tokens", type=int, default=204_800, help="tokens to cache (BOS included)")
    parser.add_argument("--eval-corpus", default=None,
                        help="evaluate on this corpus (e.g. django-docs, a source no training corpus holds) instead "
                             "of the training cache's held-out shard")
    parser.add_argument("--eval-tokens", type=int, default=102_400, help="tokens of --eval-corpus to cache")


def cache_activations(args: argparse.Namespace, model: str, hook: str,
                      processing: dict[str, bool] | None = None) -> None:
    """The training cache (`OUT/cache`, ten shards) and, with `--eval-corpus`, the evaluation cache
    (`OUT/eval-cache`, `EVAL_SHARDS` shards) of the pipeline's hook; a finished cache is reused."""
    from rsae.data.caching import CacheRequest, build_cache

    build_cache(CacheRequest(out=str(args.out / "cache"), model=model, hooks=(hook,), corpus=args.corpus,
                             n_tokens=args.n_tokens, sequences_per_shard=sequences_per_shard(args),
                             lm_processing=processing))
    if getattr(args, "eval_corpus", None):
        build_cache(CacheRequest(out=str(args.out / "eval-cache"), model=model, hooks=(hook,),
                                 corpus=args.eval_corpus, n_tokens=args.eval_tokens,
                                 sequences_per_shard=max(args.eval_tokens // 128 // EVAL_SHARDS, 1),
                                 lm_processing=processing))


def training_data(args: argparse.Namespace) -> dict[str, Any]:
    """The DataModule settings every stage shares (the training cache)."""
    return {"cache": str(args.out / "cache"), "batch_size": args.batch_size, "seed": args.seed, "verify": "header"}


def evaluation_data(args: argparse.Namespace) -> dict[str, Any]:
    """Where the tests read: the training cache's held-out shard, or all but the first shard of the eval cache."""
    if getattr(args, "eval_corpus", None):
        return {"cache": str(args.out / "eval-cache"), "val_shards": 0, "test_shards": EVAL_SHARDS - 1}
    return {}


def config_file(name: str) -> Path:
    """A config shipped with the package (`configs/<name>.yaml` in the source tree)."""
    path = Path(str(resources.files("rsae") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        raise FileNotFoundError(f"no config {path}; reinstall rsae (the configs ship with the package)")
    return path


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied: mappings merge key by key, anything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def stage_configs(args: argparse.Namespace, steps: dict[str, int]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Per stage (and per evaluation, `test/<stage>`): its YAML file and the quickstart's overrides of it."""
    out: Path = args.out
    exported = {stage: str(out / stage / "sae") for stage in STAGES}
    data = training_data(args)
    family_args: dict[str, Any] = {"d_sae": getattr(args, "d_sae", None), "seed": args.seed}
    if args.family == "topk":
        family_args["k"] = getattr(args, "k", None)
    sparsity = {} if getattr(args, "sparsity", None) is None else {"sparsity_coefficient": args.sparsity}
    if getattr(args, "target_l0", None) is not None:
        family_args["target_l0"] = args.target_l0
    model_args = {
        "teacher": {**family_args, **sparsity},
        "rsae-init": {"teacher": exported["teacher"], "mode": args.mode},
        "rsae": {"init": exported["rsae-init"], **sparsity},
        "control": {"init": exported["teacher"], **sparsity},
    }
    configs = {}
    for stage in STAGES:
        folder = out / stage
        overrides = {
            "seed_everything": args.seed,
            "trainer": {
                "max_steps": steps[stage], "precision": args.precision, "default_root_dir": str(folder),
                "num_sanity_val_steps": 0, "enable_model_summary": False,
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": str(folder), "name": "logs", "version": 0}},
                "callbacks": [{"class_path": "rsae.train.progress.StepProgressBar"},
                              {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                               "init_args": {"dirpath": str(folder / "checkpoints"), "save_last": True,
                                             "every_n_train_steps": 50}}],
            },
            "model": {"init_args": {**model_args[stage], "export_dir": exported[stage],
                                    "evaluation": {"ce_sequences": 0}}},
            "data": data,
        }
        configs[stage] = (config_file(f"{args.family}-{CONFIG_OF_STAGE[stage]}"), overrides)
        configs[f"test/{stage}"] = test_config(args, exported[stage], stage)
    return configs


def test_config(args: argparse.Namespace, checkpoint: str, name: str) -> tuple[Path, dict[str, Any]]:
    """The `rsae test` of a checkpoint folder as run `name` (report in `OUT/reports/<name>`), on the pipeline's
    evaluation data."""
    out: Path = args.out
    data = {**training_data(args), **evaluation_data(args)}
    return config_file("evaluate"), {
        "seed_everything": args.seed,
        "trainer": {"precision": args.precision, "default_root_dir": str(out / "reports"),
                    "callbacks": [{"class_path": "rsae.train.progress.StepProgressBar"}],
                    "enable_model_summary": False},
        "model": {"init_args": {"checkpoint": checkpoint, "name": name, "evaluation": {
            "report_dir": str(out / "reports" / name), "ce_sequences": args.ce_sequences}}},
        "data": data,
    }


def test_checkpoint(args: argparse.Namespace, checkpoint: str, name: str) -> None:
    """Run `test_config` (the report lands in `OUT/reports/<name>`)."""
    cli = _cli(*test_config(args, checkpoint, name))
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)


def run(args: argparse.Namespace) -> int:
    return with_flushed_denormals(_run, args)


def with_flushed_denormals(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a pipeline command with subnormal floats flushed to zero: they turn up in small CPU runs and slow them
    down up to 10x. Off again afterwards, since the setting is global to the process (torch's default is off)."""
    torch.set_flush_denormal(True)
    try:
        return command(args)
    finally:
        torch.set_flush_denormal(False)


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    hook = f"blocks.{args.layer}.hook_resid_post"
    if args.print_configs:
        print_configs(args)
        return 0
    print(f"rsae quickstart: {args.model} {hook}, {args.n_tokens} tokens, {args.family} teacher "
          f"(d_sae={args.d_sae}), RSAE mode {args.mode} -> {args.out}", flush=True)
    cache_activations(args, args.model, hook)
    run_pipeline(args, STAGES, start)
    return 0


def sequences_per_shard(args: argparse.Namespace) -> int:
    """Ten shards of 128-token sequences: eight train, one validates, one tests."""
    return max(args.n_tokens // 128 // 10, 1)


def run_pipeline(args: argparse.Namespace, fit: tuple[str, ...], start: float) -> None:
    """Fit the `fit` stages from their configs (a finished stage is reused), test all four, print the table."""
    from rsae.cli.lightning import quiet_lightning
    from rsae.eval.report import TABLE_METRICS, compare, plot_mse_vs_l0, read_report

    out: Path = args.out
    configs = stage_configs(args, _steps(args, steps_per_epoch(args)))
    with quiet_lightning():
        for stage in fit:
            fit_stage(stage, out / stage, *configs[stage])
        reports = []
        for stage in STAGES:
            test_checkpoint(args, str(out / stage / "sae"), stage)
            reports.append(read_report(out / "reports" / stage))
    plot_mse_vs_l0(reports, out / "mse_vs_l0.png")
    plot_training_curves({stage: out / stage for stage in STAGES}, out / "training_curves.png")
    print("\n" + compare(reports, TABLE_METRICS, l0_reference=0))  # every run against the teacher's L0
    print(f"\nreports, plots and checkpoints in {out}/ (gate shapes: {out}/reports/rsae/gate_shapes.png, "
          f"training curves: {out}/training_curves.png); {time.perf_counter() - start:.0f} s in all")


def steps_per_epoch(args: argparse.Namespace) -> int:
    """Training batches per pass over the cache's training shards (estimated from --n-tokens before caching)."""
    from rsae.data.cache import CacheError
    from rsae.data.datamodule import ActivationDataModule

    try:
        data = ActivationDataModule(str(args.out / "cache"), batch_size=args.batch_size, val_shards=1, test_shards=1,
                                    seed=args.seed, normalize=True, verify="header")
    except CacheError:
        return max(math.ceil(args.n_tokens * 8 // 10 * 127 // 128 / args.batch_size), 1)  # 8 of 10 shards train
    return len(data.train_dataloader())


def _steps(args: argparse.Namespace, steps_per_epoch: int) -> dict[str, int]:
    epochs = {"teacher": getattr(args, "teacher_epochs", 0), "rsae-init": 0.25, "rsae": args.finetune_epochs,
              "control": args.finetune_epochs}
    return {stage: max(int(e * steps_per_epoch), 1) for stage, e in epochs.items()}


def _cli(path: Path, overrides: dict[str, Any]) -> Any:
    from rsae.cli.lightning import build_cli

    return build_cli(merged(yaml.safe_load(path.read_text()), overrides), run=False)


def fit_stage(name: str, folder: Path, path: Path, overrides: dict[str, Any]) -> None:
    """Fit one stage unless its export exists; resume from its last Lightning checkpoint if one was left."""
    from rsae.zoo.checkpoint import CONFIG_FILE

    if (folder / "sae" / CONFIG_FILE).is_file():
        print(f"[{name}] done already: {folder / 'sae'}", flush=True)
        return
    last = folder / "checkpoints" / "last.ckpt"
    cli = _cli(path, overrides)
    print(f"[{name}] {type(cli.model).__name__} ({path.name}): {cli.trainer.max_steps} steps of "
          f"{cli.datamodule.batch_size} tokens" + (" (resuming)" if last.is_file() else ""), flush=True)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last.is_file() else None)


def print_configs(args: argparse.Namespace, fit: tuple[str, ...] = STAGES) -> None:
    """Every stage's merged config (of the `fit` stages, and every test), and the `rsae fit` / `rsae test`
    command that runs the same."""
    estimated = not (args.out / "cache" / "manifest.json").is_file()
    for stage, (path, overrides) in stage_configs(args, _steps(args, steps_per_epoch(args))).items():
        command = "test" if stage.startswith("test/") else "fit"
        if command == "fit" and stage not in fit:
            continue
        flags = " ".join(f"--{key}={value}" for key, value in _flat(overrides) if not isinstance(value, list))
        print(f"# {stage}: rsae {command} --config configs/{path.name} {flags} (callbacks as below)"
              + ("  (max_steps estimated from --n-tokens)" if estimated and command == "fit" else ""))
        print(yaml.safe_dump(merged(yaml.safe_load(path.read_text()), overrides), sort_keys=False))


def _flat(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        items += _flat(value, name + ".") if isinstance(value, dict) else [(name, value)]
    return items


STARTS_AFTER = {"rsae-init": "teacher", "rsae": "rsae-init", "control": "teacher"}
"""The stage each one continues from: its curve starts where that one's ended, on one step axis."""


def plot_training_curves(folders: dict[str, Path], path: Path) -> None:
    """Training MSE of every stage on one step axis, from the stages' CSV logs: the RSAE and the control start
    after the teacher's steps (the RSAE after its calibration's too), so the extra training they got shows."""
    from rsae.eval.plots import plot_curves

    runs: dict[str, tuple[list[int], list[float]]] = {}
    ends: dict[str, int] = {}
    for name, folder in folders.items():  # STAGES order: every stage after the one it continues from
        log = folder / "logs" / "version_0" / "metrics.csv"
        if not log.is_file():
            continue
        with log.open() as handle:
            logged = [r for r in csv.DictReader(handle) if r.get("step")]
        offset = ends.get(STARTS_AFTER.get(name, ""), 0)
        # A stage that logs no MSE (the calibration fits the gate alone) still moves the axis on.
        ends[name] = offset + max((int(r["step"]) for r in logged), default=0)
        rows = [r for r in logged if r.get("train/mse")]
        if rows:
            runs[name] = ([offset + int(r["step"]) for r in rows], [float(r["train/mse"]) for r in rows])
    plot_curves({"training MSE (normalised units)": runs}, path)
