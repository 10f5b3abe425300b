"""`rsae zoo list | card | pull | push | build`: the model zoo from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

CHECK_SEQUENCES = 16
"""Held-out sequences of the card's check: the entry on the LM's own activations, reproducible anywhere."""

SHIPPED_RUN = "shipped"
"""The table's row for the entry's own weights when they are stored in another dtype than the pipeline's."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every entry: name, family, L0, explained variance, status")
    show = actions.add_parser("card", help="print an entry's card (JSON)")
    show.add_argument("name")
    pull = actions.add_parser("pull", help="download an entry into the HF cache (verified) and print its folder")
    pull.add_argument("name")
    push = actions.add_parser("push", help="upload an entry folder to the Hub (no-op when unchanged)")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--path-in-repo", default="")
    build = actions.add_parser("build", help="build an entry from its card: pipeline, evaluation, card, push")
    build.add_argument("name")
    build.add_argument("--out", type=Path, default=None, help="work folder (default runs/zoo/NAME)")
    build.add_argument("--push", default=None, metavar="REPO", help="push the entry folder to this Hub repo")
    build.add_argument("--n-tokens", type=int, default=None, help="override the card's token budget")
    build.add_argument("--model", default=None, help="override the card's LM (e.g. a local folder)")
    build.add_argument("--source", default=None, help="override the card's teacher source")
    build.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                       help="storage dtype of the entry's weights (default: the card's recipe, else float32); the "
                            "entry is evaluated in it as the table's 'shipped' row")
    build.add_argument("--ship", action="store_true",
                       help="maintainers: copy the weights into the package's zoo (shipped/NAME) and write the "
                            "published card there, so the entry loads on a machine without network")
    for sub in (pull, push, build):
        sub.add_argument("--revision", default=None)
        sub.add_argument("--endpoint", default=None, help="Hub endpoint (a mirror or a private Hub)")
        sub.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / the login)")


def run(args: argparse.Namespace) -> int:
    from rsae import zoo

    if args.action == "list":
        rows = zoo.list()
        print(f"{'name':28} {'family':9} {'L0':>7} {'EV':>7}  status")
        for row in rows:
            l0, ev = row["l0"], row["explained_variance"]
            print(f"{row['name']:28} {row['family']:9} {'-' if l0 is None else f'{l0:.1f}':>7} "
                  f"{'-' if ev is None else f'{ev:.3f}':>7}  {row['status']}")
    elif args.action == "card":
        print(json.dumps(zoo.card(args.name).to_dict(), indent=1))
    elif args.action == "pull":
        print(zoo.pull(args.name, revision=args.revision, endpoint=args.endpoint, token=args.token))
    elif args.action == "push":
        result = zoo.push(args.folder, args.repo_id, args.path_in_repo, revision=args.revision or "main",
                          endpoint=args.endpoint, token=args.token)
        print("unchanged: nothing pushed" if result["commit"] is None else f"pushed commit {result['commit']}")
    else:
        build(args)
    return 0


def build(args: argparse.Namespace) -> Path:
    """Build `args.name` from its card with the quickstart / upgrade stages, evaluate it, write the entry folder
    and the updated card under `--out`, and push them when asked. Returns the entry folder."""
    from rsae.cli.lightning import quiet_lightning
    from rsae.cli.quickstart import STAGES, test_checkpoint
    from rsae.eval.report import TABLE_METRICS, comparable_l0
    from rsae.zoo.checkpoint import load, save
    from rsae.zoo.modelcard import model_card
    from rsae.zoo.registry import card, write_card

    entry = card(args.name)
    out: Path = args.out or Path("runs/zoo") / entry.name
    pipeline = _pipeline_args(entry, out, args)
    start = time.perf_counter()
    if entry.recipe["command"] == "quickstart":
        from rsae.cli import quickstart as stages
    else:
        from rsae.cli import upgrade as stages
    stages.run(pipeline)
    folder = out / "entry"
    dtype = args.dtype or entry.recipe.get("dtype", "float32")
    save(load(out / "rsae" / "sae", dtype=dtype), folder)
    runs, measured = list(STAGES), "rsae"  # `measured`: the run whose report is the entry's own
    if dtype != load(out / "rsae" / "sae").cfg.dtype:
        with quiet_lightning():
            test_checkpoint(pipeline, str(folder), SHIPPED_RUN)
        runs.append(SHIPPED_RUN)
        measured = SHIPPED_RUN
    for name in ("report.json", "gate_shapes.png"):
        produced = out / "reports" / measured / name
        if produced.is_file():
            shutil.copy2(produced, folder / name)
    reports = [json.loads((out / "reports" / run / "report.json").read_text()) for run in runs]
    table = {run: {metric: report["metrics"].get(metric) for metric in TABLE_METRICS}
             for run, report in zip(runs, reports, strict=True)}
    for run, comparable in zip(runs, comparable_l0(reports, runs.index("teacher")), strict=True):
        table[run]["comparable_l0"] = comparable
    cfg = json.loads((folder / "cfg.json").read_text())
    built = dataclasses.replace(entry, evaluation={"table": table, "data": evaluation_data(pipeline),
                                                   "seconds": round(time.perf_counter() - start)})
    built.evaluation["check"] = held_out_check(load(folder), pipeline)
    (folder / "README.md").write_text(model_card(built, cfg))
    if args.push:
        from rsae.zoo.hub import push

        path_in_repo = entry.hub.get("path_in_repo", "")
        result = push(folder, args.push, path_in_repo, endpoint=args.endpoint, token=args.token)
        built = dataclasses.replace(built, status="published", hub={
            "repo_id": args.push, "path_in_repo": path_in_repo, "revision": result["revision"],
            "files": result["files"]})
        print(f"pushed {entry.name} to {args.push}/{path_in_repo} at {result['revision']}")
    card_file = write_card(built, out / "card")
    print(f"entry folder {folder}; card {card_file} (copy it into zoo/ to publish the figures)")
    if args.ship:
        print(f"shipped {entry.name}: card {ship(built, folder)}")
    return folder


