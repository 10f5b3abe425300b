"""RemezInit: initialise `pl_module.sae` from a teacher before fitting; keep resumed weights; refuse mismatches."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import Tensor
from torch.utils.data import DataLoader

import rsae
from rsae.nn.rational_sae import RSAE
from rsae.nn.sae import SparseAutoencoder
from rsae.train.remez_init import RemezInit

from helpers import D_IN, make_sae, sparse_dictionary_data, train

pytestmark = pytest.mark.usefixtures("small_cpu_settings")


DATA = sparse_dictionary_data(n_tokens=2048)


@pytest.fixture(scope="module")
def teacher() -> SparseAutoencoder:
    model = make_sae("jumprelu")
    train(model, DATA, steps=150, sparsity_coefficient=1e-3)
    return model.eval()


class Module(pl.LightningModule):
    """The contract RemezInit relies on: the RSAE being trained is `self.sae`."""

    def __init__(self, sae: RSAE, lr: float = 1e-3) -> None:
        super().__init__()
        self.sae = sae
        self.lr = lr

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.sae.training_loss(batch).total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.sae.parameters(), lr=self.lr)


class Data(pl.LightningDataModule):
    def __init__(self, x: Tensor, **attributes: Any) -> None:
        super().__init__()
        self.x = x
        for name, value in attributes.items():
            setattr(self, name, value)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.x, batch_size=256)


class Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)


def blank_rsae(teacher: SparseAutoencoder, mode: str = "masked") -> RSAE:
    """An RSAE with the teacher's config but its own random weights, as a training config would build it."""
    cfg = dataclasses.replace(teacher.cfg, architecture="rsae", degree=(9, 8), mode=mode, extra={})
    return RSAE(cfg)


def trainer(tmp_path: Path, steps: int, callbacks: list[pl.Callback], logger: Any = False) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=callbacks, logger=logger,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=any(
                          isinstance(c, ModelCheckpoint) for c in callbacks), default_root_dir=tmp_path)


def test_copies_the_teacher_and_calibrates_before_the_first_step(teacher, tmp_path) -> None:
    module = Module(blank_rsae(teacher), lr=0.0)  # lr 0: what fit leaves is what the callback set
    callback = RemezInit(teacher, calibration_tokens=1024)
    logger = Recorder()
    trainer(tmp_path, 1, [callback], logger).fit(module, datamodule=Data(DATA))
    with torch.no_grad():
        assert torch.allclose(module.sae(DATA), teacher(DATA), atol=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(module.sae, name), getattr(teacher, name))
    assert callback.report is not None and callback.report.n_tokens == 1024 and not callback.skipped
    assert logger.metrics["remez_init/cosine"] > 0.9999
    assert "remez_init/gate_l2_after" in logger.metrics


def test_thresholded_mode_from_a_checkpoint_path_logs_the_fit(teacher, tmp_path) -> None:
    rsae.save(teacher, tmp_path / "teacher")
    module = Module(blank_rsae(teacher, "thresholded"), lr=0.0)
    callback = RemezInit(str(tmp_path / "teacher"), mode="thresholded", calibration_tokens=1024, refine_steps=200)
    logger = Recorder()
    trainer(tmp_path, 1, [callback], logger).fit(module, train_dataloaders=DataLoader(DATA, batch_size=256))
    assert logger.metrics["remez_init/fit_max_error"] == pytest.approx(0.0718, abs=1e-3)
    assert logger.metrics["remez_init/gate_l2_after"] < logger.metrics["remez_init/gate_l2_before"]
    assert module.sae.cfg.threshold_eps == callback.report.threshold_eps
    assert logger.metrics["remez_init/cosine"] > 0.98


def test_resuming_keeps_the_checkpoint_weights(teacher, tmp_path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = Module(blank_rsae(teacher), lr=1e-2)
    trainer(tmp_path, 2, [RemezInit(teacher, calibration_tokens=512), checkpoint]).fit(first, datamodule=Data(DATA))
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)["state_dict"]
    # Two steps at lr 1e-2 moved the weights away from the teacher: a re-initialisation would show.
    assert not torch.equal(saved["sae.W_enc"], teacher.W_enc)

    second = Module(blank_rsae(teacher), lr=0.0)
    callback = RemezInit(teacher, calibration_tokens=512)
    # max_steps=2: the resumed run stops at once (the restored optimiser state carries lr 1e-2).
    trainer(tmp_path, 2, [callback]).fit(second, datamodule=Data(DATA), ckpt_path=str(last))
    assert callback.skipped and callback.report is None
    for name, value in second.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_refuses_a_teacher_that_does_not_match(teacher, tmp_path) -> None:
    wider = make_sae("jumprelu", d_sae=64)
    with pytest.raises(ValueError, match=r"d_sae=64 .* d_sae=128"):
        trainer(tmp_path, 1, [RemezInit(wider)]).fit(Module(blank_rsae(teacher)), datamodule=Data(DATA))
    other_hook = make_sae("jumprelu", hook_name="blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match="hook_name"):
        trainer(tmp_path, 1, [RemezInit(other_hook)]).fit(Module(blank_rsae(teacher)), datamodule=Data(DATA))
    with pytest.raises(ValueError, match="mode"):
        trainer(tmp_path, 1, [RemezInit(teacher, mode="pure")]).fit(Module(blank_rsae(teacher)),
                                                                     datamodule=Data(DATA))


def test_refuses_data_that_does_not_match_the_teacher(teacher, tmp_path) -> None:
    narrow = Data(DATA[:, : D_IN // 2])
    with pytest.raises(ValueError, match=f"width {D_IN // 2} .* d_in={D_IN}"):
        trainer(tmp_path, 1, [RemezInit(teacher)]).fit(Module(blank_rsae(teacher)), datamodule=narrow)
    elsewhere = Data(DATA, hook_name="blocks.9.hook_resid_post")
    with pytest.raises(ValueError, match="blocks.9.hook_resid_post"):
        trainer(tmp_path, 1, [RemezInit(teacher)]).fit(Module(blank_rsae(teacher)), datamodule=elsewhere)


def test_needs_an_rsae_at_pl_module_sae(teacher, tmp_path) -> None:
    module = Module(blank_rsae(teacher))
    module.sae = make_sae("jumprelu")
    with pytest.raises(TypeError, match=r"\.sae"):
        trainer(tmp_path, 1, [RemezInit(teacher)]).fit(module, datamodule=Data(DATA))
