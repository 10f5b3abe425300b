"""Thresholds of a teacher's gate, which put each latent's rational on the canonical Remez fit.

Used by `RSAE.from_teacher` (from the weights, or from activations for TopK) and by calibration.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from rsae.nn.batches import iter_batches
from rsae.nn.sae import SparseAutoencoder
from rsae.rational.remez import GateFit


@torch.no_grad()
def topk_threshold(
    teacher: SparseAutoencoder, activations: Tensor | Iterable[Tensor], batch_size: int = 4096
) -> Tensor:
    """Global threshold of a TopK teacher: the mean over tokens of the smallest kept activation (as BatchTopK).

    Streams `activations` (a [N, d_in] tensor or an iterable of batches); tokens with no positive
    kept activation do not count. Raises ValueError if no token keeps a positive activation."""
    total, count = 0.0, 0
    for x in iter_batches(activations, batch_size):
        smallest = smallest_kept(teacher, x)
        total += float(smallest.double().sum())
        count += smallest.numel()
    if count == 0:
        raise ValueError("the TopK teacher kept no positive activation on these activations; pass real activations")
    return torch.tensor(total / count, device=teacher.device)


def smallest_kept(teacher: SparseAutoencoder, x: Tensor) -> Tensor:
    values = teacher.run(x).latents.values.float()
    kept = values.masked_fill(values <= 0, float("inf")).amin(-1)
    return kept[torch.isfinite(kept)]


def threshold_scales(teacher: SparseAutoencoder, fit: GateFit, activations: Tensor | None) -> Tensor:
    """Per-latent scale C with phi_i(h) = C_i r(h / C_i), mapping each latent's threshold onto the fit's.

    The gates are positively homogeneous: h H(h - theta) = C u H(u - theta_0) with u = h / C and
    C = theta / theta_0. ReLU has no threshold, so C = 1 until calibration picks a data quantile.
    A TopK teacher needs `activations` to estimate its threshold."""
    d_sae = teacher.cfg.d_sae
    if teacher.cfg.family == "relu":
        return torch.ones(d_sae, device=teacher.device)
    assert fit.threshold is not None
    if teacher.cfg.family == "jumprelu":
        theta = teacher.threshold.detach().float()
    else:
        if activations is None:
            raise ValueError(
                "a TopK teacher stores k but no threshold: pass activations=[N, d_in] so from_teacher can "
                "estimate one (mean over tokens of the smallest kept activation), or use mode='masked'"
            )
        theta = topk_threshold(teacher, activations).expand(d_sae)
    return floored_thresholds(theta) / fit.threshold


def floored_thresholds(theta: Tensor) -> Tensor:
    # A threshold at or below 0 has no jump to map. Flooring it at a tenth of the typical threshold
    # keeps the latent nearly ReLU without a tiny scale, whose huge gradients would derail Adam.
    positive = theta[theta > 0]
    floor = 0.1 * float(positive.median()) if positive.numel() else 1.0
    return theta.clamp_min(floor)
