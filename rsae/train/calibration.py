"""Calibration of an RSAE on real activations: per-latent scales and shift, then an L2 refine of the gate.

`RSAE.from_teacher` maps a canonical Remez fit onto each latent's threshold from the teacher's
weights alone. Real pre-activations are not spread over the fit's window, so `calibrate` streams
activations once through the teacher, collects per-latent statistics, and then:

1. **Scales** (per latent, `phi_i(h) = C_out_i r((h - s_i) / C_in_i)`):
   - `masked` mode: the gate is the identity on the active set for any `C_in = C_out`, so the
     scale only decides where the rational's [0, 1] window sits: the `quantile` of the latent's
     ACTIVE pre-activations (the teacher's support), so that fine-tuning starts with typical
     active values inside the fitted window. Reproduction stays exact; no refine is needed (the
     L2 optimum is the identity itself), so none is run.
   - `pure` / `thresholded`: JumpReLU latents map their threshold onto the fit's canonical one
     (`C = theta_i / theta_0`, exact by positive homogeneity); TopK latents use a threshold
     estimated from data (below); ReLU latents use the `quantile` of their positive pre-activations.
     `C_in = C_out`, shift 0.
     TopK is not a pointwise gate: one global threshold (the mean smallest kept activation, as
     BatchTopK, reported) fits frequent and rare latents badly, so each latent gets the level it
     exceeds exactly as often as the teacher keeps it (falling back to the global one if never kept).
     The window [-1, 1] then covers `|h| <= C`; beyond it the gate-shaped tails (tangent line
     above, constant below) carry the identity / zero branches, and the refine below fixes what
     the canonical mapping gets wrong where the data actually lies.
2. **Refine** (`pure` / `thresholded`, stage 1 of training, teacher frozen): minimise
   `sum_i w_i (phi_i(h) - g_i(h))^2` averaged over calibration tokens, with `g` the teacher's
   gate, `w_i = ||W_dec_i||^2` (so the loss is the diagonal part of the reconstruction error the
   gate mismatch causes), over coefficients, scales and shifts by Adam in relative units
   (log-scales, shift in units of `C_in`, numerator steps proportional to each coefficient,
   log denominator): the shipped coefficients span 1e-2..1e2 and raw parameters would move
   by wildly different relative amounts. In `thresholded` mode the fit is to the gate before
   the hard zero. The result is kept only if it lowers the loss on the calibration tokens.
3. **Zero band** (`thresholded`, `match_l0=True`): `cfg.threshold_eps` is set so that the exact
   L0 on the calibration tokens equals the teacher's (the hard zero keeps `|phi_i| > eps C_out_i`,
   so this is one order statistic of `|phi_i| / C_out_i`). For jump families it is capped at
   0.9 theta_0: a teacher-active latent has `h >= theta_i`, i.e. `|phi| / C_out ~ u >= theta_0`,
   so the band never cuts the teacher's support, only the transition region below it. Without
   this, eps is `RSAE.from_teacher`'s (twice the fit error), whose L0 missed by a few percent.

Dead latents (no token in the teacher's support during calibration) keep a defined
initialisation, never NaN: `masked` and ReLU use the median scale of the live latents (1.0 if
none is alive), JumpReLU its threshold mapping (the usual floor for thresholds <= 0), TopK the
global threshold mapping; shift 0. The refine does not touch their per-latent parameters (they
would only learn to output 0 everywhere, which would leave them unable to revive).

Memory: the statistics are per latent (`top_values` largest active values each), and only a
uniform reservoir of `refine_tokens` activation rows is kept for the refine and the in-sample
figures, so the stream itself can be arbitrarily long.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from rsae.nn.batches import iter_batches
from rsae.nn.rational_sae import RSAE, gate_l2
from rsae.nn.sae import SparseAutoencoder
from rsae.nn.thresholds import floored_thresholds, smallest_kept
from rsae.rational import cpu as rational_cpu
from rsae.rational.kernel import Backend, rational_gate
from rsae.rational.remez import CANONICAL_THRESHOLD, GateFit

__all__ = [
    "CalibrationReport",
    "calibrate",
    "evaluate_against_teacher",
]


@dataclass
class CalibrationReport:
    """What `calibrate` did and how well the calibrated RSAE imitates its teacher on the calibration tokens."""

    mode: str
    """Gate mode of the calibrated RSAE."""
    family: str
    """Teacher family."""
    n_tokens: int
    """Activation rows streamed for the statistics."""
    refine_tokens: int
    """Rows kept (uniform reservoir) for the refine and the in-sample figures."""
    dead_latents: int
    """Latents the teacher never activated on the calibration tokens (given the documented default init)."""
    topk_threshold: float | None
    """Estimated global TopK threshold (mean smallest kept activation); None for other families."""
    quantile: float
    """Quantile of active pre-activations used for the masked / ReLU scales."""
    refine_steps: int
    """Adam steps run (0 in masked mode, where the identity is already the L2 optimum)."""
    gate_l2_before: float
    """Relative decoder-weighted gate error `sum w (phi - g)^2 / sum w g^2` before the refine."""
    gate_l2_after: float
    """The same after the refine (equal to before if the refine was skipped or reverted)."""
    refine_kept: bool
    """False when the refine did not lower the loss and the pre-refine gate was restored."""
    threshold_eps: float
    """The RSAE's `cfg.threshold_eps` after calibration (L0-matched in thresholded mode with match_l0)."""
    seconds: float
    """Wall time of the whole calibration."""
    figures: dict[str, float] = field(default_factory=dict)
    """`evaluate_against_teacher` on the reservoir rows (in-sample; acceptance uses held-out data)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        f = self.figures
        return (
            f"calibrated {self.family}/{self.mode} on {self.n_tokens} tokens: gate L2 {self.gate_l2_before:.3e} -> "
            f"{self.gate_l2_after:.3e}, dead {self.dead_latents}, "
            f"MSE rel diff {f.get('mse_rel_diff', float('nan')):+.2%}, "
            f"cosine {f.get('cosine', float('nan')):.4f}, L0 {f.get('l0_teacher', float('nan')):.2f} -> "
            f"{f.get('l0_exact', float('nan')):.2f} (exact), {self.seconds:.1f} s"
        )


# ------------------------------------------------------------------------------------------------
# Streaming statistics
# ------------------------------------------------------------------------------------------------


class _Statistics:
    """Per-latent support statistics of the teacher plus a uniform reservoir of activation rows."""

    def __init__(self, teacher: SparseAutoencoder, top_values: int, reservoir: int, seed: int) -> None:
        d_sae, device = teacher.cfg.d_sae, teacher.device
        self.teacher = teacher
        self.n_tokens = 0
        self.fires = torch.zeros(d_sae, dtype=torch.long, device=device)
        # The `top_values` largest active pre-activations per latent: a high quantile of the active
        # values is read off them exactly while (1 - q) * fires <= top_values.
        self.top = torch.full((d_sae, top_values), float("-inf"), device=device)
        self.smallest_kept_sum, self.smallest_kept_count = 0.0, 0
        self.reservoir_size = reservoir
        self.rows: Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        teacher = self.teacher
        x = teacher.check_input(x).to(teacher.device)
        output = teacher.run(x)
        codes = output.latents.dense(teacher.cfg.d_sae)
        active = codes != 0
        self.fires += active.sum(0)
        h = output.pre_acts.float().masked_fill(~active, float("-inf"))
        self.top = torch.cat([self.top, h.T], dim=1).topk(self.top.shape[1], dim=1).values
        if teacher.cfg.family == "topk":
            smallest = smallest_kept(teacher, x)
            self.smallest_kept_sum += float(smallest.double().sum())
            self.smallest_kept_count += smallest.numel()
        self._reservoir(x)
        self.n_tokens += x.shape[0]

    def _reservoir(self, x: Tensor) -> None:
        # Algorithm R, vectorised per batch: row number t (0-based) replaces a uniform slot with
        # probability size / (t + 1). Rows of one batch that pick the same slot: the last one wins,
        # which is what processing them one at a time would give.
        size = self.reservoir_size
        x = x.detach().float()
        if self.rows is None:
            self.rows = x.new_empty(0, x.shape[1])
        fill = min(size - self.rows.shape[0], x.shape[0])
        if fill > 0:
            self.rows = torch.cat([self.rows, x[:fill]])
        rest = x[fill:]
        if rest.shape[0] == 0:
            return
        t = torch.arange(rest.shape[0], dtype=torch.float64) + self.n_tokens + fill + 1
        slot = (torch.rand(rest.shape[0], generator=self.generator, dtype=torch.float64) * t).long()
        take = slot < size
        self.rows[slot[take].to(self.rows.device)] = rest[take.to(rest.device)]

    def active_quantile(self, q: float) -> Tensor:
        """Per-latent q-quantile of the active pre-activations (NaN for dead latents).

        The rank from the top is (1 - q) * fires; beyond the kept values the smallest kept one is
        used, i.e. a higher quantile than asked (only for latents firing on > top_values / (1 - q) tokens)."""
        rank = ((1.0 - q) * self.fires.float()).floor().long().clamp(max=self.top.shape[1] - 1)
        value = self.top.gather(1, rank.unsqueeze(1)).squeeze(1)
        return torch.where(self.fires > 0, value, torch.full_like(value, float("nan")))

    def topk_threshold(self) -> float:
        if self.smallest_kept_count == 0:
            raise ValueError("the TopK teacher kept no positive activation on the calibration data")
        return self.smallest_kept_sum / self.smallest_kept_count


def _scales_with_dead_default(scale: Tensor, dead: Tensor) -> Tensor:
    """Dead (or non-positive) entries get the median of the live ones, 1.0 if none is live."""
    good = ~dead & torch.isfinite(scale) & (scale > 0)
    fallback = float(scale[good].median()) if good.any() else 1.0
    return torch.where(good, scale, torch.full_like(scale, fallback))


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------


def calibrate(
    rsae: RSAE,
    teacher: SparseAutoencoder,
    activations: Tensor | Iterable[Any],
    *,
    quantile: float = 0.99,
    refine_steps: int = 1000,
    refine_lr: float = 1e-2,
    refine_tokens: int = 8192,
    refine_batch: int = 1024,
    batch_size: int = 4096,
    max_tokens: int | None = None,
    top_values: int = 512,
    match_l0: bool = True,
    fit: GateFit | None = None,
    seed: int = 0,
) -> CalibrationReport:
    """Set `rsae.gate`'s per-latent scales and shift from real activations, then refine (see module docstring).

    Args:
        rsae: an RSAE already holding the teacher's weights (e.g. `RSAE.from_teacher`); modified in place.
        teacher: the frozen teacher (relu, jumprelu or topk baseline).
        activations: [N, d_in] tensor or an iterable of [n, d_in] batches (a DataLoader works),
            streamed once.
        quantile: high quantile of active pre-activations used for masked and ReLU scales.
        refine_steps: Adam steps of the L2 refine (pure / thresholded); 0 skips it.
        refine_lr: Adam learning rate, in the relative units described in the module docstring.
        refine_tokens: size of the uniform reservoir of rows kept for the refine and the figures.
        refine_batch: rows per refine step.
        batch_size: rows per chunk when `activations` is one tensor.
        max_tokens: stop streaming after this many rows (None: the whole stream).
        top_values: largest active values kept per latent for the quantile.
        match_l0: thresholded mode: set `rsae.cfg.threshold_eps` so that L0 matches the teacher's
            on the calibration tokens (see module docstring).
        fit: the canonical fit the gate coefficients came from (its threshold theta_0); default:
            the fit's canonical threshold `CANONICAL_THRESHOLD`.
        seed: reservoir and minibatch sampling.

    Raises ValueError if the teacher does not match the RSAE (d_in, d_sae, family) or the stream is empty.
    """
    start = time.perf_counter()
    _check_pair(rsae, teacher)
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    family, mode = str(teacher.cfg.family), rsae.cfg.mode
    stats = _Statistics(teacher, top_values, refine_tokens, seed)
    was_training = teacher.training
    teacher.eval()
    try:
        for x in iter_batches(activations, batch_size, max_tokens):
            stats.update(x)
    finally:
        teacher.train(was_training)
    if stats.n_tokens == 0 or stats.rows is None:
        raise ValueError("calibrate got no activations: the stream was empty")
    dead = stats.fires == 0
    theta0 = fit.threshold if fit is not None and fit.threshold else CANONICAL_THRESHOLD
    tau = stats.topk_threshold() if family == "topk" and mode != "masked" else None

    gate = rsae.gate
    with torch.no_grad():
        if mode == "masked" or family == "relu":
            scale = _scales_with_dead_default(stats.active_quantile(quantile), dead)
        elif family == "jumprelu":
            scale = floored_thresholds(teacher.threshold.detach().float()) / theta0
        else:
            assert tau is not None
            scale = _topk_latent_thresholds(teacher, stats.rows, tau) / theta0
        scale = scale.to(gate.scale_in.device)
        gate.scale_in.copy_(scale)
        gate.scale_out.copy_(scale)
        gate.shift.zero_()

    steps_run, kept = 0, True
    h, target, weight = _refine_data(teacher, stats.rows)
    before = after = _gate_l2(rsae, h, target, weight)
    if mode != "masked" and refine_steps > 0:
        saved = {k: v.detach().clone() for k, v in gate.state_dict().items()}
        _refine(rsae, h, target, weight, dead, refine_steps, refine_lr, refine_batch, seed)
        steps_run = refine_steps
        after = _gate_l2(rsae, h, target, weight)
        if not after < before:
            gate.load_state_dict(saved)
            after, kept = before, False
    if mode == "thresholded" and match_l0:
        cap = 0.9 * theta0 if family != "relu" else 1.0
        rsae.cfg.threshold_eps = _l0_matching_eps(rsae, h, target, cap)
    figures = evaluate_against_teacher(rsae, teacher, stats.rows, batch_size=batch_size)
    return CalibrationReport(
        mode=mode,
        family=family,
        n_tokens=stats.n_tokens,
        refine_tokens=int(stats.rows.shape[0]),
        dead_latents=int(dead.sum()),
        topk_threshold=tau,
        quantile=quantile,
        refine_steps=steps_run,
        gate_l2_before=before,
        gate_l2_after=after,
        refine_kept=kept,
        threshold_eps=float(rsae.cfg.threshold_eps),
        seconds=time.perf_counter() - start,
        figures=figures,
    )


@torch.no_grad()
def _topk_latent_thresholds(teacher: SparseAutoencoder, rows: Tensor, tau: float) -> Tensor:
    """Per-latent pointwise thresholds of a TopK teacher: the level latent i exceeds exactly as often as it is kept.

    A global threshold (tau, the mean smallest kept activation) ignores that frequent latents are
    cut far above it and rare ones far below. Latents never kept on these rows fall back to tau."""
    output = teacher.run(rows.to(teacher.device))
    h = output.pre_acts.float()
    kept = (output.latents.dense(teacher.cfg.d_sae) != 0).sum(0)
    n = h.shape[0]
    ordered = h.sort(dim=0).values
    # Midpoint between the largest dropped and the smallest kept order statistic of each column.
    upper = ordered.gather(0, (n - kept).clamp(max=n - 1).unsqueeze(0)).squeeze(0)
    lower = ordered.gather(0, (n - kept - 1).clamp(min=0).unsqueeze(0)).squeeze(0)
    theta = 0.5 * (upper + lower)
    return floored_thresholds(torch.where(kept > 0, theta, torch.full_like(theta, tau)))


def _check_pair(rsae: RSAE, teacher: SparseAutoencoder) -> None:
    for name in ("d_in", "d_sae", "family"):
        mine, theirs = getattr(rsae.cfg, name), getattr(teacher.cfg, name)
        if mine != theirs:
            raise ValueError(f"teacher {name}={theirs!r} does not match the RSAE's {name}={mine!r}")


@torch.no_grad()
def _refine_data(teacher: SparseAutoencoder, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pre-activations, the teacher's gate output on them, and the per-latent weights ||W_dec_i||^2."""
    output = teacher.run(rows.to(teacher.device))
    target = output.latents.dense(teacher.cfg.d_sae).float()
    weight = teacher.W_dec.detach().float().pow(2).sum(-1)
    return output.pre_acts.float(), target, weight


