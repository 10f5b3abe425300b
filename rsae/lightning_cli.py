"""`rsae fit | validate | test`: Lightning's CLI over the rsae LightningModules and `ActivationDataModule`.

Everything is configurable from YAML (`class_path` / `init_args`) or flags: the model (any `SAEModule`
subclass: `TeacherTraining`, `GateCalibration`, `FineTuning`, `Evaluation`), the data, callbacks
(`rsae.RemezInit` among them) and the trainer. The data's width, hook point and LM name are linked into
the model, so they are never typed twice. Ready configs live in `configs/`.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from rsae.data import ActivationDataModule
from rsae.training import SAEModule


class RSAECLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("d_in", "hook_name", "model_name"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


def main(argv: list[str]) -> int:
    """Run one LightningCLI subcommand (`argv[0]` is fit, validate or test)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # From the console, LightningCLI reads sys.argv itself (and warns when given it twice).
    args = None if argv == sys.argv[1:] else argv
    RSAECLI(SAEModule, ActivationDataModule, subclass_mode_model=True, args=args,
            save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    return 0
