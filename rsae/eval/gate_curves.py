"""Gate curves for the report's plot: a few latents' codes as functions of their pre-activation.

Each curve comes from the model's own `activate` (its gate and its support rule, exactly as the
forward pass applies them), never from a re-implementation of the modes: latent `i` takes the values
of a grid while every other latent is held at a background level. TopK is not pointwise (it selects
per token); the background then sits at a threshold tau, so latent `i` is kept exactly where its
value exceeds tau, the pointwise reading of TopK that the plot shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rsae.nn.sae import SparseAutoencoder

TOPK_THRESHOLD_KEY = "topk_threshold"
"""`cfg.extra` key of an estimated TopK threshold, preferred by `gate_curves` over estimating one."""


@torch.no_grad()
def gate_curves(
    model: SparseAutoencoder,
    teacher: SparseAutoencoder | None = None,
    features: int | Sequence[int] = 8,
    n_points: int = 201,
    pre_acts: Tensor | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Codes of a few latents as the model computes them, and the teacher's, on a grid of h; for plots.

    Features: a list is used as given; an int samples that many (seeded), among the latents with a
    positive pre-activation in `pre_acts` [N, d_sae] when given (live ones have shapes worth seeing).
    Grid per latent: with `pre_acts`, from the 1% quantile of its pre-activations to the 99% quantile
    of its positive ones (stretched to at least [-hi/4, hi] so both branches show); else [-ref, 4 ref]
    with ref its threshold (JumpReLU theta_i, TopK tau), else its rational input scale, else 1.
    TopK's tau is `cfg.extra["topk_threshold"]` (teacher's, then model's) when set, else the mean over
    tokens of the k-th largest pre-activation in `pre_acts`, else 0. The teacher curve is None without
    a teacher.
    """
    d_sae = model.cfg.d_sae
    device = model.device
    if pre_acts is not None:
        pre_acts = pre_acts.detach().to(device=device, dtype=torch.float32).reshape(-1, d_sae)
    tau = _topk_tau(model, teacher, pre_acts)
    rule_source = teacher if teacher is not None else model
    all_theta = _thresholds(rule_source, torch.arange(d_sae, device=device))
    chosen = _choose_features(features, d_sae, pre_acts, all_theta if all_theta is not None else tau, seed)
    idx = torch.tensor(chosen, dtype=torch.long, device=device)
    theta = _thresholds(rule_source, idx)
    gate = getattr(model, "gate", None)
    h = _grid(idx, n_points, pre_acts, theta, tau, gate.scale_in.detach()[idx].float() if gate is not None else None)
    return {"h": _listed(h), "features": chosen, "model": _listed(_codes_along(model, h, idx, tau)),
            "teacher": None if teacher is None else _listed(_codes_along(teacher, h, idx, tau))}


def _codes_along(sae: SparseAutoencoder, h: Tensor, idx: Tensor, background: float) -> Tensor:
    """`sae.activate`'s code of latent idx[f] where its pre-activation runs along h[f] [n_points] and every
    other latent's is `background`, [len(idx), n_points]."""
    rows = torch.full((h.shape[1], sae.cfg.d_sae), background, dtype=sae.dtype, device=h.device)
    curves = []
    for feature, values in zip(idx.tolist(), h, strict=True):
        rows[:, feature] = values.to(sae.dtype)
        curves.append(sae.activate(rows).dense(sae.cfg.d_sae)[:, feature].float())
        rows[:, feature] = background
    return torch.stack(curves)


def _listed(t: Tensor | None) -> list[Any] | None:
    return None if t is None else t.cpu().tolist()


def _choose_features(features: int | Sequence[int], d_sae: int, pre_acts: Tensor | None, floor: Tensor | float,
                     seed: int) -> list[int]:
    """The given latents, else a seeded sample of those that cross their gate's threshold `floor` somewhere in
    `pre_acts` (a latent that never fires would draw a flat line)."""
    if not isinstance(features, int):
        chosen = [int(f) for f in features]
        if not chosen or not all(0 <= f < d_sae for f in chosen):
            raise ValueError(f"features must be a non-empty list of latents in [0, {d_sae}), got {chosen}")
        return chosen
    if features < 1:
        raise ValueError(f"features must be >= 1, got {features}")
    candidates = torch.arange(d_sae)
    if pre_acts is not None and bool((pre_acts > floor).any()):
        candidates = (pre_acts > floor).any(0).nonzero().squeeze(-1).cpu()
    order = torch.randperm(candidates.numel(), generator=torch.Generator().manual_seed(seed))
    return sorted(int(f) for f in candidates[order[:features]])


def _thresholds(model: SparseAutoencoder | None, idx: Tensor) -> Tensor | None:
    """theta_i of the chosen latents as the forward reads it (max(theta, 0)), or None without thresholds."""
    threshold = getattr(model, "threshold", None)
    return None if threshold is None else threshold.detach()[idx].float().clamp_min(0)


def _topk_tau(model: SparseAutoencoder, teacher: SparseAutoencoder | None, pre_acts: Tensor | None) -> float:
    for source in (teacher, model):
        if source is not None and source.cfg.extra.get(TOPK_THRESHOLD_KEY) is not None:
            return float(source.cfg.extra[TOPK_THRESHOLD_KEY])
    k = model.cfg.k if model.cfg.k is not None else getattr(getattr(teacher, "cfg", None), "k", None)
    if pre_acts is None or k is None or pre_acts.shape[0] == 0:
        return 0.0
    # TopK keeps the k largest after a ReLU, so a negative k-th largest means "keeps everything positive".
    return float(pre_acts.topk(k, dim=-1).values[:, -1].clamp_min(0).mean())


def _grid(idx: Tensor, n_points: int, pre_acts: Tensor | None, theta: Tensor | None, tau: float,
          scale_in: Tensor | None) -> Tensor:
    steps = torch.linspace(0, 1, n_points, device=idx.device)
    if pre_acts is not None:
        # A strided subset is plenty for plot ranges, and torch.quantile refuses inputs over 2**24 elements.
        columns = pre_acts[:: max(1, pre_acts.shape[0] // 65536), idx]
        lo = columns.quantile(0.01, dim=0)
        hi = torch.stack([c[c > 0].quantile(0.99) if (c > 0).any() else c.new_tensor(1.0) for c in columns.T])
        lo = torch.minimum(lo, -hi / 4)
    else:
        ref = torch.ones(idx.numel(), device=idx.device)
        for level in (scale_in, tau, theta):  # later entries win where they are usable
            if isinstance(level, Tensor):
                ref = torch.where(level > 0, level, ref)
            elif level:
                ref = torch.full_like(ref, level)
        lo, hi = -ref, 4 * ref
    return lo[:, None] + (hi - lo)[:, None] * steps
