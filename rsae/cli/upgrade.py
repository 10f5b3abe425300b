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

from rsae.cli.quickstart import print_configs, run_pipeline, sequences_per_shard, with_flushed_denormals
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
    parser.add_argument("--corpus", default="shakespeare", help="text: 'shakespeare' or a .txt/.jsonl file/folder")
    parser.add_argument("--n-tokens", type=int, default=204_800, help="tokens to cache (BOS included)")
    parser.add_argument("--mode", choices=("masked", "pure", "thresholded"), default="masked", help="RSAE gate mode")
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
    from rsae.data.caching import CacheRequest, build_cache
    from rsae.zoo.checkpoint import CONFIG_FILE, load, save
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
    if args.print_configs:
        print_configs(args, FITTED)
        return 0
    if not (folder / CONFIG_FILE).is_file():
        save(teacher, folder)
        print(f"[teacher] imported {cfg.source.get('format')} {cfg.family} SAE (d_in {cfg.d_in}, d_sae {cfg.d_sae}, "
              f"{cfg.hook_name} of {cfg.model_name}) from {cfg.source.get('location')} into {folder}", flush=True)
    print(f"rsae upgrade: {model} {cfg.hook_name}" + (f" processed {processing}" if processing else "")
          + f", {args.n_tokens} tokens, RSAE mode {args.mode} -> {args.out}", flush=True)
    build_cache(CacheRequest(out=str(args.out / "cache"), model=model, hooks=(cfg.hook_name,), corpus=args.corpus,
                             n_tokens=args.n_tokens, sequences_per_shard=sequences_per_shard(args),
                             lm_processing=processing))
    run_pipeline(args, FITTED, start)
    return 0
