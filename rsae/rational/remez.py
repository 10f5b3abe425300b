"""Relaxed Remez fits of the SAE gates by a pole-free rational function.

The rational is the one training uses, `r(t) = P(t) / Q(t)` with
`P(t) = sum_{i=0..p} a_i t^i` and `Q(t) = 1 + sum_{j=1..q} c_j |t|^j`, `c_j >= 0`, so `Q >= 1`
for every parameter value and the fit can never put a pole on the real line.

The fit is a discrete minimax problem on a dense grid over [-1, 1]. For a fixed level `delta`
the set `{(a, c): |f Q - P| <= delta Q on the grid, c >= 0}` is a convex polyhedron, so the
problem is quasi-convex and a sequence of linear programs reaches its global optimum:

* discrete differential correction (Cheney & Loeb 1961; convergence on finite sets by Barrodale,
  Powell & Roberts 1972) linearises around the current denominator and solves one LP per step
  (scipy `linprog`, HiGHS);
* a Remez-style exchange keeps the LPs small: the steps run on a reference subset of the grid,
  and the local maxima of the error on the full grid that exceed the reference level join the
  reference until none does.

Targets are the three gates, all of the form `t * H(t - theta)`: `relu` (theta = 0),
`jumprelu` and `topk` (theta in (0, 1), default CANONICAL_THRESHOLD; the gates are positively
homogeneous, so one canonical fit serves every feature's threshold after rescaling). A jump
makes the uniform problem degenerate (best error = half the jump), so jump targets are fitted
either outside a gap `|t - theta| < gap` or to a C1 smoothstep of half-width `smoothing`.
Inside the gap the fit must stay inside the band spanned by the two branches of the gate
(`min(0, t) <= r(t) <= max(0, t)`) widened by the minimax level itself; see `GateFit.level`.

Numerics: P is fitted in the monomial basis and Q homogeneously (Q(1) = 1, rows divided by the
current denominator). The optimal ReLU fits have Q(1) / Q(0) up to ~1e13 at degree 12, and a
Chebyshev basis for P would have to cancel to that relative precision near t = 0; monomials do
not, because there P's small values live in its low-order coefficients. The ReLU trick
`max(0, t) = t/2 + R(t^2)/2` with R ~ sqrt(y) lies in a subclass of this one and was measured to
reach the same errors (to 4 digits at (9, 8)), so it is not used.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
from numpy.polynomial import polynomial as poly

TARGETS: tuple[str, ...] = ("relu", "jumprelu", "topk")
JUMP_TARGETS: tuple[str, ...] = ("jumprelu", "topk")
CANONICAL_THRESHOLD: float = 0.5
"""Canonical jump threshold on [-1, 1]; mid-interval leaves room for the gap and both branches."""
DEFAULT_GAP: float = 0.05
"""Half-width of the excluded gap around a jump when neither gap nor smoothing is given."""
SUPPORTED_DEGREE: int = 12
"""Largest numerator / denominator degree the tables and the float64 monomial form are tested at."""
DEFAULT_GRID_POINTS: int = 4001
MIN_GRID_POINTS: int = 101
TABLE_RESOURCE: str = "remez_tables.json"
TABLE_FORMAT_VERSION: int = 1

TABLE_SPECS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("relu", (3, 2)),
    ("relu", (5, 4)),
    ("relu", (7, 6)),
    ("relu", (9, 8)),
    ("relu", (12, 12)),
    ("jumprelu", (5, 4)),
    ("jumprelu", (7, 6)),
    ("jumprelu", (9, 8)),
    ("jumprelu", (12, 12)),
    ("topk", (5, 4)),
    ("topk", (7, 6)),
    ("topk", (9, 8)),
    ("topk", (12, 12)),
)
"""(target, degree) pairs precomputed in remez_tables.json, at default threshold, gap and grid."""

# HiGHS hits numerical trouble on some steps of the degree-12 ReLU fits with either its default
# tolerances or tight ones, but rarely on the same step; a failed or unhelpful step is retried
# with the other setting before the iteration stops. Default first: it is faster.
_LP_OPTION_SETS: tuple[dict[str, Any], ...] = (
    {},
    {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
)
_INITIAL_REFERENCE_POINTS: int = 201


@dataclass(frozen=True)
class GateFit:
    """A fitted pole-free rational gate on [-1, 1] and how good it is."""

    target: str
    """Gate that was fitted: 'relu', 'jumprelu' or 'topk'."""
    degree: tuple[int, int]
    """(p, q): numerator and denominator degrees."""
    threshold: float
    """Jump / kink location theta of the gate t * H(t - theta) (0 for relu)."""
    gap: float
    """Half-width of the interval |t - threshold| < gap excluded from max_error (0: no gap)."""
    smoothing: float
    """Half-width w of the C1 smoothstep replacing the hard step (0: hard step).
    Target: t * S(u), S(u) = 3u^2 - 2u^3 clipped to [0, 1], u = (t - theta + w) / (2w)."""
    numerator: np.ndarray
    """a_0..a_p, monomial coefficients of P(t) = sum a_i t^i; shape [p + 1]."""
    denominator: np.ndarray
    """c_1..c_q >= 0, coefficients of Q(t) = 1 + sum c_j |t|^j; shape [q]."""
    max_error: float
    """max |r - target| over the grid points outside the gap (the number to quote)."""
    level: float
    """Minimax level reached: max over the whole grid of the distance from r to the target,
    where inside the gap the target is the band [min(0, t), max(0, t)] spanned by the gate's two
    branches. So inside the gap min(0, t) - level <= r(t) <= max(0, t) + level, and
    max_error <= level."""
    gap_overshoot: float
    """Largest distance from r to the band [min(0, t), max(0, t)] inside the gap (0 without one)."""
    grid: np.ndarray
    """The grid over [-1, 1] the fit was computed on; shape [grid_points]."""
    error_curve: np.ndarray
    """r(grid) - target(grid), including inside the gap where it is large by design."""
    min_q: float
    """Minimum of Q over the grid (>= 1 by construction)."""
    iterations: int
    """Differential-correction LP solves in total (all exchange rounds)."""
    seconds: float
    """Wall time of the fit."""
    grid_points: int
    """Number of grid points."""
    in_gap: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool), repr=False)
    """Mask of grid points inside the gap; shape [grid_points]."""

    def __call__(self, t: np.ndarray) -> np.ndarray:
        """Evaluate r(t); meaningful on [-1, 1] only (rationals extrapolate badly)."""
        return evaluate_rational(self.numerator, self.denominator, t)

    def fine_max_error(self) -> float:
        """max |r - target| outside the gap on the fine check grid (`fine_grid`): the error between the points
        of the fit's own grid too, which `max_error` does not see."""
        t = fine_grid(self.threshold)
        outside = np.abs(t - self.threshold) >= self.gap
        return float(np.abs(self(t[outside]) - gate_target(t[outside], self.threshold, self.smoothing)).max())

    def to_json(self) -> dict[str, Any]:
        """JSON-safe summary: settings, coefficients and errors, without the grid arrays."""
        return {
            "target": self.target,
            "degree": [int(self.degree[0]), int(self.degree[1])],
            "threshold": float(self.threshold),
            "gap": float(self.gap),
            "smoothing": float(self.smoothing),
            "max_error": float(self.max_error),
            "fine_max_error": self.fine_max_error(),
            "level": float(self.level),
            "gap_overshoot": float(self.gap_overshoot),
            "min_q": float(self.min_q),
            "grid_points": int(self.grid_points),
            "iterations": int(self.iterations),
            "seconds": float(self.seconds),
            "numerator": [float(v) for v in self.numerator],
            "denominator": [float(v) for v in self.denominator],
        }


