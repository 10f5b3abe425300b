"""`rsae upgrade SOURCE`: the quickstart's pipeline for an SAE you already have.

Import the teacher (any format `rsae import` reads) into `OUT/teacher/sae` → cache activations at its hook
point from its LM, processed as the teacher was trained (`cfg.source["lm_processing"]`, e.g. SAELens'
`center_writing_weights`) → `RemezInit` + calibration → fine-tune the RSAE and the control → evaluate all
four → the side-by-side table. The same stages and configs as `rsae quickstart` (`configs/<family>-calibrate`,
`-finetune`, `-control`, `evaluate`); resumable in the same way.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from rsae.cli.quickstart import (add_data_arguments, cache_activations, config_file, print_configs, run_pipeline,
                                 with_flushed_denormals)
from rsae.zoo.importers import FORMATS

FITTED = ("rsae-init", "rsae", "control")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="the teacher: a folder or file, hf:OWNER/NAME[/PATH][@REVISION], or "
                                       "saelens:RELEASE/SAE_ID")
    parser.add_argument("--format", choices=FORMATS, default=None, help="the teacher's format (default: detected)")
    parser.add_argument("--out", type=Path, default=Path("runs/upgrade"), help="output folder")
    parser.add_argument("--model", default=None,
                        help="the teacher's LM: a built-in name, a local HF folder or a Hub name (default: the "
                             "LM its files name)")
    add_data_arguments(parser)
    parser.add_argument("--mode", choices=("masked", "pure", "thresholded"), default="masked", help="RSAE gate mode")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="sparsity coefficient the relu / jumprelu fine-tuning starts from (default: the one the "
                             "teacher records, else its family's teacher config; the L0 controller adapts it)")
    parser.add_argument("--finetune-epochs", type=float, default=4, help="fine-tuning passes (RSAE and control)")
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    parser.add_argument("--ce-sequences", type=int, default=64, help="held-out sequences for the spliced CE")
    parser.add_argument("--precision", default="bf16-mixed", help="trainer precision ('32-true' for fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--revision", default=None, help="Hub revision of an hf:/saelens: teacher")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (a mirror or a private Hub)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / the login)")
    parser.add_argument("--print-configs", action="store_true", help="print every stage's config and stop")


def run(args: argparse.Namespace) -> int:
    return with_flushed_denormals(_run, args)


def _run(args: argparse.Namespace) -> int:
    from rsae.zoo.checkpoint import CONFIG_FILE, load, save
    from rsae.train.modules import TRAINED_SPARSITY
    from rsae.zoo.importers import import_sae

    start = time.perf_counter()
    folder = args.out / "teacher" / "sae"
    if (folder / CONFIG_FILE).is_file():
        teacher = load(folder)
        print(f"[teacher] imported already: {folder}", flush=True)
    else:
        teacher = import_sae(args.source, format=args.format, revision=args.revision, endpoint=args.endpoint,
                             token=args.token)
    cfg = teacher.cfg
    args.family = cfg.family
    model = args.model or cfg.model_name
    if model in ("", "unknown"):
        raise ValueError(f"{args.source} does not name its language model; pass --model (a built-in name, a local "
                         "HF folder or a Hub name)")
    processing = cfg.source.get("lm_processing")
    if cfg.family != "topk" and args.sparsity is None and TRAINED_SPARSITY not in cfg.extra:
        recipe = yaml.safe_load(config_file(f"{cfg.family}-teacher").read_text())
        args.sparsity = float(recipe["model"]["init_args"]["sparsity_coefficient"])
        print(f"[teacher] records no trained sparsity coefficient: fine-tuning starts from {args.sparsity} (configs/"
              f"{cfg.family}-teacher.yaml), which the L0 controller adapts to hold the teacher's L0", flush=True)
    if args.print_configs:
        print_configs(args, FITTED)
        return 0
    if not (folder / CONFIG_FILE).is_file():
        save(teacher, folder)
        print(f"[teacher] imported {cfg.source.get('format')} {cfg.family} SAE (d_in {cfg.d_in}, d_sae {cfg.d_sae}, "
              f"{cfg.hook_name} of {cfg.model_name}) from {cfg.source.get('location')} into {folder}", flush=True)
    print(f"rsae upgrade: {model} {cfg.hook_name}" + (f" processed {processing}" if processing else "")
          + f", {args.n_tokens} tokens, RSAE mode {args.mode} -> {args.out}", flush=True)
    cache_activations(args, model, cfg.hook_name, processing)
    run_pipeline(args, FITTED, start)
    return 0