def ship(built: Any, folder: Path) -> Path:
    """Copy the entry's weights into the package's zoo (`cards/shipped/NAME`) and write its published card there:
    every file of the entry folder hashed (what a push uploads), `load` served from the copy without network."""
    from rsae._io import atomic_folder, sha256_file
    from rsae.zoo.hub import LOADED_FILES
    from rsae.zoo.registry import SHIPPED_DIR, cards_root, write_card

    shipped = f"{SHIPPED_DIR}/{built.name}"
    with atomic_folder(cards_root() / shipped) as staging:
        for name in LOADED_FILES:
            shutil.copy2(folder / name, staging / name)
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    hub = {**built.hub, "revision": built.hub.get("revision") or "main", "files": files}
    return write_card(dataclasses.replace(built, status="published", shipped=shipped, hub=hub))


def held_out_check(model: Any, pipeline: argparse.Namespace) -> dict[str, Any]:
    """The entry's MSE and L0 on the LM's activations (fp32, no cache) of the first `CHECK_SEQUENCES` held-out
    sequences, and where those come from: what a fresh machine recomputes to check a shipped or pulled entry."""
    from rsae.data.cache import ActivationCache
    from rsae.eval.test_run import cache_lm

    held_out = pipeline.out / ("eval-cache" if getattr(pipeline, "eval_corpus", None) else "cache")
    cache = ActivationCache(str(held_out), verify="header")
    shard = 1 if getattr(pipeline, "eval_corpus", None) else len(cache.shards) - 2  # the first tested shard
    start = sum(int(cache.shards[i]["n_sequences"]) for i in range(shard))
    tokens = torch.from_numpy(cache.tokens(shard)[:CHECK_SEQUENCES].astype("int64"))
    figures = check_figures(model, cache_lm(cache), tokens)
    return {"corpus": cache.manifest["corpus"], "seq_len": int(tokens.shape[1]), "first_sequence": start,
            "sequences": int(tokens.shape[0]), "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
            **figures}


def check_figures(model: Any, lm: Any, tokens: torch.Tensor) -> dict[str, float]:
    """MSE (summed over dimensions, mean over tokens) and L0 of `model` on `lm`'s activations at its hook for
    `tokens`, special tokens (BOS) left out as the cache leaves them out."""
    from rsae.data.lm import hook_activations, special_mask

    hook = model.cfg.hook_name
    acts = hook_activations(lm, tokens, [hook], lm.stop_layer([hook]))[hook]
    x = acts[~special_mask(tokens, lm.special_token_ids)].float()
    with torch.no_grad():
        output = model.run(x.to(model.dtype))
    mse = (output.x_hat.float() - x).pow(2).sum(-1).mean()
    return {"mse": float(mse), "l0": float(output.latents.l0())}


def evaluation_data(pipeline: argparse.Namespace) -> dict[str, Any]:
    """What an entry was trained and evaluated on: corpora (with their pinned sources), token counts, split."""
    from rsae.data.text import corpus_sources

    train = {"corpus": pipeline.corpus, "sources": corpus_sources(pipeline.corpus), "cached_tokens": pipeline.n_tokens,
             "training_shards": "8 of 10"}
    if getattr(pipeline, "eval_corpus", None):
        held_out = {"corpus": pipeline.eval_corpus, "sources": corpus_sources(pipeline.eval_corpus),
                    "cached_tokens": pipeline.eval_tokens, "split": "all shards but the first"}
    else:
        held_out = {"corpus": pipeline.corpus, "split": "the training cache's held-out test shard"}
    return {"train": train, "evaluation": held_out, "ce_sequences": pipeline.ce_sequences}


def _pipeline_args(entry: Any, out: Path, args: argparse.Namespace) -> argparse.Namespace:
    """The quickstart's / upgrade's own defaults, then the card's recipe, then this command's overrides."""
    from rsae.cli import quickstart, upgrade

    parser = argparse.ArgumentParser()
    command = entry.recipe["command"]
    (quickstart if command == "quickstart" else upgrade).add_arguments(parser)
    recipe = dict(entry.recipe.get("args", {}))
    positional = [recipe.pop("source")] if command == "upgrade" else []
    if args.source and command == "upgrade":
        positional = [args.source]
    namespace = parser.parse_args(positional)
    for key, value in {**recipe, "out": out}.items():
        setattr(namespace, key, value)
    for key in ("n_tokens", "model"):
        if getattr(args, key) is not None:
            setattr(namespace, key, getattr(args, key))
    if command == "upgrade":
        namespace.revision, namespace.endpoint, namespace.token = args.revision, args.endpoint, args.token
    return namespace
