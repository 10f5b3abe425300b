"""`RemezInit`: a Lightning callback that initialises an RSAE from its teacher before training.

Contract with the training LightningModule: the RSAE being trained is `pl_module.sae` (an
`rsae.RSAE`). Its configuration (degree, mode, coefficient sharing) decides what is fitted; the
callback fills in its weights in place, so optimisers already built over its parameters keep
working.

Before the first step (`on_fit_start`, after Lightning restored any checkpoint) it:

1. does nothing if the fit resumes from a checkpoint (`trainer.ckpt_path` set): the resumed
   weights win;
2. checks the teacher against the RSAE and the data (d_in, d_sae, hook point, family) and raises
   ValueError naming both values and the fix;
3. copies the teacher's weights, looks up the gate coefficients in the shipped Remez tables (else
   fits them; masked mode needs none: it starts from the identity);
4. calibrates scales and coefficients on `calibration_tokens` tokens from the fit's training
   dataloader (`rsae.train.calibration.calibrate`);
5. logs the fit error and the calibration figures to every logger (Lightning forbids
   `self.log` in `on_fit_start`) and prints a one-line summary.

On several processes each rank calibrates on its own batches; rank 0's result is broadcast, so
all ranks start from the same weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from rsae.nn.batches import activations_of
from rsae.nn.config import GateMode
from rsae.nn.rational_sae import RSAE
from rsae.nn.sae import SparseAutoencoder
from rsae.rational.remez import GateFit, fit_gate, lookup_fit
from rsae.train.calibration import CalibrationReport, calibrate
from rsae.zoo.checkpoint import load

__all__ = ["RemezInit"]


class RemezInit(pl.Callback):
    """Initialise `pl_module.sae` (an RSAE) from a teacher SAE before fitting; a no-op when resuming.

    Args:
        teacher: path to an rsae checkpoint folder (loaded with `rsae.load`) or a baseline SAE; None takes
            the LightningModule's `teacher` attribute (as `rsae.train.modules.GateCalibration` holds), so a YAML
            config names the teacher once.
        degree: expected (p, q) of the RSAE's gate; None accepts the RSAE's own. Given, it must match.
        mode: expected gate mode; None accepts the RSAE's own. Given, it must match.
        gap: half-width of the gap excluded around the jump in the Remez fit (jumprelu / topk);
            None is the fitter's default (the shipped tables' setting).
        threshold_eps: thresholded mode's zero band, in units of C_out; None uses twice the fit's
            max error (`RSAE.from_teacher`'s default) and writes it into the RSAE's cfg.
        calibration_tokens: tokens drawn from the training dataloader for calibration.
        refine_steps: Adam steps of the L2 gate refine (pure / thresholded modes).
        quantile: high quantile of active pre-activations for the masked / ReLU scales.

    After it ran, `fit` holds the GateFit used (None in masked mode) and `report` the
    CalibrationReport; `skipped` is True when it did nothing because the fit resumed.
    """

    def __init__(
        self,
        teacher: str | Path | SparseAutoencoder | None = None,
        degree: tuple[int, int] | None = None,
        mode: GateMode | None = None,
        gap: float | None = None,
        threshold_eps: float | None = None,
        calibration_tokens: int = 65536,
        refine_steps: int = 300,
        quantile: float = 0.99,
    ) -> None:
        super().__init__()
        if calibration_tokens < 1:
            raise ValueError(f"calibration_tokens must be a positive int, got {calibration_tokens}")
        self.teacher = teacher
        self.degree = tuple(degree) if degree is not None else None
        self.mode = mode
        self.gap = gap
        self.threshold_eps = threshold_eps
        self.calibration_tokens = calibration_tokens
        self.refine_steps = refine_steps
        self.quantile = quantile
        self.fit: GateFit | None = None
        self.report: CalibrationReport | None = None
        self.skipped = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            self.skipped = True
            rank_zero_info(f"RemezInit: resuming from {trainer.ckpt_path}; keeping the checkpoint's weights")
            return
        rsae = getattr(pl_module, "sae", None)
        if not isinstance(rsae, RSAE):
            raise TypeError(
                f"RemezInit needs the LightningModule to hold the RSAE being trained as `.sae`; "
                f"{type(pl_module).__name__}.sae is {type(rsae).__name__}"
            )
        teacher = self._load_teacher(pl_module).to(rsae.device).eval()
        self._check_teacher(teacher, rsae)
        batches = _calibration_batches(trainer, rsae.device)
        first = next(batches, None)
        if first is None:
            raise ValueError("RemezInit: the training dataloader yielded no batch to calibrate on")
        self._check_data(trainer, teacher, first)
        stream = _take_tokens(itertools.chain([first], batches), self.calibration_tokens)

        cfg = rsae.cfg
        assert cfg.degree is not None and cfg.family is not None
        if cfg.mode != "masked":
            fit = lookup_fit(cfg.family, cfg.degree, gap=self.gap)
            self.fit = fit or fit_gate(cfg.family, cfg.degree, gap=self.gap)
        fresh = RSAE.from_teacher(
            teacher,
            degree=cfg.degree,
            mode=cfg.mode,
            coefficient_sharing=cfg.coefficient_sharing,
            n_coefficient_groups=cfg.n_coefficient_groups,
            fit=self.fit,
            # calibrate() re-estimates every scale from the whole stream; one batch satisfies from_teacher.
            activations=first if cfg.family == "topk" and cfg.mode != "masked" else None,
            threshold_eps=self.threshold_eps,
        )
        self.report = calibrate(fresh, teacher, stream, quantile=self.quantile, refine_steps=self.refine_steps,
                                fit=self.fit)
        state, threshold_eps = trainer.strategy.broadcast((fresh.state_dict(), fresh.cfg.threshold_eps), src=0)
        rsae.load_state_dict(state)
        cfg.threshold_eps = threshold_eps
        self._log(trainer)

    # ------------------------------------------------------------------------------------------
    def _load_teacher(self, pl_module: pl.LightningModule) -> SparseAutoencoder:
        teacher = self.teacher if self.teacher is not None else getattr(pl_module, "teacher", None)
        if teacher is None:
            raise ValueError(
                f"RemezInit has no teacher: pass RemezInit(teacher=FOLDER) or give {type(pl_module).__name__} "
                "a `teacher` attribute (an SAE or an rsae checkpoint folder)"
            )
        return teacher if isinstance(teacher, SparseAutoencoder) else load(teacher)

    def _check_teacher(self, teacher: SparseAutoencoder, rsae: RSAE) -> None:
        if teacher.cfg.architecture == "rsae":
            raise ValueError("RemezInit: the teacher must be a baseline SAE (relu, jumprelu or topk), not an RSAE")
        for name in ("d_in", "d_sae", "hook_name", "family"):
            theirs, mine = getattr(teacher.cfg, name), getattr(rsae.cfg, name)
            if theirs != mine:
                raise ValueError(
                    f"RemezInit: teacher {name}={theirs!r} does not match the RSAE's {name}={mine!r}; "
                    f"build the RSAE with the teacher's config (e.g. RSAE.from_teacher(teacher).cfg) "
                    f"or pass the teacher trained on this hook point and width"
                )
        for name, wanted in (("degree", self.degree), ("mode", self.mode)):
            if wanted is not None and wanted != getattr(rsae.cfg, name):
                raise ValueError(
                    f"RemezInit({name}={wanted!r}) does not match the RSAE's {name}={getattr(rsae.cfg, name)!r}; "
                    f"drop the argument or build the RSAE with {name}={wanted!r}"
                )

    def _check_data(self, trainer: pl.Trainer, teacher: SparseAutoencoder, first: Tensor) -> None:
        width = first.shape[-1]
        if width != teacher.cfg.d_in:
            raise ValueError(
                f"RemezInit: the training data has width {width} but the teacher has d_in={teacher.cfg.d_in}; "
                f"use a teacher trained on these activations (hook {teacher.cfg.hook_name!r})"
            )
        datamodule = getattr(trainer, "datamodule", None)
        for name in ("hook_name", "d_in"):
            theirs = getattr(datamodule, name, None)
            if theirs is not None and theirs != getattr(teacher.cfg, name):
                raise ValueError(
                    f"RemezInit: the datamodule has {name}={theirs!r} but the teacher has "
                    f"{name}={getattr(teacher.cfg, name)!r}; cache activations at the teacher's hook point "
                    f"or pass the teacher trained on {theirs!r}"
                )

    def _log(self, trainer: pl.Trainer) -> None:
        assert self.report is not None
        metrics: dict[str, float] = {
            "remez_init/gate_l2_before": self.report.gate_l2_before,
            "remez_init/gate_l2_after": self.report.gate_l2_after,
            "remez_init/dead_latents": float(self.report.dead_latents),
            "remez_init/seconds": self.report.seconds,
        }
        if self.fit is not None:
            metrics["remez_init/fit_max_error"] = self.fit.max_error
            metrics["remez_init/fit_min_q"] = self.fit.min_q
        metrics.update({f"remez_init/{k}": float(v) for k, v in self.report.figures.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        fit = "identity (masked)" if self.fit is None else f"fit max_error {self.fit.max_error:.3e}"
        rank_zero_info(f"RemezInit: {fit}; {self.report.summary()}")


def _calibration_batches(trainer: pl.Trainer, device: torch.device) -> Iterator[Tensor]:
    """Activation batches from the fit's training dataloader (datamodule, module hook or the loader given to fit)."""
    # The fit loop sets its train dataloader up only after on_fit_start; its source knows where it comes from.
    loader: Any = trainer.fit_loop._data_source.dataloader()
    for item in loader:
        x = activations_of(item)
        yield x.reshape(-1, x.shape[-1]).to(device)


def _take_tokens(batches: Iterator[Tensor], n_tokens: int) -> Iterator[Tensor]:
    """The first `n_tokens` rows of the stream (fewer if it ends first)."""
    seen = 0
    for x in batches:
        x = x[: n_tokens - seen]
        yield x
        seen += x.shape[0]
        if seen >= n_tokens:
            return
