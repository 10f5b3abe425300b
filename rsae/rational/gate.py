"""`RationalGate`: the trainable, pole-free rational nonlinearity of an RSAE.

Per latent i: ``phi(h)_i = C_out_i * r((h_i - s_i) / C_in_i)`` with ``r = P/Q``,
``Q(t) = 1 + sum_j c_j |t|^j`` and ``c_j = softplus(raw_j) >= 0``, so ``Q >= 1`` for every parameter
value (no poles, whatever the optimiser does), and gate-shaped tails outside [-1, 1] (see
:mod:`rsae.rational.kernel`). Coefficients are shared by all latents, by contiguous groups, or per latent;
shift and scales are always per latent, so one canonical fit serves every feature's threshold
(the teacher gates are positively homogeneous).

Parametrisation choices and why:
- ``denominator_raw`` goes through softplus, not ``abs``: a coefficient inside ``|.|`` initialised at
  exactly 0 never moves (torch's d|b|/db = 0 at 0), and softplus tames the 1e0..1e4 coefficient spread
  under Adam.
- ``scale_in`` is used as ``scale_in.clamp_min(SCALE_IN_FLOOR)`` (1e-6) in forward: a zero or negative
  input scale would blow up or mirror the affine map. The clamp only engages if the optimiser drives
  C_in to ~0; clamped entries then get no gradient through C_in (shift and C_out still learn).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsae.rational.kernel import rational_gate, rational_reference

__all__ = ["RationalGate", "SCALE_IN_FLOOR", "DENOMINATOR_FLOOR", "IDENTITY_DENOMINATOR"]

Sharing = Literal["shared", "group", "feature"]

SCALE_IN_FLOOR: float = 1e-6
"""Lower clamp applied to ``scale_in`` in forward (keeps ``C_in > 0``)."""

DENOMINATOR_FLOOR: float = 1e-8
"""Effective denominator coefficients below this are stored as this value by ``set_coefficients``:
inverse softplus of 0 is -inf; at 1e-8 the raw value is about -18.4 (finite, and softplus' gradient
there, ~1e-8, is small but not dead)."""

IDENTITY_DENOMINATOR: float = 1e-2
"""c_j used by ``set_identity_``: small (the gate is still the identity exactly) but large enough that
softplus' gradient (~c_j) keeps the denominator coefficients trainable."""


def _inverse_softplus(y: Tensor) -> Tensor:
    """Inverse of softplus for y > 0, computed stably in fp64: y + log(-expm1(-y))."""
    y = y.to(torch.float64)
    return y + torch.log(-torch.expm1(-y))


