"""Evaluation metrics for SAEs as `torchmetrics.Metric`s, correct under DDP (definitions: reference.md section 1).

Every state is a running sum reduced with "sum" across ranks, so a metric fed disjoint shards on several
ranks computes exactly the single-process value. Sums are float64 because float32 stops counting past
~1.7e7 tokens and because explained variance subtracts two nearly equal sums (mean ||x||^2 - ||mu||^2).
Means of losses are ratios of global means (sum / count over all tokens), never means of per-batch ratios,
so the result does not depend on how tokens were batched or sharded (the legacy EV is the one exception,
kept for comparison with published SAEBench numbers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from rsae.nn.sae import SAEOutput

__all__ = [
    "L0",
    "AliveFraction",
    "DownstreamCE",
    "ExplainedVariance",
    "FeatureDensity",
    "FractionOfVarianceUnexplained",
    "LegacyExplainedVariance",
    "ReconstructionMSE",
    "SAEMetrics",
]


# --- input checks --------------------------------------------------------------------------------------
def _tokens(metric: Metric, name: str, t: Tensor) -> Tensor:
    """Flatten leading dims to [N, width]; a 1-D tensor is refused because tokens vs width is ambiguous."""
    if not isinstance(t, Tensor) or t.ndim < 2:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(
            f"{type(metric).__name__}: expected {name} of shape [N, width] (or [..., width]), got {shape}; "
            f"use {name}.reshape(-1, width) or {name}[None] for a single token"
        )
    return t.reshape(-1, t.shape[-1])


def _same_shape(metric: Metric, **tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(
            f"{type(metric).__name__}: inputs must have the same shape, got {listed}; "
            "pass tensors that describe the same tokens (flatten leading dims the same way)"
        )


def _finite(metric: Metric, **tensors: Tensor) -> None:
    # One host sync for all inputs: a NaN would silently poison every later compute() of a running sum.
    flags = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()
    bad = [name for name, ok in zip(tensors, flags, strict=True) if not ok]
    if bad:
        raise ValueError(
            f"{type(metric).__name__}: NaN or Inf in {', '.join(bad)} "
            f"(shapes {', '.join(str(tuple(tensors[n].shape)) for n in bad)}); "
            "mask or drop those tokens (e.g. BOS/PAD) before update, or evaluate in a wider dtype"
        )


def _pair(metric: Metric, x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """Validated [N, d] float64 copies of the input and its reconstruction."""
    _same_shape(metric, x=x, x_hat=x_hat)
    x, x_hat = _tokens(metric, "x", x), _tokens(metric, "x_hat", x_hat)
    _finite(metric, x=x, x_hat=x_hat)
    return x.double(), x_hat.double()


def _abs_above(values: Tensor, tolerance: float) -> Tensor:
    """`|values| > tolerance`, exact for every dtype without upcasting a possibly huge [N, d_sae] tensor.

    The threshold is rounded *down* into the values' dtype: no representable value lies between it and
    `tolerance`, so the comparison in that dtype equals the comparison in exact arithmetic."""
    if not values.is_floating_point():
        return values.abs() > tolerance
    # Rounded on the host: a device scalar here would cost a sync per update.
    threshold = torch.tensor(tolerance, dtype=torch.float64).to(values.dtype)
    if threshold.double() > tolerance:
        threshold = torch.nextafter(threshold, threshold.new_tensor(-math.inf))
    return values.abs() > threshold.to(values.device)


# --- base ----------------------------------------------------------------------------------------------
class _SumMetric(Metric):
    """Every state a float64 running sum reduced with "sum", so per-rank shards add up exactly."""

    full_state_update = False
    is_differentiable = False

    def _add_sums(self, *names: str, size: int | None = None) -> None:
        for name in names:
            default = torch.zeros(() if size is None else (size,), dtype=torch.float64)
            self.add_state(name, default=default, dist_reduce_fx="sum")


# --- reconstruction ------------------------------------------------------------------------------------
class _SquaredErrorSums(_SumMetric):
    """States shared by MSE and EV: sum_t SS_t, the token count and the element count."""

    sum_squared_error: Tensor
    n_tokens: Tensor
    n_elements: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_sums("sum_squared_error", "n_tokens", "n_elements")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """Accumulate a batch: `x` is the SAE input, `x_hat` its reconstruction, both [N, d] (or [..., d])."""
        x, x_hat = _pair(self, x, x_hat)
        self._accumulate(x, x_hat)

    def _accumulate(self, x: Tensor, x_hat: Tensor) -> None:
        self.sum_squared_error += (x - x_hat).pow(2).sum()
        self.n_tokens += x.shape[0]
        self.n_elements += x.numel()


class ReconstructionMSE(_SquaredErrorSums):
    """MSE = mean over tokens of ||x_t - x_hat_t||^2 (summed over dims); `per_element=True` divides by d."""

    higher_is_better = False

    def __init__(self, per_element: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.per_element = per_element

    def compute(self) -> Tensor:
        return self.sum_squared_error / (self.n_elements if self.per_element else self.n_tokens)


class ExplainedVariance(_SquaredErrorSums):
    """EV = 1 - mean_t SS_t / (mean_t ||x_t||^2 - ||mu||^2), mu the global mean over all evaluated tokens.

    The corrected SAELens (>= 6.45.1) definition; equals torchmetrics' R2Score(multioutput="variance_weighted").
    `d_in` sizes the running sum of x; if omitted it is taken from the first update, in which case under DDP
    every rank must update at least once before compute() (otherwise the per-rank state shapes differ)."""

    higher_is_better = True
    sum_squared_norm: Tensor
    sum_x: Tensor

    def __init__(self, d_in: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.d_in = d_in
        self._add_sums("sum_squared_norm")
        # Unknown width: a [1] zero default still broadcasts against a [d] batch state in forward().
        self._add_sums("sum_x", size=d_in or 1)

    def _accumulate(self, x: Tensor, x_hat: Tensor) -> None:
        d = x.shape[1]
        if self.d_in is None:
            self.d_in = d
        if d != self.d_in:
            raise ValueError(
                f"{type(self).__name__}: x has width {d} but this metric accumulates width d_in={self.d_in}; "
                "use one metric instance per SAE / hook point"
            )
        if self.sum_x.shape[0] != d:
            self.sum_x = self.sum_x.new_zeros(d)
        super()._accumulate(x, x_hat)
        self.sum_squared_norm += x.pow(2).sum()
        self.sum_x += x.sum(0)

    def compute(self) -> Tensor:
        mean = self.sum_x / self.n_tokens
        variance = self.sum_squared_norm / self.n_tokens - mean.pow(2).sum()
        return 1 - (self.sum_squared_error / self.n_tokens) / variance


class FractionOfVarianceUnexplained(ExplainedVariance):
    """FVU = 1 - ExplainedVariance (same states and definition)."""

    higher_is_better = False

    def compute(self) -> Tensor:
        return 1 - super().compute()


class LegacyExplainedVariance(_SumMetric):
    """The SAEBench-paper variant: mean over tokens of 1 - SS_t / ||x_t - mu_batch||^2.

    mu_batch is the mean of the batch passed to each update, so the value depends on batching (and is
    undefined for one-token batches); report it only to compare with published SAEBench numbers."""

    higher_is_better = True
    sum_explained: Tensor
    n_tokens: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_sums("sum_explained", "n_tokens")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x, x_hat = _pair(self, x, x_hat)
        if x.shape[0] == 1:  # an empty batch (everything masked) adds nothing and is fine
            raise ValueError(
                f"{type(self).__name__}: needs at least 2 tokens per batch (got x {tuple(x.shape)}) because "
                "the variance is taken around the batch mean; update with larger batches"
            )
        squared_error = (x - x_hat).pow(2).sum(-1)
        variance = (x - x.mean(0)).pow(2).sum(-1)
        self.sum_explained += (1 - squared_error / variance).sum()
        self.n_tokens += x.shape[0]

    def compute(self) -> Tensor:
        return self.sum_explained / self.n_tokens


# --- sparsity ------------------------------------------------------------------------------------------
class L0(_SumMetric):
    """Mean number of active latents per token, active meaning |z| > tolerance (0: exactly non-zero).

    `values` is `Latents.values`: dense [N, d_sae] or the sparse [N, k] values of TopK codes."""

    higher_is_better = False
    sum_active: Tensor
    n_tokens: Tensor

    def __init__(self, tolerance: float = 0.0, **kwargs: Any) -> None:
        if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"L0: tolerance must be a finite number >= 0, got {tolerance!r}")
        super().__init__(**kwargs)
        self.tolerance = float(tolerance)
        self._add_sums("sum_active", "n_tokens")

    def update(self, values: Tensor, band: Tensor | None = None) -> None:
        """`band` (optional, broadcastable to `values`: [d_sae] for dense values, [N, k] for TopK's) raises the
        tolerance per latent: a latent is active when |z| > max(tolerance, band)."""
        values = _tokens(self, "values", values)
        _finite(self, values=values)
        active = _abs_above(values, self.tolerance)
        if band is not None:
            active &= values.float().abs() > band.float()
        self.sum_active += active.sum().double()
        self.n_tokens += values.shape[0]

    def compute(self) -> Tensor:
        return self.sum_active / self.n_tokens


class FeatureDensity(_SumMetric):
    """Per-latent firing frequency [d_sae]: the fraction of evaluated tokens on which each latent is non-zero.

    update(values, indices=None) takes `Latents` fields: dense values [N, d_sae] with indices None, or
    sparse values and indices [N, k]. Dead latents (density 0) are those that never fire on the eval set."""

    higher_is_better = None
    fires: Tensor
    n_tokens: Tensor

    def __init__(self, d_sae: int, **kwargs: Any) -> None:
        if not (isinstance(d_sae, int) and d_sae > 0):
            raise ValueError(f"{type(self).__name__}: d_sae must be a positive int, got {d_sae!r}")
        super().__init__(**kwargs)
        self.d_sae = d_sae
        self._add_sums("fires", size=d_sae)
        self._add_sums("n_tokens")

    def update(self, values: Tensor, indices: Tensor | None = None) -> None:
        name = type(self).__name__
        values = _tokens(self, "values", values)
        _finite(self, values=values)
        if indices is None:
            if values.shape[1] != self.d_sae:
                raise ValueError(
                    f"{name}: dense values must be [N, d_sae={self.d_sae}], got {tuple(values.shape)}; "
                    "pass `indices` too for sparse (TopK) codes"
                )
            self.fires += (values != 0).sum(0).double()
        else:
            indices = _tokens(self, "indices", indices)
            _same_shape(self, values=values, indices=indices)
            if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
                raise ValueError(f"{name}: indices must be an integer tensor, got {indices.dtype}")
            low, high = (int(v) for v in torch.aminmax(indices)) if indices.numel() else (0, 0)
            if low < 0 or high >= self.d_sae:
                raise ValueError(
                    f"{name}: indices must lie in [0, d_sae={self.d_sae}), got range [{low}, {high}]; "
                    "was d_sae set for this SAE?"
                )
            # Unweighted bincount is deterministic on CUDA, unlike scatter_add/index_add.
            self.fires += torch.bincount(indices[values != 0], minlength=self.d_sae).double()
        self.n_tokens += values.shape[0]

    def _density(self) -> Tensor:
        return self.fires / self.n_tokens

    def compute(self) -> Tensor:
        return self._density()

    def density(self) -> Tensor:
        """Per-latent density over all ranks, also from subclasses whose compute() returns something else.

        Under DDP this is a collective: call it on every rank."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            return self._density().clone()

    def histogram(self, bins: int = 50) -> dict[str, Any]:
        """JSON-ready histogram of log10(density) over live latents, plus the dead and live counts.

        Edges span the observed live range (widened by 0.5 either side when all live latents agree)."""
        if not (isinstance(bins, int) and bins > 0):
            raise ValueError(f"{type(self).__name__}.histogram: bins must be a positive int, got {bins!r}")
        density = self.density().cpu()
        if density.isnan().any():
            raise ValueError(f"{type(self).__name__}.histogram: no tokens seen yet; call update() first")
        live = density[density > 0].log10()
        histogram: dict[str, Any] = {
            "log10_density_edges": [],
            "counts": [],
            "dead": int((density == 0).sum()),
            "live": int(live.numel()),
            "d_sae": self.d_sae,
        }
        if live.numel():
            low, high = float(live.min()), float(live.max())
            if high - low < 1e-12:
                low, high = low - 0.5, high + 0.5
            counts, edges = torch.histogram(live, bins=bins, range=(low, high))
            histogram["log10_density_edges"] = [float(e) for e in edges]
            histogram["counts"] = [int(c) for c in counts]
        return histogram


class AliveFraction(FeatureDensity):
    """Fraction of latents with density > 0 over all evaluated tokens (1 - dead fraction)."""

    higher_is_better = True

    def compute(self) -> Tensor:
        return (self._density() > 0).double().mean()


# --- downstream ----------------------------------------------------------------------------------------
class DownstreamCE(_SumMetric):
    """Next-token CE with the clean model, with the SAE spliced in, and with the hook zero-ablated.

    update() takes per-position NLLs (1-D, same length, already restricted to retained positions).
    compute() returns ce_clean, ce_sae, ce_zero, ce_degradation = ce_sae - ce_clean and
    loss_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean), a ratio of global means."""

    higher_is_better = None
    sum_clean: Tensor
    sum_sae: Tensor
    sum_zero: Tensor
    n_positions: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_sums("sum_clean", "sum_sae", "sum_zero", "n_positions")

    def update(self, nll_clean: Tensor, nll_sae: Tensor, nll_zero: Tensor) -> None:
        nlls = {"nll_clean": nll_clean, "nll_sae": nll_sae, "nll_zero": nll_zero}
        if (
            any(not isinstance(t, Tensor) or t.ndim != 1 for t in nlls.values())
            or len({t.shape for t in nlls.values()}) > 1
        ):
            shapes = ", ".join(
                f"{k} {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}" for k, t in nlls.items()
            )
            raise ValueError(
                f"{type(self).__name__}: expected three 1-D per-position NLL tensors of equal length, got {shapes}; "
                "flatten [batch, seq] and apply the same retained-position mask to all three"
            )
        _finite(self, **nlls)
        self.sum_clean += nll_clean.double().sum()
        self.sum_sae += nll_sae.double().sum()
        self.sum_zero += nll_zero.double().sum()
        self.n_positions += nll_clean.shape[0]

    def compute(self) -> dict[str, Tensor]:
        clean, sae, zero = (s / self.n_positions for s in (self.sum_clean, self.sum_sae, self.sum_zero))
        return {
            "ce_clean": clean,
            "ce_sae": sae,
            "ce_zero": zero,
            "ce_degradation": sae - clean,
            "loss_recovered": (zero - sae) / (zero - clean),
        }


# --- bundle --------------------------------------------------------------------------------------------
class SAEMetrics(nn.Module):
    """The standard eval bundle for one SAE: update(x, output) per batch, compute() -> plain floats.

    A plain module rather than a MetricCollection because the members take different inputs; derived
    numbers (mse_per_element, fvu, alive_fraction) come from shared states instead of duplicate metrics.
    `l0_tolerance` is the threshold of the second L0 (for rational gates, whose "zeros" may be tiny values).
    `l0_gate_band` counts |z_i| > `zero_band()[i]`, the band in the gate's own scale (an RSAE's
    `threshold_eps * |C_out_i|`, read at every update since training moves it): a pure gate is never exactly
    zero, so this is its L0 at a tolerance tied to its scale; where `zero_band` returns None it is the exact L0.
    Pass `d_in` under DDP if some rank might see no data (see ExplainedVariance)."""

    KEYS = (
        "mse",
        "mse_per_element",
        "explained_variance",
        "fvu",
        "explained_variance_legacy",
        "l0",
        "l0_tolerance",
        "l0_gate_band",
        "alive_fraction",
    )

    def __init__(self, d_sae: int, l0_tolerance: float = 1e-6, d_in: int | None = None,
                 zero_band: Callable[[], Tensor | None] | None = None) -> None:
        super().__init__()
        self.mse = ReconstructionMSE()
        self.explained_variance = ExplainedVariance(d_in)
        self.explained_variance_legacy = LegacyExplainedVariance()
        self.l0 = L0()
        self.l0_tolerance = L0(l0_tolerance)
        self.l0_gate_band = L0()
        self.zero_band = zero_band
        self.feature_density = FeatureDensity(d_sae)

    def update(self, x: Tensor, output: SAEOutput) -> None:
        """`x` is the SAE's input ([N, d_in] or [..., d_in]), `output` what `model.run(x)` returned."""
        x_hat = output.x_hat.reshape(-1, output.x_hat.shape[-1]) if output.x_hat.ndim else output.x_hat
        x = x.reshape(-1, x.shape[-1]) if x.ndim else x
        values, indices = output.latents
        if values.ndim and values.reshape(-1, values.shape[-1]).shape[0] != x.shape[0]:
            raise ValueError(
                f"SAEMetrics: x {tuple(x.shape)} and latents {tuple(values.shape)} cover different token counts; "
                "pass the same x that produced `output`"
            )
        for metric in (self.mse, self.explained_variance, self.explained_variance_legacy):
            metric.update(x, x_hat)
        self.l0.update(values)
        self.l0_tolerance.update(values)
        band = self.zero_band() if self.zero_band is not None else None
        self.l0_gate_band.update(values, band if band is None or indices is None else band[indices])
        self.feature_density.update(values, indices)

    def compute(self) -> dict[str, float]:
        mse = self.mse.compute()
        ev = self.explained_variance.compute()
        d_in = self.explained_variance.d_in
        return {
            "mse": float(mse),
            "mse_per_element": float(mse / d_in) if d_in else math.nan,
            "explained_variance": float(ev),
            "fvu": float(1 - ev),
            "explained_variance_legacy": float(self.explained_variance_legacy.compute()),
            "l0": float(self.l0.compute()),
            "l0_tolerance": float(self.l0_tolerance.compute()),
            "l0_gate_band": float(self.l0_gate_band.compute()),
            "alive_fraction": float((self.feature_density.compute() > 0).double().mean()),
        }

    def density(self) -> Tensor:
        """Per-latent firing frequency [d_sae] (float64)."""
        return self.feature_density.compute()

    def density_histogram(self, bins: int = 50) -> dict[str, Any]:
        return self.feature_density.histogram(bins)

    def reset(self) -> None:
        for metric in self.children():
            metric.reset()
