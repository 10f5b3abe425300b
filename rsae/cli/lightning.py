"""`rsae fit | validate | test`: Lightning's CLI over the rsae LightningModules and `ActivationDataModule`.

Everything is configurable from YAML (`class_path` / `init_args`) or flags: the model (any `SAEModule`
subclass: `TeacherTraining`, `GateCalibration`, `FineTuning`, `Evaluation`), the data, callbacks
(`rsae.train.RemezInit` among them) and the trainer. The data's width, hook point and LM name are linked
into the model, so they are never typed twice. Ready configs live in `configs/`.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from rsae.data.datamodule import ActivationDataModule
from rsae.train.modules import SAEModule

# Lightning's generic advice that does not apply here: ActivationDataModule is single-process and resumes
# mid-epoch through its own state; GateCalibration keeps its frozen teacher in eval mode on purpose; the quickstart
# runs LightningCLI in-process with its own arguments; the treespec notice is Lightning's own deprecation.
IRRELEVANT_WARNINGS = ("Your `IterableDataset` has `__len__` defined", "You're resuming from a checkpoint that ended "
                       "before", r"Found \d+ module\(s\) in eval mode", "LightningCLI's args parameter is intended",
                       r".*isinstance\(treespec, LeafSpec\)")
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                     "lightning.fabric.utilities.seed")


class _OncePerMessage(logging.Filter):
    """Lets each distinct message through once (every Trainer repeats its device lines) and drops the
    advertisements for cloud services that every Trainer prints."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage())
        if message.startswith("💡 Tip") or message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """For the duration of a command: Lightning's device lines once, none of its irrelevant warnings. Undone on
    exit, so the process's warning filters and loggers are as the caller left them."""
    once = _OncePerMessage()
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    with warnings.catch_warnings():
        for message in IRRELEVANT_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.addFilter(once)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(once)


class RSAECLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("d_in", "hook_name", "model_name"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


def build_cli(args: list[str] | dict[str, Any] | None, run: bool = True) -> RSAECLI:
    """LightningCLI over `SAEModule` subclasses and `ActivationDataModule` (`args=None` reads sys.argv)."""
    return RSAECLI(SAEModule, ActivationDataModule, subclass_mode_model=True, args=args, run=run,
                   save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


def main(argv: list[str]) -> int:
    """Run one LightningCLI subcommand (`argv[0]` is fit, validate or test)."""
    # From the console, LightningCLI reads sys.argv itself (and warns when given it twice).
    with quiet_lightning():
        build_cli(None if argv == sys.argv[1:] else argv)
    return 0
