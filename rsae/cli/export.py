"""`rsae export FOLDER --format saelens OUT`: an rsae checkpoint in another library's format."""

from __future__ import annotations

import argparse

EXPORT_FORMATS = ("saelens",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="an rsae checkpoint folder (rsae.save / an exported stage)")
    parser.add_argument("out", help="the folder to write")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="saelens", help="the target format")


def run(args: argparse.Namespace) -> int:
    from rsae.zoo.checkpoint import load
    from rsae.zoo.export import export_saelens

    model = load(args.folder)
    folder = export_saelens(model, args.out)
    print(f"exported the {model.cfg.architecture} SAE of {args.folder} as a SAELens folder: {folder}"
          + (" (load it in SAELens after rsae.integrations.saelens.register())"
             if model.cfg.architecture == "rsae" else ""))
    return 0