def _gate_l2(rsae: RSAE, h: Tensor, target: Tensor, weight: Tensor) -> float:
    """`gate_l2` relative to the target's own weighted energy."""
    with torch.no_grad():
        den = (target.pow(2) * weight).sum(-1).mean().clamp_min(1e-30)
        return float(gate_l2(rsae.gate_codes(h), target, weight) / den)


@torch.no_grad()
def _l0_matching_eps(rsae: RSAE, h: Tensor, target: Tensor, cap: float) -> float:
    """eps in [0, cap] with #{|phi| > eps C_out} = #{teacher codes != 0} on these rows.

    The midpoint of two order statistics of |phi| / C_out."""
    u = (rsae.gate(h).abs() / rsae.gate.scale_out.detach().abs().clamp_min(1e-30)).flatten().float()
    n_active, n = int((target != 0).sum()), u.numel()
    if n_active == 0:
        return cap
    if n_active >= n:
        return 0.0
    # k-th smallest: (n - n_active) is the largest value that must be zeroed, the next one the smallest kept.
    below = float(u.kthvalue(n - n_active).values)
    above = float(u.kthvalue(n - n_active + 1).values)
    return min(max(0.5 * (below + above), 0.0), cap)


def _refine(rsae: RSAE, h: Tensor, target: Tensor, weight: Tensor, dead: Tensor, steps: int, lr: float,
            batch: int, seed: int) -> None:
    gate = rsae.gate
    with torch.no_grad():
        a0 = gate.numerator.detach().float()
        # Numerator steps proportional to each coefficient (with a floor so exact zeros can move).
        a_unit = a0.abs().clamp_min(1e-2 * float(a0.abs().max()) + 1e-12)
        log_c0 = gate.denominator.detach().float().log()
        log_cin0 = gate.scale_in.detach().float().clamp_min(1e-12).log()
        log_cout0 = gate.scale_out.detach().float().clamp_min(1e-12).log()
        sigma0 = gate.shift.detach().float() / gate.scale_in.detach().float()
    delta_a = torch.zeros_like(a0, requires_grad=True)
    log_c = log_c0.clone().requires_grad_(True)
    log_cin = log_cin0.clone().requires_grad_(True)
    log_cout = log_cout0.clone().requires_grad_(True)
    sigma = sigma0.clone().requires_grad_(True)
    live = (~dead).to(a0.dtype).to(log_cin.device)
    variables = [delta_a, log_c, log_cin, log_cout, sigma]
    optimiser = torch.optim.Adam(variables, lr=lr)
    den = (target.pow(2) * weight).sum(-1).mean().clamp_min(1e-30)
    gen = torch.Generator().manual_seed(seed)
    cols = gate.group_index
    n = h.shape[0]

    def parameters() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        cin = log_cin.exp()
        return a0 + a_unit * delta_a, log_c.exp(), cin, log_cout.exp(), sigma * cin

    # Never the compiled backend: compiling its backward costs ~1 min of CPU, more than a few hundred
    # refine steps at the default batch.
    backend: Backend = "cpu_kernel" if rational_cpu.applies(h, torch.float32, gate.degree) else "eager"
    for _ in range(steps):
        rows = torch.randint(n, (min(batch, n),), generator=gen).to(h.device)
        a, c, cin, cout, shift = parameters()
        num_cols, den_cols = a[cols].t(), c[cols].t()
        phi = rational_gate(h[rows], shift, cin, cout, num_cols, den_cols, backend=backend)
        # pure / thresholded: gate_codes is phi itself, here with the refine's reparametrised variables.
        loss = gate_l2(phi, target[rows], weight) / den
        optimiser.zero_grad()
        loss.backward()
        # Dead latents keep their documented initialisation (see module docstring).
        for v in (log_cin, log_cout, sigma):
            v.grad.mul_(live)
        optimiser.step()
    with torch.no_grad():
        a, c, cin, cout, shift = parameters()
        gate.set_coefficients(a, c)
        gate.scale_in.copy_(cin.to(gate.scale_in.dtype))
        gate.scale_out.copy_(cout.to(gate.scale_out.dtype))
        gate.shift.copy_(shift.to(gate.shift.dtype))


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_against_teacher(
    rsae: SparseAutoencoder, teacher: SparseAutoencoder, activations: Tensor | Iterable[Any], batch_size: int = 4096,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """Acceptance figures of `rsae` against `teacher` on the same tokens (float64 running sums).

    Returns:
        mse_teacher, mse_rsae: mean over tokens of ||x - x_hat||^2 summed over dims (reference MSE).
        mse_rel_diff: (mse_rsae - mse_teacher) / mse_teacher.
        cosine: mean over tokens of the cosine similarity of the dense latent codes; a token where
            both codes are all zero counts 1, where exactly one is, 0.
        l0_teacher: exact L0 of the teacher. l0_exact: exact L0 (z != 0) of the rsae.
        l0_tolerance: L0 of the rsae counting |z| > rsae.cfg.l0_tolerance (the teacher's L0 is exact either way).
        l0_exact_rel_diff, l0_tolerance_rel_diff: relative differences to l0_teacher.
        tokens: number of tokens.
    """
    sums = dict.fromkeys(("mse_teacher", "mse_rsae", "cosine", "l0_teacher", "l0_exact", "l0_tolerance"), 0.0)
    n = 0
    tol = float(getattr(rsae.cfg, "l0_tolerance", 0.0))
    d_sae = teacher.cfg.d_sae
    for x in iter_batches(activations, batch_size, max_tokens):
        x = teacher.check_input(x).to(teacher.device)
        t_out, r_out = teacher.run(x), rsae.run(x)
        z_t = t_out.latents.dense(d_sae).double()
        z_r = r_out.latents.dense(d_sae).double()
        sums["mse_teacher"] += float((t_out.x_hat.double() - x.double()).pow(2).sum())
        sums["mse_rsae"] += float((r_out.x_hat.double() - x.double()).pow(2).sum())
        norm_t, norm_r = z_t.norm(dim=-1), z_r.norm(dim=-1)
        cos = (z_t * z_r).sum(-1) / (norm_t * norm_r).clamp_min(1e-300)
        cos = torch.where((norm_t == 0) & (norm_r == 0), torch.ones_like(cos), cos)
        sums["cosine"] += float(cos.sum())
        sums["l0_teacher"] += float((z_t != 0).sum())
        sums["l0_exact"] += float((z_r != 0).sum())
        sums["l0_tolerance"] += float((z_r.abs() > tol).sum())
        n += x.shape[0]
    if n == 0:
        raise ValueError("evaluate_against_teacher got no activations")
    out = {key: value / n for key, value in sums.items()}
    out["mse_rel_diff"] = _rel(out["mse_rsae"], out["mse_teacher"])
    out["l0_exact_rel_diff"] = _rel(out["l0_exact"], out["l0_teacher"])
    out["l0_tolerance_rel_diff"] = _rel(out["l0_tolerance"], out["l0_teacher"])
    out["tokens"] = float(n)
    return out


def _rel(value: float, reference: float) -> float:
    if reference == 0:
        return 0.0 if value == 0 else math.inf
    return (value - reference) / reference
