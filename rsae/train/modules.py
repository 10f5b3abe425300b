"""LightningModules for every training stage of the RSAE pipeline.

* `TeacherTraining`: a baseline SAE (relu, jumprelu, topk) from scratch on cached activations.
* `GateCalibration` (stage 1): teacher weights frozen; the gate's coefficients and per-latent scales are
  fitted to the teacher's gate on real pre-activations, after `RemezInit` (which this module adds unless the
  trainer already has one) has set them up.
* `FineTuning` (stage 2): everything unfrozen, MSE plus the family's sparsity term; the gate gets its own
  learning rate. Pointed at the teacher's folder instead of the RSAE's, the same recipe is the control run.
* `Evaluation`: no training; `rsae test` of an exported checkpoint folder.

They share `SAEModule`: the optimiser recipe (Adam, warm-up then decay, a separate gate learning rate),
decoder handling (unit-norm rows for topk / jumprelu, the norm-weighted penalty for relu and pure gates),
dead-latent tracking over a token window (fed to AuxK), b_dec initialised from the first batch, tokens/s on
the progress bar, validation / test metrics, the test report, and the export to an rsae checkpoint folder at
the end of fit. Mixed precision is the trainer's (`precision: bf16-mixed`).

Scales: the SAE trains in the DataModule's (possibly normalised) space. Checkpoint folders hold SAEs for raw
activations (`SparseAutoencoder.set_input_scale`); loading one re-folds it into the data's scale, exporting
folds it back, and every reported metric is in raw activation units.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from rsae.eval.metrics import SAEMetrics
from rsae.eval.test_run import EvalConfig, TestRun
from rsae.nn.batches import activations_of
from rsae.nn.config import CoefficientSharing, Family, GateMode, SAEConfig
from rsae.nn.rational_sae import RSAE, gate_l2
from rsae.nn.registry import build_model
from rsae.nn.sae import SparseAutoencoder
from rsae.train.sharding import copy_full_, full_state_dict, set_decoder_norm_to_unit_norm, shard_sae
from rsae.zoo.checkpoint import load, save

DecoderHandling = Literal["auto", "unit_norm", "penalty"]
Decay = Literal["cosine", "linear", "constant"]


TRAINED_SPARSITY = "trained_sparsity_coefficient"
"""Key in an exported checkpoint's `cfg.extra`: the sparsity coefficient its training ended with."""