class RationalGate(nn.Module):
    """Trainable pole-free rational gate ``phi(h) = C_out * r((h - shift) / C_in)`` per latent.

    Args:
        d_sae: number of latents.
        degree: (p, q), numerator and denominator degree; p >= 1, q >= 0 (q = 0 is a polynomial).
        sharing: coefficients shared by all latents ("shared"), by ``n_groups`` contiguous blocks of
            latents ("group": latent i is in group ``i * n_groups // d_sae``), or per latent ("feature").
        n_groups: number of groups for ``sharing="group"`` (ignored otherwise).

    Parameters (exact state_dict names; checkpoints depend on them): ``numerator`` [G, p+1],
    ``denominator_raw`` [G, q] (effective coefficients: the ``denominator`` property,
    softplus(raw)), ``scale_in``, ``shift``, ``scale_out`` [d_sae].

    Attributes:
        fast: True (default) uses the fused low-memory autograd Function
            (:func:`rsae.rational.kernel.rational_gate`); False uses the eager reference
            (:func:`rsae.rational.kernel.rational_reference`) with plain autograd (~20x the memory).
    """

    def __init__(self, d_sae: int, degree: tuple[int, int], sharing: Sharing = "shared", n_groups: int = 1) -> None:
        super().__init__()
        p, q = (int(degree[0]), int(degree[1]))
        if p < 1 or q < 0:
            raise ValueError(f"degree must be (p, q) with p >= 1 and q >= 0, got {degree}")
        if d_sae < 1:
            raise ValueError(f"d_sae must be >= 1, got {d_sae}")
        if sharing == "shared":
            n_coef = 1
        elif sharing == "group":
            if not 1 <= n_groups <= d_sae:
                raise ValueError(f"n_groups must be in [1, d_sae={d_sae}] for sharing='group', got {n_groups}")
            n_coef = n_groups
        elif sharing == "feature":
            n_coef = d_sae
        else:
            raise ValueError(f"sharing must be 'shared', 'group' or 'feature', got {sharing!r}")
        self.d_sae = d_sae
        self.degree = (p, q)
        self.sharing: Sharing = sharing
        self.n_coefficient_sets = n_coef
        self.fast = True

        self.numerator = nn.Parameter(torch.zeros(n_coef, p + 1))
        self.denominator_raw = nn.Parameter(torch.zeros(n_coef, q))
        self.scale_in = nn.Parameter(torch.ones(d_sae))
        self.shift = nn.Parameter(torch.zeros(d_sae))
        self.scale_out = nn.Parameter(torch.ones(d_sae))
        # Non-persistent: derived from (d_sae, sharing, n_groups), so state_dict holds only the five
        # parameters and loads into any gate built with the same configuration.
        group = torch.arange(d_sae, dtype=torch.long) * n_coef // d_sae
        self.register_buffer("group_index", group, persistent=False)
        self.set_identity_()

    # ------------------------------------------------------------------ coefficients
    @property
    def denominator(self) -> Tensor:
        """Effective denominator coefficients ``c = softplus(denominator_raw) >= 0``, [G, q]."""
        return F.softplus(self.denominator_raw)

    def _coefficient_sets(self, value: Tensor, width: int, name: str) -> Tensor:
        value = torch.as_tensor(value, dtype=torch.float64)
        if value.dim() == 1:
            value = value.unsqueeze(0)
        if value.dim() != 2 or value.shape[1] != width or value.shape[0] not in (1, self.n_coefficient_sets):
            raise ValueError(
                f"{name} must have shape [{width}] or [{self.n_coefficient_sets}, {width}], got {tuple(value.shape)}"
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} must be finite")
        return value.expand(self.n_coefficient_sets, width)

    @torch.no_grad()
    def set_coefficients(self, numerator: Tensor, denominator: Tensor) -> None:
        """Store EFFECTIVE coefficients: ``numerator`` [p+1] or [G, p+1]; ``denominator`` [q] or [G, q], >= 0.

        A 1-D argument is broadcast to every coefficient set. The denominator is stored as
        inverse-softplus(max(c, DENOMINATOR_FLOOR)): exact zeros map to a finite raw value, so the
        stored gate differs from the requested one by at most 1e-8 per coefficient.
        Raises ValueError on wrong shapes, non-finite values or negative denominator coefficients.
        """
        p, q = self.degree
        num = self._coefficient_sets(numerator, p + 1, "numerator")
        den = self._coefficient_sets(denominator, q, "denominator")
        if (den < 0).any():
            raise ValueError("denominator coefficients must be >= 0 (Q = 1 + sum c_j |t|^j must stay >= 1)")
        self.numerator.copy_(num.to(self.numerator.dtype))
        raw = _inverse_softplus(den.clamp_min(DENOMINATOR_FLOOR))
        self.denominator_raw.copy_(raw.to(self.denominator_raw.dtype))

    @torch.no_grad()
    def set_identity_(self, scale: Tensor | float = 1.0) -> None:
        """Make ``phi(h) = h`` for every ``h >= 0`` (the "masked" RSAE initialisation).

        With ``|t|^j = t^j`` for t >= 0, ``P(t) = t Q(t)`` gives ``r(t) = t`` on [0, 1]; the linear
        upper tail continues it as ``t`` beyond 1, so the identity holds for all h >= 0 (up to fp32
        rounding), however large. ``c_j = IDENTITY_DENOMINATOR`` keeps their gradients alive.
        shift = 0 and scale_in = scale_out = ``scale`` (float or per-latent [d_sae] tensor, > 0).
        Needs p >= q + 1 (P = t Q has degree q + 1); raises ValueError otherwise.
        """
        p, q = self.degree
        if p < q + 1:
            raise ValueError(f"set_identity_ needs numerator degree p >= q + 1, got degree (p, q) = {self.degree}")
        scale_t = torch.as_tensor(scale, dtype=torch.float64)
        if scale_t.dim() not in (0, 1) or (scale_t.dim() == 1 and scale_t.shape[0] != self.d_sae):
            raise ValueError(f"scale must be a float or a [{self.d_sae}] tensor, got shape {tuple(scale_t.shape)}")
        if not torch.isfinite(scale_t).all() or (scale_t <= 0).any():
            raise ValueError("scale must be finite and > 0")
        c = torch.full((q,), IDENTITY_DENOMINATOR, dtype=torch.float64)
        a = torch.zeros(p + 1, dtype=torch.float64)
        a[1] = 1.0  # t * 1
        a[2 : q + 2] = c  # t * c_j t^j
        self.set_coefficients(a, c)
        self.shift.zero_()
        self.scale_in.copy_(scale_t.expand(self.d_sae).to(self.scale_in.dtype))
        self.scale_out.copy_(scale_t.expand(self.d_sae).to(self.scale_out.dtype))

    # ------------------------------------------------------------------ forward
    def forward(self, h: Tensor, latent_index: Tensor | None = None, positive_support: bool = False) -> Tensor:
        """Apply the gate.

        Args:
            h: dense pre-activations [..., d_sae]; or, with ``latent_index``, sparse values [..., k].
            latent_index: optional long tensor, same shape as ``h``: the latent of each entry (TopK).
            positive_support: exact zeros (and zero gradients) where ``h <= 0``, ReLU's support rule, in
                the gate's own pass (see :func:`rsae.rational.kernel.rational_gate`).

        Returns phi(h), same shape and dtype as ``h`` (computed in fp32, or fp64 for fp64 input).
        """
        p, q = self.degree
        scale_in = self.scale_in.clamp_min(SCALE_IN_FLOOR)
        numerator, denominator = self.numerator, self.denominator
        if latent_index is None:
            if h.dim() < 1 or h.shape[-1] != self.d_sae:
                raise ValueError(f"expected h of shape [..., {self.d_sae}] (d_sae), got {tuple(h.shape)}")
            x = h.reshape(-1, self.d_sae)
            shift, scale_out, cols = self.shift, self.scale_out, self.group_index
        else:
            if latent_index.shape != h.shape:
                raise ValueError(
                    f"latent_index must have the same shape as h: expected {tuple(h.shape)}, "
                    f"got {tuple(latent_index.shape)}"
                )
            if latent_index.dtype not in (torch.long, torch.int32):
                raise ValueError(f"latent_index must be an integer (long) tensor, got {latent_index.dtype}")
            # Each entry becomes its own column: x [1, N*k] with gathered [N*k] parameters, so the
            # kernel never materialises more than [p+1, N*k] coefficients.
            idx = latent_index.reshape(-1).long()
            x = h.reshape(1, -1)
            shift, scale_in, scale_out = self.shift[idx], scale_in[idx], self.scale_out[idx]
            cols = self.group_index[idx]
        if self.n_coefficient_sets == 1:
            # [p+1, 1]: the kernel broadcasts them and returns whole-tensor sums as their gradients.
            num_cols = numerator.t()
            den_cols = denominator.t()
        else:
            num_cols = numerator[cols].t()
            den_cols = denominator[cols].t()

        if self.fast:
            out = rational_gate(x, shift, scale_in, scale_out, num_cols, den_cols, positive_support=positive_support)
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                # Same fp32 (fp64) policy as the fast path; the affine map is done here because the
                # reference takes u.
                cd = torch.float64 if x.dtype == torch.float64 or shift.dtype == torch.float64 else torch.float32
                u = (x.to(cd) - shift.to(cd)) / scale_in.to(cd)
                out = (scale_out.to(cd) * rational_reference(u, num_cols, den_cols).to(cd)).to(h.dtype)
                if positive_support:
                    out = torch.where(x > 0, out, 0.0)
        return out.reshape(h.shape)

    def extra_repr(self) -> str:
        p, q = self.degree
        groups = f", n_groups={self.n_coefficient_sets}" if self.sharing == "group" else ""
        return f"d_sae={self.d_sae}, degree=({p}, {q}), sharing={self.sharing!r}{groups}, fast={self.fast}"