REFINE_ROUNDS = 6
REFINE_POINTS = 64
"""Refinement rounds at most, and fine-grid local maxima added per round (the largest), for `fit_gate(refine=True)`."""
REFINE_TOLERANCE = 0.005
"""Relative gap between the fine-grid error and the level on the fitted points at which refinement stops."""

FINE_GRID_POINTS = 1_000_001
"""Uniform points of the fine check grid on [-1, 1], to which `fine_grid` adds points clustered at the kink."""


def fine_grid(threshold: float, points: int = FINE_GRID_POINTS, clustered: int = 200_000) -> np.ndarray:
    """A check grid over [-1, 1]: `points` uniform points plus `clustered` points at distances 1e-12..1 either
    side of the kink or jump, where a rational's error peaks between the points of any uniform grid."""
    near = np.logspace(-12, 0, clustered // 2)
    t = np.concatenate([np.linspace(-1.0, 1.0, points), threshold - near, threshold + near])
    return np.unique(np.clip(t, -1.0, 1.0))


def evaluate_rational(numerator: np.ndarray, denominator: np.ndarray, t: np.ndarray) -> np.ndarray:
    """r(t) = P(t) / (1 + sum c_j |t|^j) in float64."""
    t = np.asarray(t, dtype=np.float64)
    return poly.polyval(t, numerator) / _denominator_values(denominator, t)


def _denominator_values(denominator: np.ndarray, t: np.ndarray) -> np.ndarray:
    return 1.0 + poly.polyval(np.abs(t), np.concatenate([[0.0], np.asarray(denominator, dtype=np.float64)]))


def gate_target(t: np.ndarray, threshold: float, smoothing: float = 0.0) -> np.ndarray:
    """The gate t * H(t - threshold), or t * smoothstep when smoothing > 0 (H(0) = 0)."""
    t = np.asarray(t, dtype=np.float64)
    if smoothing > 0:
        u = np.clip((t - threshold + smoothing) / (2 * smoothing), 0.0, 1.0)
        return t * u * u * (3.0 - 2.0 * u)
    return np.where(t > threshold, t, 0.0)


def _resolve_settings(
    target: str,
    degree: tuple[int, int],
    threshold: float | None,
    gap: float | None,
    smoothing: float | None,
    grid_points: int,
) -> tuple[int, int, float, float, float]:
    """Validate the request and fill in defaults; every problem is a ValueError naming it."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; accepted targets: {', '.join(TARGETS)}")
    try:
        p, q = (int(d) for d in degree)
    except (TypeError, ValueError):
        raise ValueError(f"degree must be a pair of integers (p, q), got {degree!r}") from None
    if p < 1 or q < 0:
        raise ValueError(f"degree (p, q) must have p >= 1 and q >= 0, got ({p}, {q})")
    if max(p, q) > SUPPORTED_DEGREE:
        warnings.warn(
            f"degree ({p}, {q}) exceeds the tested range (up to ({SUPPORTED_DEGREE}, {SUPPORTED_DEGREE})); "
            "the monomial form may lose accuracy",
            stacklevel=3,
        )
    if grid_points < MIN_GRID_POINTS:
        raise ValueError(f"grid_points must be >= {MIN_GRID_POINTS}, got {grid_points}")
    if target == "relu":
        if threshold not in (None, 0, 0.0):
            raise ValueError(f"relu has its kink at 0; threshold must be None or 0, got {threshold}")
        theta = 0.0
    else:
        theta = CANONICAL_THRESHOLD if threshold is None else float(threshold)
        if not 0.0 < theta < 1.0:
            raise ValueError(f"threshold for {target} must lie in the open interval (0, 1), got {theta}")
    if smoothing is not None and not smoothing >= 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    if gap is not None and not gap >= 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    w = 0.0 if smoothing is None else float(smoothing)
    if gap is None:
        gap = DEFAULT_GAP if (target in JUMP_TARGETS and w == 0.0) else 0.0
    gap = float(gap)
    if target in JUMP_TARGETS and gap == 0.0 and w == 0.0:
        raise ValueError(
            f"{target} has a jump: a uniform fit to it is degenerate; give gap > 0 or smoothing > 0 "
            f"(default gap {DEFAULT_GAP})"
        )
    if theta - gap <= -1.0 or theta + gap >= 1.0 or theta - w <= -1.0 or theta + w >= 1.0:
        raise ValueError(
            f"gap {gap} / smoothing {w} around threshold {theta} must leave grid points on both sides "
            "inside [-1, 1]"
        )
    return p, q, theta, gap, w


@dataclass
class _Problem:
    """Discrete minimax data: distance from P / Q to the band [lo, hi] at each grid point x."""

    x: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    p: int
    q: int

    def numerator_basis(self, s: np.ndarray) -> np.ndarray:
        return s[:, None] ** np.arange(self.p + 1)

    def denominator_basis(self, s: np.ndarray) -> np.ndarray:
        return np.abs(s)[:, None] ** np.arange(self.q + 1)


def _distance(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.maximum(np.maximum(lo - values, values - hi), 0.0)


def _dc_step(
    pb: _Problem, ref: np.ndarray, q_k: np.ndarray, delta_k: float, options: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray] | None:
    """One differential-correction LP on the reference points; None if HiGHS returns nothing.

    Q is homogeneous here, Q = sum_{j=0..q} b_j |t|^j with b >= 0 and sum b = 1 (so Q(1) = 1):
    the optimal fits need Q(1) / Q(0) up to ~1e13, which Q(0) = 1 would turn into coefficients
    the LP cannot resolve. Rows are divided by Q_k so HiGHS's absolute feasibility tolerance acts
    relative to the denominator everywhere.

    min z  s.t.  (distance of P / Q to the band) * Q - delta_k Q <= z Q_k, linear in (a, b, z)
    because Q_k is fixed. The current iterate is feasible with z <= 0, so z < 0 means a strictly
    better fit on the reference; at t = 1, Q = Q_k = 1, so z >= -delta_k keeps the LP bounded.
    A non-optimal status still returns x when HiGHS has one: the caller only accepts a step
    that lowers the measured error.
    """
    x, lo, hi = pb.x[ref], pb.lo[ref], pb.hi[ref]
    scale = 1.0 / q_k[ref][:, None]
    a_basis = pb.numerator_basis(x) * scale
    b_basis = pb.denominator_basis(x) * scale
    ones = np.ones((ref.size, 1))
    upper = np.hstack([a_basis, -(hi + delta_k)[:, None] * b_basis, -ones])
    lower = np.hstack([-a_basis, (lo - delta_k)[:, None] * b_basis, -ones])
    n_a, n_b = a_basis.shape[1], b_basis.shape[1]
    cost = np.zeros(n_a + n_b + 1)
    cost[-1] = 1.0
    a_eq = np.zeros((1, n_a + n_b + 1))
    a_eq[0, n_a : n_a + n_b] = 1.0
    bounds = [(None, None)] * n_a + [(0.0, None)] * n_b + [(-delta_k, None)]
    from scipy.optimize import linprog  # ~0.3 s to import: only when a fit runs, not with `import rsae`

    res = linprog(
        cost,
        A_ub=np.vstack([upper, lower]),
        b_ub=np.zeros(2 * ref.size),
        A_eq=a_eq,
        b_eq=[1.0],
        bounds=bounds,
        method="highs",
        options=options,
    )
    if res.x is None:
        return None
    b = np.maximum(res.x[n_a : n_a + n_b], 0.0)
    if b[0] <= 0.0:
        return None
    return res.x[:n_a], b


def _local_maxima(values: np.ndarray) -> np.ndarray:
    """Indices of (non-strict) local maxima, endpoints included."""
    padded = np.concatenate([[-np.inf], values, [-np.inf]])
    return np.flatnonzero((values >= padded[:-2]) & (values >= padded[2:]))


def _solve_minimax(pb: _Problem, max_iter: int, tol: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Differential correction with reference exchange; returns the best iterate seen.

    Returns (a_0..a_p, c_1..c_q in the training form Q(0) = 1, LP solves).
    """
    n = pb.x.size
    ref_mask = np.zeros(n, dtype=bool)
    ref_mask[np.unique(np.linspace(0, n - 1, min(n, _INITIAL_REFERENCE_POINTS)).round().astype(int))] = True
    a_basis_full = pb.numerator_basis(pb.x)
    b_basis_full = pb.denominator_basis(pb.x)
    # Start from the least-squares polynomial to the band's midpoint: any start converges, a
    # good one saves LP solves.
    a = np.linalg.lstsq(a_basis_full, 0.5 * (pb.lo + pb.hi), rcond=None)[0]
    b = np.zeros(pb.q + 1)
    b[0] = 1.0

    def full_state(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        qv = b_basis_full @ b
        return qv, _distance((a_basis_full @ a) / qv, pb.lo, pb.hi)

    q_k, dist = full_state(a, b)
    best = (a, b, float(dist.max()))
    iterations = 0
    while iterations < max_iter:
        ref = np.flatnonzero(ref_mask)
        delta_ref = float(dist[ref].max())
        while iterations < max_iter:
            improved = 0.0
            for options in _LP_OPTION_SETS:
                step = _dc_step(pb, ref, q_k, delta_ref, options)
                iterations += 1
                if step is None:
                    continue
                q_new, dist_new = full_state(*step)
                delta_new = float(dist_new[ref].max())
                if delta_new < delta_ref:
                    (a, b), q_k, dist = step, q_new, dist_new
                    improved, delta_ref = delta_ref - delta_new, delta_new
                    break
            if float(dist.max()) < best[2]:
                best = (a, b, float(dist.max()))
            if improved <= 1e-2 * tol * delta_ref:
                break
        peaks = _local_maxima(dist)
        violators = peaks[(dist[peaks] > delta_ref * (1.0 + tol)) & ~ref_mask[peaks]]
        if violators.size == 0:
            break
        ref_mask[violators] = True
    a, b, _ = best
    return a / b[0], b[1:] / b[0], iterations


def _finish(
    target: str,
    degree: tuple[int, int],
    theta: float,
    gap: float,
    w: float,
    numerator: np.ndarray,
    denominator: np.ndarray,
    iterations: int,
    seconds: float,
    grid_points: int,
) -> GateFit:
    """Measure a fit on the grid and package it; shared by fitting and table loading."""
    x = np.linspace(-1.0, 1.0, grid_points)
    f = gate_target(x, theta, w)
    in_gap = np.abs(x - theta) < gap
    values = evaluate_rational(numerator, denominator, x)
    error_curve = values - f
    band_dist = _distance(values[in_gap], np.minimum(0.0, x[in_gap]), np.maximum(0.0, x[in_gap]))
    gap_overshoot = float(band_dist.max()) if band_dist.size else 0.0
    max_error = float(np.abs(error_curve[~in_gap]).max())
    return GateFit(
        target=target,
        degree=degree,
        threshold=theta,
        gap=gap,
        smoothing=w,
        numerator=np.asarray(numerator, dtype=np.float64),
        denominator=np.asarray(denominator, dtype=np.float64),
        max_error=max_error,
        level=max(max_error, gap_overshoot),
        gap_overshoot=gap_overshoot,
        grid=x,
        error_curve=error_curve,
        min_q=float(_denominator_values(denominator, x).min()),
        iterations=iterations,
        seconds=seconds,
        grid_points=grid_points,
        in_gap=in_gap,
    )


def fit_gate(
    target: str,
    degree: tuple[int, int],
    threshold: float | None = None,
    gap: float | None = None,
    smoothing: float | None = None,
    grid_points: int = DEFAULT_GRID_POINTS,
    max_iter: int = 400,
    tol: float = 1e-4,
    refine: bool = False,
) -> GateFit:
    """Minimax fit of a gate on [-1, 1] by P(t) / (1 + sum c_j |t|^j), c_j >= 0.

    target: 'relu', 'jumprelu' or 'topk'. degree: (p, q), p >= 1, q >= 0 (above 12 warns).
    threshold: jump location in (0, 1) for jumprelu / topk (default CANONICAL_THRESHOLD);
    must be None or 0 for relu. gap: half-width of the excluded interval around the threshold
    (default DEFAULT_GAP for a hard jump, 0 when smoothing is given). Inside the gap the fit is
    held in the band min(0, t) - level <= r(t) <= max(0, t) + level, level being the minimax level
    (see GateFit.level), so it cannot overshoot more than it errs elsewhere. smoothing: half-width
    of a C1 smoothstep replacing the hard step (see GateFit.smoothing). grid_points: uniform grid
    size (odd keeps t = 0 on the grid). max_iter: cap on LP solves. tol: relative tolerance of
    the exchange (grid error vs reference error) and, scaled by 1e-2, of the per-step progress
    that keeps differential correction going. refine: after the fit, add the local maxima of its error on
    the fine check grid (`fine_grid`) to the points and fit again, until the fine-grid error is within
    REFINE_TOLERANCE of the level on the points (then within that of the true minimax error), at most
    REFINE_ROUNDS times.

    Raises ValueError on bad input, naming the problem and the accepted values.
    """
    p, q, theta, gap_, w = _resolve_settings(target, degree, threshold, gap, smoothing, grid_points)
    start = time.perf_counter()
    x = np.linspace(-1.0, 1.0, grid_points)
    iterations = 0
    for _ in range(1 + (REFINE_ROUNDS if refine else 0)):
        pb = _problem(x, theta, gap_, w, p, q)
        numerator, denominator, used = _solve_minimax(pb, max_iter, tol)
        iterations += used
        if not refine:
            break
        # Exchange with the continuous error: the fine check grid's local maxima above the level reached on
        # the points fitted so far join them. The level on any point set bounds the true minimax error from
        # below, and the fine-grid error bounds this fit's from above: within REFINE_TOLERANCE, done.
        level = float(_distance(evaluate_rational(numerator, denominator, pb.x), pb.lo, pb.hi).max())
        fine = _problem(fine_grid(theta), theta, gap_, w, p, q)
        dist = _distance(evaluate_rational(numerator, denominator, fine.x), fine.lo, fine.hi)
        if dist.max() <= (1.0 + REFINE_TOLERANCE) * level:
            break
        peaks = _local_maxima(dist)
        peaks = peaks[dist[peaks] > level]
        x = np.union1d(x, fine.x[peaks[np.argsort(dist[peaks])[-REFINE_POINTS:]]])
    seconds = time.perf_counter() - start
    return _finish(target, (p, q), theta, gap_, w, numerator, denominator, iterations, seconds, grid_points)


def _problem(x: np.ndarray, theta: float, gap: float, w: float, p: int, q: int) -> _Problem:
    """The band each point's value must lie in: the gate itself, or inside the gap the span of its branches."""
    f = gate_target(x, theta, w)
    in_gap = np.abs(x - theta) < gap
    return _Problem(x=x, lo=np.where(in_gap, np.minimum(0.0, x), f), hi=np.where(in_gap, np.maximum(0.0, x), f),
                    p=p, q=q)


def table_fits(grid_points: int = DEFAULT_GRID_POINTS) -> list[GateFit]:
    """Fit every TABLE_SPECS entry at default settings (what remez_tables.json holds)."""
    return [fit_gate(target, degree, grid_points=grid_points) for target, degree in TABLE_SPECS]


def load_table() -> dict[str, Any]:
    """The packaged remez_tables.json, parsed."""
    return json.loads(resources.files("rsae.rational").joinpath(TABLE_RESOURCE).read_text(encoding="utf-8"))


def lookup_fit(
    target: str, degree: tuple[int, int], threshold: float | None = None, gap: float | None = None
) -> GateFit | None:
    """The precomputed fit for these settings, or None if the table has none.

    Defaults resolve as in fit_gate (canonical threshold, default gap, no smoothing), so
    `lookup_fit(t, d)` returns the table entry `fit_gate(t, d)` would recompute. The grid and
    error curve are re-evaluated from the stored coefficients.
    """
    p, q, theta, gap_, _ = _resolve_settings(target, degree, threshold, gap, None, DEFAULT_GRID_POINTS)
    for entry in load_table()["fits"]:
        if (
            entry["target"] == target
            and tuple(entry["degree"]) == (p, q)
            and math.isclose(entry["threshold"], theta, abs_tol=1e-12)
            and math.isclose(entry["gap"], gap_, abs_tol=1e-12)
            and entry["smoothing"] == 0.0
        ):
            return _finish(
                target,
                (p, q),
                theta,
                gap_,
                0.0,
                np.asarray(entry["numerator"], dtype=np.float64),
                np.asarray(entry["denominator"], dtype=np.float64),
                int(entry["iterations"]),
                float(entry["seconds"]),
                int(entry["grid_points"]),
            )
    return None