class SAEModule(pl.LightningModule):
    """What every stage shares; subclasses build `self.sae` and may override `loss`.

    Args:
        lr: Adam learning rate of the SAE weights.
        gate_lr: learning rate of the rational gate's parameters (None: `lr`).
        threshold_lr: learning rate of JumpReLU thresholds (None: `lr`). Adam moves a parameter by about its
            learning rate per step whatever the sparsity coefficient, so thresholds that start near zero need a
            larger one to reach a sparse L0 within a short run.
        betas: Adam betas.
        warmup_steps: linear learning-rate warm-up.
        decay: learning-rate decay after warm-up, to `min_lr_ratio * lr` at the last step.
        min_lr_ratio: final learning rate as a fraction of the peak.
        sparsity_coefficient: weight of the family's sparsity term (ignored by topk, which fixes k).
        sparsity_warmup_steps: the sparsity weight ramps up linearly over these steps (0: from the start).
        target_l0: hold L0 at this value while training by scaling the sparsity coefficient, a multiplicative
            controller (`log multiplier += l0_controller_gain * clip(log(l0 / target_l0), -1, 1)` after every step
            once the sparsity warm-up is over,
            the batch L0 averaged over ranks: the log ratio treats "twice too many" and "half too few" alike, and
            the clip bounds each step when a from-scratch SAE starts with thousands of active latents); 'initial': the L0 of the first training batch (fine-tuning from a teacher or
            an RSAE-init: the teacher's), so that the RSAE and the control end at the L0 they started from and
            compare like for like; None: off. Only families with a sparsity term (not TopK) are moved by it.
        l0_controller_gain: the controller's step size, in log units per unit of log L0 error.
        auxk_coefficient: weight of the AuxK loss on dead latents (topk family).
        dead_window_tokens: a latent that has not fired in this many training tokens counts as dead.
        decoder: 'unit_norm' keeps decoder rows at unit norm (gradient projected, rows renormalised after each
            step); 'penalty' leaves norms free for the norm-weighted L1; 'auto' picks per family and mode: unit
            norm for topk / jumprelu (not pure RSAEs) whose decoder rows are at unit norm when the fit starts, free
            norms otherwise (an imported teacher refolded into the data's scale keeps what it computes).
        export_dir: at the end of fit, the trained SAE is written here as an rsae checkpoint folder.
        evaluation: what `validate` / `test` measure and where the test report goes.
        d_in / hook_name / model_name: linked from the DataModule by the CLI; checked against the SAE.
    """

    def __init__(self, lr: float = 1e-3, gate_lr: float | None = None, threshold_lr: float | None = None, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_steps: int = 100, decay: Decay = "cosine", min_lr_ratio: float = 0.1,
                 sparsity_coefficient: float = 0.0, sparsity_warmup_steps: int = 0,
                 target_l0: float | Literal["initial"] | None = None, l0_controller_gain: float = 0.02,
                 auxk_coefficient: float = 1 / 32,
                 dead_window_tokens: int = 10_000_000, decoder: DecoderHandling = "auto", export_dir: str | None = None,
                 evaluation: EvalConfig | None = None, d_in: int | None = None, hook_name: str | None = None,
                 model_name: str | None = None) -> None:
        super().__init__()
        if lr <= 0 or any(other is not None and other < 0 for other in (gate_lr, threshold_lr)):
            raise ValueError(f"lr={lr}, gate_lr={gate_lr}, threshold_lr={threshold_lr}: learning rates must be positive")
        if decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"decay={decay!r}: expected 'cosine', 'linear' or 'constant'")
        if decoder not in ("auto", "unit_norm", "penalty"):
            raise ValueError(f"decoder={decoder!r}: expected 'auto', 'unit_norm' or 'penalty'")
        self.lr, self.gate_lr, self.threshold_lr, self.betas = lr, gate_lr, threshold_lr, tuple(betas)
        self.warmup_steps, self.decay, self.min_lr_ratio = warmup_steps, decay, min_lr_ratio
        self.sparsity_coefficient, self.sparsity_warmup_steps = sparsity_coefficient, sparsity_warmup_steps
        if target_l0 not in (None, "initial") and not (isinstance(target_l0, (int, float)) and target_l0 > 0):
            raise ValueError(f"target_l0={target_l0!r}: expected a positive number, 'initial' or None")
        self.target_l0, self.l0_controller_gain = target_l0, l0_controller_gain
        self.auxk_coefficient, self.dead_window_tokens = auxk_coefficient, dead_window_tokens
        self.decoder_handling = decoder
        self.export_dir = export_dir
        self.evaluation = evaluation or EvalConfig()
        self.data_d_in, self.data_hook_name, self.data_model_name = d_in, hook_name, model_name
        self.sae: SparseAutoencoder
        self._last_step_time: float | None = None
        self._tokens_per_second = 0.0
        self._test_run: TestRun | None = None

    # --- set-up ----------------------------------------------------------------------------------
    def _set_sae(self, sae: SparseAutoencoder) -> None:
        self._check_against_data(sae.cfg)
        self.sae = sae
        self.val_metrics = SAEMetrics(sae.cfg.d_sae, sae.cfg.l0_tolerance, sae.cfg.d_in, sae.zero_band)
        self.test_metrics = SAEMetrics(sae.cfg.d_sae, sae.cfg.l0_tolerance, sae.cfg.d_in, sae.zero_band)
        # Tokens since each latent last fired; a buffer so it travels with checkpoints and devices.
        self.register_buffer("tokens_since_fired", torch.zeros(sae.cfg.d_sae, dtype=torch.long))
        self.register_buffer("b_dec_initialised", torch.tensor(False))
        # Whether rows were at unit norm when the fit began: decided once, and kept across a resume.
        self.register_buffer("decoder_started_at_unit_norm", torch.tensor(True))
        # The L0 controller's state (see target_l0), in buffers so that a resumed fit continues it exactly.
        self.register_buffer("l0_target_value", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("sparsity_log_multiplier", torch.tensor(0.0, dtype=torch.float64))

    def _check_against_data(self, cfg: SAEConfig) -> None:
        for name, theirs in (("d_in", self.data_d_in), ("hook_name", self.data_hook_name)):
            if theirs is not None and theirs != getattr(cfg, name):
                raise ValueError(
                    f"the data has {name}={theirs!r} but the SAE has {name}={getattr(cfg, name)!r}; train on "
                    f"activations of the SAE's hook point, or start from an SAE for {theirs!r}"
                )

    def data_scale(self) -> float:
        """Factor the DataModule multiplies raw activations by (1.0 outside a trainer or without normalising)."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        return float(getattr(datamodule, "norm_factor", 1.0))

    def load_sae_folder(self, folder: str) -> SparseAutoencoder:
        """An rsae checkpoint folder (an SAE for raw activations), refolded for the data's scale in `setup`."""
        try:
            return load(folder)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{err}; run the stage that exports it first (teacher -> calibrate -> finetune: "
                "rsae fit --config configs/<family>-teacher.yaml, then <family>-calibrate.yaml)"
            ) from err

    def setup(self, stage: str) -> None:
        if self.sae.input_scale != self.data_scale():
            self.sae.set_input_scale(self.data_scale())

    def configure_model(self) -> None:
        """Under Lightning's `ModelParallelStrategy`, shard the SAE with FSDP2 for fitting (`rsae.train.sharding`)."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        if self.trainer.state.fn != "fit":
            return  # validate / test: the full SAE on every rank, each evaluating its own rows
        if isinstance(self, GateCalibration):
            raise NotImplementedError("stage 1 trains only the rational gate and is not sharded: run it with "
                                      "trainer.strategy: ddp")
        shard_sae(self.sae, self.device_mesh)

    @property
    def family(self) -> str:
        return str(self.sae.cfg.family)

    def unit_norm_decoder(self) -> bool:
        if self.decoder_handling != "auto":
            return self.decoder_handling == "unit_norm"
        pure = self.sae.cfg.architecture == "rsae" and self.sae.cfg.mode == "pure"
        # A frozen decoder (stage 1) is never renormalised: the projection and the renorm are for trained rows.
        trained = self.sae.W_dec.requires_grad
        return self.family in ("topk", "jumprelu") and not pure and trained and bool(self.decoder_started_at_unit_norm)

    # --- optimisation --------------------------------------------------------------------------
    def trainable_parameters(self) -> tuple[list[Tensor], list[Tensor]]:
        """(SAE weights, gate parameters) to optimise; stages freeze what they do not train."""
        gate = [p for n, p in self.sae.named_parameters() if n.startswith("gate.")]
        gate_ids = {id(p) for p in gate}
        rest = [p for p in self.sae.parameters() if id(p) not in gate_ids]
        return [p for p in rest if p.requires_grad], [p for p in gate if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        weights, gate = self.trainable_parameters()
        thresholds = {id(p) for name, p in self.sae.named_parameters() if name == "threshold"}
        groups = [{"params": [p for p in weights if id(p) not in thresholds], "lr": self.lr, "name": "weights"},
                  {"params": [p for p in weights if id(p) in thresholds], "name": "thresholds",
                   "lr": self.threshold_lr if self.threshold_lr is not None else self.lr}]
        if gate:
            groups.append({"params": gate, "lr": self.gate_lr if self.gate_lr is not None else self.lr, "name": "gate"})
        groups = [g for g in groups if g["params"]]
        optimiser = torch.optim.Adam(groups, betas=self.betas)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: self.lr_factor(step, total))
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def lr_factor(self, step: int, total: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        progress = min((step - self.warmup_steps) / max(total - self.warmup_steps, 1), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape

    def trained_sparsity_coefficient(self) -> float:
        """The sparsity coefficient as training left it: the configured one times the L0 controller's multiplier."""
        return self.sparsity_coefficient * math.exp(float(self.sparsity_log_multiplier))

    def sparsity_weight(self) -> float:
        ramp = 1.0 if self.sparsity_warmup_steps <= 0 else min(1.0, (self.global_step + 1) / self.sparsity_warmup_steps)
        return ramp * self.trained_sparsity_coefficient()

    def _control_l0(self, l0: Tensor) -> None:
        """One step of the L0 controller (see `target_l0`)."""
        if self.target_l0 is None or self.global_step < self.sparsity_warmup_steps:
            return  # during the warm-up the ramp, not the controller, sets the weight
        l0 = l0.detach().double()
        if self._trainer is not None:
            l0 = self.trainer.strategy.reduce(l0, reduce_op="mean")
        if torch.isnan(self.l0_target_value):
            self.l0_target_value.fill_(float(l0) if self.target_l0 == "initial" else float(self.target_l0))
        error = min(max(math.log(max(float(l0), 1e-3) / max(float(self.l0_target_value), 1e-12)), -1.0), 1.0)
        self.sparsity_log_multiplier.add_(self.l0_controller_gain * error).clamp_(-20.0, 20.0)
        self.log("train/sparsity_multiplier", math.exp(float(self.sparsity_log_multiplier)), prog_bar=False)

    # --- training ------------------------------------------------------------------------------
    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on a batch and what to log; the default is the SAE's own training loss."""
        dead = self.tokens_since_fired >= self.dead_window_tokens
        out = self.sae.training_loss(x, self.sparsity_weight(), dead if dead.any() else None, self.auxk_coefficient)
        self._track_firing(out.output.latents.values, out.output.latents.indices, x.shape[0])
        logs = {"loss": out.total, "mse": out.mse, "sparsity": out.sparsity, "auxk": out.auxk,
                "l0": out.output.latents.l0(), "dead_fraction": dead.float().mean()}
        return out.total, logs

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = activations_of(batch)
        if not bool(self.b_dec_initialised):
            self.initialise_b_dec(x)
        total, logs = self.loss(x)
        self._control_l0(logs["l0"])
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"training loss is {total.item()} at step {self.global_step}; lower the learning rate "
                f"(lr={self.lr}, gate_lr={self.gate_lr}) or enable gradient clipping (trainer.gradient_clip_val)"
            )
        self.log_dict({f"train/{k}": v.detach().float() for k, v in logs.items()}, prog_bar=False)
        self.log("loss", logs["loss"].detach().float(), prog_bar=True, logger=False)
        self.log("l0", logs["l0"].detach().float(), prog_bar=True, logger=False)
        self._log_throughput(x.shape[0])
        return total

    def initialise_b_dec(self, x: Tensor) -> None:
        """Set b_dec to the mean of the first batch (averaged over ranks) where the stage trains from scratch."""
        self.b_dec_initialised.fill_(True)

    def _track_firing(self, values: Tensor, indices: Tensor | None, n_tokens: int) -> None:
        with torch.no_grad():
            active = values.detach() != 0
            fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.float32)
            if indices is None:
                fired += active.any(0).float()
            else:
                fired.scatter_add_(0, indices[active].flatten(), torch.ones_like(indices[active], dtype=fired.dtype))
            # Every rank must agree on which latents are dead (AuxK reads the mask).
            fired = self.trainer.strategy.reduce(fired, reduce_op="sum") if self._trainer is not None else fired
            self.tokens_since_fired += n_tokens
            self.tokens_since_fired[fired > 0] = 0

    def _log_throughput(self, n_tokens: int) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            rate = n_tokens * self.trainer.world_size / max(now - self._last_step_time, 1e-9)
            smoothed = self._tokens_per_second
            self._tokens_per_second = rate if smoothed == 0 else 0.9 * smoothed + 0.1 * rate
            self.log("tok/s", self._tokens_per_second, prog_bar=True, logger=False)
            self.log("train/tokens_per_second", rate, prog_bar=False)
        self._last_step_time = now

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Before Lightning clips the gradients, so clipping sees the gradient the step will use.
        if self.unit_norm_decoder():
            self.sae.remove_gradient_parallel_to_decoder_directions()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end, which runs after callbacks (checkpoints) saw the step.
        if self.unit_norm_decoder():
            set_decoder_norm_to_unit_norm(self.sae)  # in place: also for sharded (FSDP) parameters

    def on_fit_start(self) -> None:
        norms = self.sae.W_dec.detach().float().norm(dim=-1)
        at_unit_norm = bool((norms - 1).abs().max() <= 1e-3)
        if self.trainer.ckpt_path is None:
            self.decoder_started_at_unit_norm.fill_(at_unit_norm)
        if self.decoder_handling == "unit_norm" and self.trainer.ckpt_path is None and not at_unit_norm:
            warnings.warn(
                f"decoder rows have norms in [{norms.min():.3g}, {norms.max():.3g}] but decoder='unit_norm' will "
                "renormalise them after the first step, changing what the SAE computes; train on the scale it was "
                "trained on (same data normalisation) or set decoder='penalty'", stacklevel=2)

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    def on_fit_end(self) -> None:
        if self.export_dir is not None:
            state = full_state_dict(self.sae)  # a collective when the SAE is sharded: every rank gathers
            if self.trainer.is_global_zero:
                folder = self.export(self.export_dir, state)
                print(f"rsae: exported the trained {self.sae.cfg.architecture} SAE to {folder}")

    def export(self, folder: str | Path, state: dict[str, Tensor] | None = None) -> Path:
        """Write the SAE for raw activations (the data's normalisation folded into the weights); `state`: its
        full state dict when the SAE is sharded (`rsae.train.sharding.full_state_dict`)."""
        sae = build_model(SAEConfig.from_dict(self.sae.cfg.to_dict()))
        sae.load_state_dict(self.sae.state_dict() if state is None else state)
        if self.sparsity_coefficient > 0:  # what a fine-tuning from this checkpoint continues with by default
            sae.cfg.extra[TRAINED_SPARSITY] = self.trained_sparsity_coefficient()
        sae.set_input_scale(1.0)
        return save(sae, folder)

    # --- validation and test -------------------------------------------------------------------
    def _raw_pair(self, batch: Any, batch_idx: int, split: str) -> tuple[Tensor, Tensor, Any]:
        """(raw activations, raw reconstruction, SAE output) of an evaluation batch, refusing NaN/Inf inputs (the
        model's forward does not check, for speed, and the metrics would silently turn NaN)."""
        x = activations_of(batch)
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            rows = int((~finite).any(-1).sum())
            raise ValueError(f"{split} batch {batch_idx} holds NaN/Inf activations in {rows} of {x.shape[0]} rows; "
                             "rebuild the cache (rsae cache refuses them at write time) or check the data source")
        output = self.sae.run(x)
        scale = self.sae.input_scale
        return x.float() / scale, output.x_hat.float() / scale, output

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, x_hat, output = self._raw_pair(batch, batch_idx, "validation")
        self.val_metrics.update(x, output._replace(x_hat=x_hat))

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.log_dict({f"val/{k}": v for k, v in values.items()}, prog_bar=False, sync_dist=False)
        self.log("val_mse", values["mse"], prog_bar=True, logger=False)
        self.val_metrics.reset()

    def on_test_epoch_start(self) -> None:
        checkpoint = getattr(self, "checkpoint", None) or self.export_dir
        self._test_run = TestRun(self.evaluation, self.sae, self.run_name(), checkpoint)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, x_hat, output = self._raw_pair(batch, batch_idx, "test")
        self.test_metrics.update(x, output._replace(x_hat=x_hat))
        assert self._test_run is not None
        self._test_run.observe(output.pre_acts)

    def on_test_epoch_end(self) -> None:
        assert self._test_run is not None
        metrics = self._test_run.finish(self.test_metrics, self.trainer)
        self.log_dict({f"test/{k}": v for k, v in metrics.items() if v is not None})
        self.test_metrics.reset()

    def run_name(self) -> str:
        return type(self).__name__.lower()


