"""`rsae import SOURCE OUT_FOLDER`: an SAE in a public format, written as an rsae checkpoint folder."""

from __future__ import annotations

import argparse
import json

from rsae.zoo.importers import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a folder or file, hf:OWNER/NAME[/PATH][@REVISION], or saelens:RELEASE/SAE_ID")
    parser.add_argument("out", help="the rsae checkpoint folder to write")
    parser.add_argument("--format", choices=FORMATS, default=None, help="the source's format (default: detected)")
    parser.add_argument("--revision", default=None, help="Hub revision (hf: and saelens: sources)")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (a mirror or a private Hub)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / the login)")


def run(args: argparse.Namespace) -> int:
    from rsae.zoo.checkpoint import save
    from rsae.zoo.importers import import_sae

    model = import_sae(args.source, format=args.format, revision=args.revision, endpoint=args.endpoint,
                       token=args.token)
    folder = save(model, args.out)
    cfg = model.cfg
    print(f"imported a {cfg.source.get('format')} {cfg.architecture} SAE (d_in {cfg.d_in}, d_sae {cfg.d_sae}"
          + (f", k {cfg.k}" if cfg.k else "") + f") of {cfg.hook_name} in {cfg.model_name} into {folder}")
    if cfg.source.get("lm_processing"):
        print(f"  trained on the LM processed as {json.dumps(cfg.source['lm_processing'])}: "
              "`rsae upgrade` caches its activations the same way")
    return 0
