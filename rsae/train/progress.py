"""`StepProgressBar`: Lightning's rich progress bar, labelled by the step budget when a fit runs for one.

Every rsae stage trains for `trainer.max_steps`, with `max_epochs` unset; Lightning's own bar then reads
"Epoch 2/-2". This one reads "Epoch 2 · step 1200/2000".
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """`RichProgressBar` that shows the global step against `trainer.max_steps` (kept bars by default)."""

    def __init__(self, leave: bool = True, **kwargs: Any) -> None:
        super().__init__(leave=leave, **kwargs)

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch} · step {trainer.global_step}/{trainer.max_steps}"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))