class TeacherTraining(SAEModule):
    """Train a baseline SAE from scratch.

    Args:
        family: 'relu' (L1 weighted by decoder norms), 'jumprelu' (L0 through the straight-through estimator)
            or 'topk' (k per token, AuxK).
        d_sae: number of latents.
        k: active latents per token (topk).
        jumprelu_bandwidth / jumprelu_init_threshold: the JumpReLU estimator's kernel width and start threshold.
        init_b_dec_from_data: set b_dec to the mean activation of the first batch before the first step.
        seed: seeds the weight initialisation.
        **kwargs: the optimiser and evaluation settings of `SAEModule`.
    """

    def __init__(self, family: Family = "topk", d_sae: int = 4608, k: int | None = 32,
                 jumprelu_bandwidth: float = 1e-3, jumprelu_init_threshold: float = 1e-3,
                 init_b_dec_from_data: bool = True, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.data_d_in is None:
            raise ValueError("TeacherTraining needs d_in (the CLI links it from data.d_in; pass it in Python)")
        self.save_hyperparameters()
        cfg = SAEConfig(d_in=self.data_d_in, d_sae=d_sae, architecture=family, k=k if family == "topk" else None,
                        jumprelu_bandwidth=jumprelu_bandwidth, jumprelu_init_threshold=jumprelu_init_threshold,
                        hook_name=self.data_hook_name or "blocks.0.hook_resid_post",
                        model_name=self.data_model_name or "unknown")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self._set_sae(build_model(cfg))
        self.init_b_dec_from_data = init_b_dec_from_data

    def setup(self, stage: str) -> None:
        # Trained from scratch, in the data's scale.
        self.sae.cfg.extra["input_scale"] = self.data_scale()

    def initialise_b_dec(self, x: Tensor) -> None:
        if self.init_b_dec_from_data and self.global_step == 0:
            mean = x.float().mean(0)
            if self._trainer is not None:
                mean = self.trainer.strategy.reduce(mean, reduce_op="mean")
            copy_full_(self.sae.b_dec, mean.to(self.sae.b_dec.dtype))  # also into a sharded b_dec
        super().initialise_b_dec(x)

    def run_name(self) -> str:
        return f"{self.family}-teacher"


ROUNDING_NOISE = 1e-10
"""Relative gate loss below which `GateCalibration` treats the gate as already exact (no step is taken)."""


class GateCalibration(SAEModule):
    """Stage 1: fit the gate of an RSAE to its frozen teacher's gate on real pre-activations.

    The loss is `rsae.nn.rational_sae.gate_l2` (the same objective calibration refines): the decoder-weighted
    squared error of the gate's codes against the teacher's. Only the gate's coefficients, scales and shifts
    train. Unless the trainer has a `RemezInit` callback, this module adds one.

    Args:
        teacher: rsae checkpoint folder of the baseline SAE.
        degree: (p, q) of the rational (None: the family's default).
        mode: 'masked', 'pure' or 'thresholded'.
        coefficient_sharing / n_coefficient_groups: rational coefficients shared, per group or per latent.
        calibration_tokens: tokens `RemezInit` calibrates the scales on.
        **kwargs: the optimiser and evaluation settings of `SAEModule` (lr here is the gate's).
    """

    def __init__(self, teacher: str, degree: tuple[int, int] | None = None, mode: GateMode = "masked",
                 coefficient_sharing: CoefficientSharing = "shared", n_coefficient_groups: int = 1,
                 calibration_tokens: int = 65536, **kwargs: Any) -> None:
        kwargs.setdefault("warmup_steps", 10)
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.teacher_path = teacher
        self.teacher = self.load_sae_folder(teacher).eval().requires_grad_(False)
        # RemezInit copies the teacher's weights and fits and calibrates the gate before the first step (it needs
        # data that __init__ has not got); here the RSAE only takes its shape, in the configured mode.
        masked = RSAE.from_teacher(self.teacher, degree=degree, mode="masked",
                                   coefficient_sharing=coefficient_sharing, n_coefficient_groups=n_coefficient_groups)
        rsae = RSAE(dataclasses.replace(masked.cfg, mode=mode))
        rsae.load_state_dict(masked.state_dict(), strict=False)  # the teacher's weights, until RemezInit runs
        rsae.cfg.extra["teacher"] = str(teacher)
        if TRAINED_SPARSITY in self.teacher.cfg.extra:
            rsae.cfg.extra[TRAINED_SPARSITY] = self.teacher.cfg.extra[TRAINED_SPARSITY]
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            if hasattr(rsae, name):
                getattr(rsae, name).requires_grad_(False)
        self._set_sae(rsae)
        self.b_dec_initialised.fill_(True)
        self.calibration_tokens = calibration_tokens

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.teacher.input_scale != self.data_scale():
            self.teacher.set_input_scale(self.data_scale())
        self.teacher.to(self.device)

    def configure_callbacks(self) -> list[pl.Callback]:
        from rsae.train.remez_init import RemezInit

        if any(isinstance(c, RemezInit) for c in self.trainer.callbacks):
            return []
        return [RemezInit(calibration_tokens=self.calibration_tokens)]

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            h = self.teacher.pre_activations(x.reshape(-1, x.shape[-1]))
            target = self.teacher.activate(h).dense(self.sae.cfg.d_sae).float()
            weight = self.sae.W_dec.float().pow(2).sum(-1)
        loss = gate_l2(self.sae.gate_codes(h), target, weight)
        relative = loss.detach() / (target.pow(2) * weight).sum(-1).mean().clamp_min(1e-30)
        # Masked mode starts as the teacher's exact gate: its loss is fp32 rounding noise (~1e-14 of the target's
        # energy), and Adam would normalise the noise's gradients into lr-sized steps away from the optimum. A zero
        # loss there gives exactly zero gradients, so Adam does not move (and every DDP rank still steps).
        trained = loss * (relative > ROUNDING_NOISE)
        with torch.no_grad():
            l0 = self.sae.activate(h).l0()
        return trained, {"loss": loss, "relative_loss": relative, "l0": l0}

    def run_name(self) -> str:
        return f"rsae-{self.sae.cfg.mode}-calibrated"


class FineTuning(SAEModule):
    """Stage 2: fine-tune every parameter of an SAE from a checkpoint folder.

    Pointed at the stage-1 RSAE it is the method's fine-tuning; pointed at the teacher's folder it is the
    control run (same data, steps and optimiser), which separates "rational gate" from "more training".

    Args:
        init: rsae checkpoint folder to start from (an RSAE or a baseline SAE).
        sparsity_coefficient: None (default): the coefficient the init's teacher was trained with, which its
            checkpoint records (`cfg.extra["trained_sparsity_coefficient"]`, after any L0 controller); an
            imported SAE records none, so give one (the L0 controller with `target_l0` then adapts it).
        **kwargs: the optimiser and evaluation settings of `SAEModule`.
    """

    def __init__(self, init: str, sparsity_coefficient: float | None = None, **kwargs: Any) -> None:
        sae = self.load_sae_folder(init)
        if sparsity_coefficient is None:
            if sae.cfg.family != "topk" and TRAINED_SPARSITY not in sae.cfg.extra:
                raise ValueError(f"{init} records no trained sparsity coefficient (an imported SAE): set "
                                 "model.init_args.sparsity_coefficient (or --sparsity)")
            sparsity_coefficient = float(sae.cfg.extra.get(TRAINED_SPARSITY, 0.0))
        super().__init__(sparsity_coefficient=sparsity_coefficient, **kwargs)
        self.save_hyperparameters()
        self.init_path = init
        sae.cfg.extra["init"] = str(init)
        self._set_sae(sae)
        self.b_dec_initialised.fill_(True)

    def run_name(self) -> str:
        arch = self.sae.cfg.architecture
        return f"rsae-{self.sae.cfg.mode}-finetuned" if arch == "rsae" else f"{arch}-control"


class Evaluation(SAEModule):
    """No training: `rsae test` / `rsae validate` of an SAE checkpoint folder.

    Args:
        checkpoint: rsae checkpoint folder to evaluate.
        name: run name in the report (default: the folder's name, or its parent's for a stage's `sae` export).
        **kwargs: `evaluation=` settings (and the linked data facts) of `SAEModule`.
    """

    def __init__(self, checkpoint: str, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.checkpoint = checkpoint
        folder = Path(checkpoint)
        self.name = name or (folder.parent.name if folder.name == "sae" and folder.parent.name else folder.name)
        self._set_sae(self.load_sae_folder(checkpoint))

    def run_name(self) -> str:
        return self.name
