"""Tests for rsae.rational.remez: optimality against independent oracles, pole-freeness, jumps, tables, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linprog, minimize

from rsae.rational.remez import (
    CANONICAL_THRESHOLD,
    DEFAULT_GAP,
    TABLE_SPECS,
    GateFit,
    fit_gate,
    gate_target,
    load_table,
    lookup_fit,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def relu_fits() -> dict[tuple[int, int], GateFit]:
    return {d: fit_gate("relu", d) for d in [(3, 2), (5, 4), (7, 6)]}


def feasibility_margin(
    x: np.ndarray, f: np.ndarray, p: int, q: int, level: float, weight: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Largest s with |f Q - P| + s * weight <= level * Q on the grid, Q = sum b_j |t|^j, b >= 0, sum b = 1.

    A different LP from the fitter's (no differential correction, no exchange, full grid, one
    solve): for any positive weight, s < 0 proves no rational of the class reaches `level` on
    the grid, i.e. `level` is a lower bound on the discrete minimax error. The weight only
    scales rows so that the margin is not lost in HiGHS's absolute tolerance where Q is tiny.
    HiGHS's default tolerance (1e-7) is not enough here: it reported "optimal" points that
    violate rows by more than the 1% margin, hence the tight settings. Returns (s, a, b).
    """
    a_basis = x[:, None] ** np.arange(p + 1)
    b_basis = np.abs(x)[:, None] ** np.arange(q + 1)
    ones = weight[:, None]
    upper = np.hstack([-a_basis, (f - level)[:, None] * b_basis, ones])
    lower = np.hstack([a_basis, (-f - level)[:, None] * b_basis, ones])
    cost = np.zeros(p + q + 3)
    cost[-1] = -1.0
    a_eq = np.zeros((1, p + q + 3))
    a_eq[0, p + 1 : p + q + 2] = 1.0
    res = linprog(
        cost,
        A_ub=np.vstack([upper, lower]),
        b_ub=np.zeros(2 * x.size),
        A_eq=a_eq,
        b_eq=[1.0],
        bounds=[(None, None)] * (p + 1) + [(0, None)] * (q + 1) + [(None, 1.0)],
        method="highs",
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    assert res.status == 0, res.message
    return -res.fun, res.x[: p + 1], res.x[p + 1 : p + q + 2]


@pytest.mark.parametrize("degree", [(3, 2), (5, 4), (7, 6)])
def test_relu_reaches_minimax_lower_bound(relu_fits: dict[tuple[int, int], GateFit], degree: tuple[int, int]) -> None:
    fit = relu_fits[degree]
    f = np.maximum(fit.grid, 0.0)
    q = 1.0 + np.polynomial.polynomial.polyval(np.abs(fit.grid), np.concatenate([[0.0], fit.denominator]))
    weight = q / q.max()
    margin, _, _ = feasibility_margin(fit.grid, f, *degree, 0.99 * fit.max_error, weight)
    assert margin < -1e-3 * fit.max_error
    # The oracle LP finds the fit's own level attainable, with a point that really attains it.
    margin, a, b = feasibility_margin(fit.grid, f, *degree, 1.001 * fit.max_error, weight)
    assert margin > -1e-9
    oracle = np.polynomial.polynomial.polyval(fit.grid, a) / (np.abs(fit.grid)[:, None] ** np.arange(len(b)) @ b)
    assert np.abs(oracle - f).max() <= 1.002 * fit.max_error


def test_relu_3_2_matches_nonlinear_minimax_from_random_starts(relu_fits: dict[tuple[int, int], GateFit]) -> None:
    """SLSQP on the epigraph form min e s.t. |r(x_i) - f_i| <= e, c >= 0, in the training form."""
    fit = relu_fits[(3, 2)]
    x = fit.grid
    f = np.maximum(x, 0.0)
    p, q = 3, 2
    vp = x[:, None] ** np.arange(p + 1)
    vq = np.abs(x)[:, None] ** np.arange(1, q + 1)

    def resid(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        qv = 1.0 + vq @ v[p + 1 : -1]
        return (vp @ v[: p + 1]) / qv - f, qv

    def cons(v: np.ndarray) -> np.ndarray:
        r, _ = resid(v)
        return np.concatenate([v[-1] - r, v[-1] + r])

    def cons_jac(v: np.ndarray) -> np.ndarray:
        r, qv = resid(v)
        dr = np.hstack([vp / qv[:, None], -((r + f) / qv)[:, None] * vq])
        col = np.ones((x.size, 1))
        return np.vstack([np.hstack([-dr, col]), np.hstack([dr, col])])

    rng = np.random.default_rng(0)
    results = []
    for _ in range(6):
        a0 = np.polynomial.polynomial.polyfit(x, f, p) + rng.normal(0, 0.05, p + 1)
        c0 = rng.uniform(0, 3, q)
        v0 = np.concatenate([a0, c0, [0.0]])
        v0[-1] = np.abs(resid(v0)[0]).max()
        res = minimize(
            lambda v: v[-1],
            v0,
            jac=lambda v: np.eye(v.size)[-1],
            constraints=[{"type": "ineq", "fun": cons, "jac": cons_jac}],
            bounds=[(None, None)] * (p + 1) + [(0, None)] * q + [(0, None)],
            method="SLSQP",
            options={"maxiter": 300, "ftol": 1e-12},
        )
        results.append(float(np.abs(resid(res.x)[0]).max()))
    assert min(results) >= fit.max_error * (1 - 1e-3)
    assert min(results) <= fit.max_error * 1.01


def test_relu_error_falls_with_degree_and_is_pole_free() -> None:
    errors = []
    for target, degree in TABLE_SPECS:
        if target != "relu":
            continue
        fit = lookup_fit("relu", degree)
        assert fit is not None
        assert fit.min_q >= 1.0
        assert np.all(fit.denominator >= 0.0)
        errors.append(fit.max_error)
    assert all(b < 0.5 * a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-4


def test_denominator_form_never_has_poles_on_a_wide_interval() -> None:
    fit = lookup_fit("relu", (12, 12))
    assert fit is not None
    t = np.linspace(-50, 50, 100001)
    q = 1.0 + np.polynomial.polynomial.polyval(np.abs(t), np.concatenate([[0.0], fit.denominator]))
    assert q.min() >= 1.0
    assert np.isfinite(fit(t)).all()


def test_fit_between_grid_points_matches_grid_error() -> None:
    fit = lookup_fit("relu", (7, 6))
    assert fit is not None
    fine = np.linspace(-1, 1, 200001)
    assert np.abs(fit(fine) - np.maximum(fine, 0)).max() <= 1.01 * fit.max_error


@pytest.mark.parametrize("target", ["jumprelu", "topk"])
def test_jump_fit_reports_error_outside_gap_and_bounds_overshoot(target: str) -> None:
    fit = fit_gate(target, (7, 6), threshold=0.4, gap=0.05)
    assert fit.threshold == 0.4 and fit.gap == 0.05
    t = fit.grid
    outside = np.abs(t - 0.4) >= 0.05
    err = np.abs(fit(t) - gate_target(t, 0.4))
    assert fit.max_error == pytest.approx(err[outside].max())
    # Inside the gap the error is large by design but the fit stays in the branches' band.
    inside = ~outside
    assert err[inside].max() > fit.max_error
    values = fit(t[inside])
    assert np.all(values >= np.minimum(0, t[inside]) - fit.level - 1e-12)
    assert np.all(values <= np.maximum(0, t[inside]) + fit.level + 1e-12)
    assert fit.max_error <= fit.level and fit.gap_overshoot <= fit.level
    assert fit.min_q >= 1.0 and np.all(fit.denominator >= 0)


def test_jump_error_falls_with_degree_and_gap() -> None:
    errs = [lookup_fit("jumprelu", d).max_error for d in [(5, 4), (7, 6), (9, 8), (12, 12)]]  # type: ignore[union-attr]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    wide = fit_gate("jumprelu", (7, 6), gap=0.15)
    assert wide.max_error < lookup_fit("jumprelu", (7, 6)).max_error  # type: ignore[union-attr]


def test_smoothed_step_is_fitted_everywhere() -> None:
    fit = fit_gate("jumprelu", (7, 6), smoothing=0.1)
    assert fit.gap == 0.0 and fit.gap_overshoot == 0.0
    assert fit.max_error == pytest.approx(np.abs(fit.error_curve).max())
    # C1 smoothstep: equals the hard gate outside [theta - w, theta + w], halfway at theta.
    t = np.array([0.3, 0.5, 0.7])
    assert gate_target(t, 0.5, 0.1).tolist() == pytest.approx([0.0, 0.25, 0.7])
    assert fit.max_error < lookup_fit("jumprelu", (7, 6)).max_error  # type: ignore[union-attr]


@pytest.mark.parametrize("target,degree", [("relu", (5, 4)), ("relu", (9, 8)), ("jumprelu", (9, 8)), ("topk", (5, 4))])
def test_tables_reproduce(target: str, degree: tuple[int, int]) -> None:
    stored = lookup_fit(target, degree)
    assert stored is not None
    fresh = fit_gate(target, degree)
    assert fresh.max_error == pytest.approx(stored.max_error, rel=1e-3)
    np.testing.assert_allclose(fresh(fresh.grid), stored(stored.grid), atol=1e-3 * stored.max_error + 1e-12)


def test_table_covers_specs_and_settings() -> None:
    table = load_table()
    entries = {(e["target"], tuple(e["degree"])) for e in table["fits"]}
    assert entries == set(TABLE_SPECS)
    for e in table["fits"]:
        assert e["grid_points"] >= 4001 and e["min_q"] >= 1.0 and min(e["denominator"], default=0.0) >= 0.0
        if e["target"] != "relu":
            assert e["threshold"] == CANONICAL_THRESHOLD and e["gap"] == DEFAULT_GAP
    assert lookup_fit("relu", (4, 4)) is None
    assert lookup_fit("jumprelu", (9, 8), threshold=0.3) is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target": "gelu", "degree": (3, 2)}, "relu, jumprelu, topk"),
        ({"target": "relu", "degree": (0, 2)}, "p >= 1"),
        ({"target": "relu", "degree": (3, -1)}, "q >= 0"),
        ({"target": "jumprelu", "degree": (3, 2), "threshold": 0.0}, r"\(0, 1\)"),
        ({"target": "topk", "degree": (3, 2), "threshold": 1.2}, r"\(0, 1\)"),
        ({"target": "relu", "degree": (3, 2), "threshold": 0.5}, "threshold must be None or 0"),
        ({"target": "jumprelu", "degree": (3, 2), "gap": -0.1}, "gap must be >= 0"),
        ({"target": "jumprelu", "degree": (3, 2), "smoothing": -0.1}, "smoothing must be >= 0"),
        ({"target": "jumprelu", "degree": (3, 2), "gap": 0.0}, "gap > 0 or smoothing > 0"),
        ({"target": "jumprelu", "degree": (3, 2), "threshold": 0.9, "gap": 0.2}, "both sides"),
        ({"target": "relu", "degree": (3, 2), "grid_points": 10}, "grid_points"),
        ({"target": "relu", "degree": "ab"}, "pair of integers"),
    ],
)
def test_bad_input_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_gate(**kwargs)


def test_large_degree_warns() -> None:
    with pytest.warns(UserWarning, match="exceeds the tested range"):
        fit_gate("relu", (13, 1), grid_points=201)


def test_script_runs_as_module_entry() -> None:
    """The table script imports cleanly (its fitting is exercised by test_tables_reproduce)."""
    out = subprocess.run(
        [sys.executable, "-c", "import runpy; runpy.run_path('scripts/make_remez_tables.py', run_name='x')"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


def test_fine_grid_error_sees_between_the_fitting_grid_points() -> None:
    """The fine check grid (uniform plus clustered at the kink) contains the fitting grid's error and can only
    find more; for a high-degree ReLU fit it finds more (benchmarks/results/remez_accuracy.md)."""
    from rsae.rational.remez import fine_grid

    t = fine_grid(0.5)
    assert t.min() == -1.0 and t.max() == 1.0 and np.all(np.diff(t) > 0) and t.size > 1_000_000
    assert np.min(np.abs(t - 0.5)[np.abs(t - 0.5) > 0]) < 1e-11  # clustered at the threshold
    coarse = fit_gate("relu", (5, 4), grid_points=201)
    assert coarse.fine_max_error() >= coarse.max_error
    assert coarse.to_json()["fine_max_error"] == coarse.fine_max_error()
    shipped = lookup_fit("relu", (12, 12))
    assert shipped is not None and shipped.fine_max_error() > 1.01 * shipped.max_error


def test_refinement_brings_the_continuous_error_to_the_minimax() -> None:
    """refine=True exchanges with the fine grid's local maxima: the fine-grid error then sits within 0.5% (plus the
    exchange's own tolerance) of the level on the uniform points, a lower bound of the true minimax error."""
    plain = fit_gate("relu", (12, 12))
    refined = fit_gate("relu", (12, 12), refine=True)
    assert plain.fine_max_error() > 1.05 * plain.level  # the uniform grid misses the error near the kink
    assert refined.fine_max_error() <= 1.006 * refined.level
    assert refined.fine_max_error() < plain.fine_max_error()
