"""`rsae zoo list | card | pull | push | build`: the model zoo from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

ENTRY_FILES = {"cfg.json": "rsae/sae/cfg.json", "weights.safetensors": "rsae/sae/weights.safetensors",
               "report.json": "reports/rsae/report.json", "gate_shapes.png": "reports/rsae/gate_shapes.png"}
"""An entry folder's files and where a pipeline run leaves them (relative to its --out)."""


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
    from rsae.cli.quickstart import STAGES
    from rsae.eval.report import TABLE_METRICS
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
    folder.mkdir(parents=True, exist_ok=True)
    for name, produced in ENTRY_FILES.items():
        if (out / produced).is_file():
            shutil.copy2(out / produced, folder / name)
    table = {}
    for run in STAGES:
        metrics = json.loads((out / "reports" / run / "report.json").read_text())["metrics"]
        table[run] = {metric: metrics.get(metric) for metric in TABLE_METRICS}
    cfg = json.loads((folder / "cfg.json").read_text())
    built = dataclasses.replace(entry, evaluation={"table": table, "data": f"{pipeline.corpus}, held-out shard of "
                                                   f"{pipeline.n_tokens} cached tokens",
                                                   "seconds": round(time.perf_counter() - start)})
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
    return folder


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
