"""Tests of the rational gate math (rsae.rational.kernel): pole-freeness, tails, analytic gradients, the
compiled and CPU-kernel backends against the eager reference, dtype policy and memory (the kernel's own
edge cases are in test_rational_cpu.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rsae.rational.kernel as rational
from rsae.rational.kernel import compile_enabled, rational_gate, rational_reference

DEGREES = [(3, 2), (9, 8), (12, 12), (4, 0)]


def make_args(m: int, f: int, p: int, q: int, dtype: torch.dtype = torch.float64, seed: int = 0,
              spread: float = 2.0) -> list[torch.Tensor]:
    """x spans inside and outside [-1, 1] (spread > 1) so both the rational and the tails are hit."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, f, generator=gen, dtype=torch.float64) * spread
    shift = torch.randn(f, generator=gen, dtype=torch.float64) * 0.1
    scale_in = torch.rand(f, generator=gen, dtype=torch.float64) + 0.5
    scale_out = torch.rand(f, generator=gen, dtype=torch.float64) + 0.5
    numerator = torch.randn(p + 1, f, generator=gen, dtype=torch.float64) * 0.5
    denominator = torch.rand(q, f, generator=gen, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (x, shift, scale_in, scale_out, numerator, denominator)]


def reference_gate(x, shift, scale_in, scale_out, numerator, denominator):
    cd = rational.compute_dtype(x, numerator)
    u = (x.to(cd) - shift.to(cd)) / scale_in.to(cd)
    return (scale_out.to(cd) * rational_reference(u, numerator, denominator).to(cd)).to(x.dtype)


def denominator_q(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    y = t.abs()
    return 1.0 + sum((c[j - 1] * y**j for j in range(1, c.shape[0] + 1)), torch.zeros_like(t))


# ------------------------------------------------------------------ analytic gradients (fp64)
@pytest.mark.parametrize("degree", [(3, 2), (9, 8), (12, 12), (4, 0), (1, 1)])
def test_gradcheck_fast_function_eager(degree):
    p, q = degree
    args = make_args(6, 5, p, q)
    assert torch.autograd.gradcheck(lambda *a: rational_gate(*a, backend="eager"), args)
    # exactly-at-the-ends inputs and exact zeros (sign(0), |t|^0) are covered too
    x = torch.tensor([[-3.0, -1.0, 0.0, 0.5, 1.0, 4.0]], dtype=torch.float64, requires_grad=True)
    others = [t.detach()[..., :1].expand(*t.shape[:-1], 6).clone().requires_grad_() for t in args[1:]]
    others[0] = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    others[1] = torch.ones(6, dtype=torch.float64, requires_grad=True)
    out = rational_gate(x, *others, backend="eager")
    ref = reference_gate(x, *others)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_shared_expanded_coefficients():
    """Expanded (stride-0) shared coefficients: autograd must sum the [p+1, F] grads back."""
    p, q = 5, 4
    x, shift, scale_in, scale_out, _, _ = make_args(4, 6, p, q)
    a = torch.randn(p + 1, dtype=torch.float64, requires_grad=True)
    c = torch.rand(q, dtype=torch.float64, requires_grad=True)

    def fn(x, shift, scale_in, scale_out, a, c):
        return rational_gate(x, shift, scale_in, scale_out, a[:, None].expand(p + 1, 6), c[:, None].expand(q, 6),
                             backend="eager")

    assert torch.autograd.gradcheck(fn, (x, shift, scale_in, scale_out, a, c))


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_shared_coefficients_take_whole_tensor_sums(backend):
    """[p+1, 1] / [q, 1] coefficients broadcast over columns; their gradients are whole-tensor sums."""
    p, q = 5, 4
    args = make_args(4, 6, p, q)
    a, c = (t.detach()[:, :1].clone().requires_grad_() for t in args[4:])
    if backend == "eager":
        assert torch.autograd.gradcheck(lambda *t: rational_gate(*t, backend="eager"), (*args[:4], a, c))
    out = rational_gate(*args[:4], a, c, backend=backend)
    ref = reference_gate(*args[:4], a.expand(p + 1, 6), c.expand(q, 6))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (a, c), g), torch.autograd.grad(ref, (a, c), g),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 32, 40, 64, 768])
def test_blocked_backward_matches_reference(rows, shared):
    """Compiled: the backward views x as [M / B, B, F] row blocks (B a power of two dividing M; unblocked for
    odd or tiny M) and sums per block and column. Every row count must give the reference gradients, for
    shared [k, 1] coefficients (summed over columns) and per-column [k, F] ones."""
    p, q = 3, 2
    assert rational._row_block(rows) in (1, 2, 4, 8, 16, 32, 64, 128)
    assert rows % rational._row_block(rows) == 0
    args = make_args(rows, 5, p, q, dtype=torch.float32, seed=rows)
    a, c = (t.detach()[:, :1].clone() if shared else t.detach().clone() for t in args[4:])
    a, c = a.requires_grad_(), c.requires_grad_()
    out = rational_gate(*args[:4], a, c, backend="compiled")
    ref = reference_gate(*args[:4], a.expand(p + 1, 5), c.expand(q, 5))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    inputs = (*args[:4], a, c)
    for got, want in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grad_layout", ["features", "rows"])
@pytest.mark.parametrize("shared", [True, False])
def test_feature_major_input_matches_reference_without_a_copy(shared, grad_layout):
    """x stored as [F, M] (a transposed view, e.g. from addmm(b, W.T, x.T).T): the backward runs on that layout
    directly (a row-major incoming gradient is copied into it) and hands grad_x back in it."""
    p, q, rows, cols = 5, 4, 40, 24
    args = make_args(rows, cols, p, q, dtype=torch.float32, seed=7)
    x = args[0].detach().T.contiguous().T.requires_grad_()
    a, c = (t.detach()[:, :1].clone() if shared else t.detach().clone() for t in args[4:])
    a, c = a.requires_grad_(), c.requires_grad_()
    inputs = (x, *args[1:4], a, c)
    out = rational_gate(*inputs, backend="compiled")
    ref = reference_gate(x, *args[1:4], a.expand(p + 1, cols), c.expand(q, cols))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(cols, rows).T if grad_layout == "features" else torch.randn(rows, cols)
    grads = torch.autograd.grad(out, inputs, g)
    assert grads[0].stride(0) == 1
    for got, want in zip(grads, torch.autograd.grad(ref, inputs, g), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,layout", [("eager", "rows"), ("compiled", "rows"), ("compiled", "blocked rows"),
                                            ("compiled", "features"), ("cpu_kernel", "rows")])
def test_positive_support_is_the_gate_zeroed_where_x_is_not_positive(backend, layout):
    """positive_support=True equals torch.where(x > 0, gate(x), 0) in value and in every gradient, exact zeros
    included (x = 0 exactly is outside), on every backend and the layouts each takes."""
    if backend == "cpu_kernel" and rational.rational_cpu.library() is None:
        pytest.skip("no C++ compiler")
    p, q, cols = 3, 2, 24
    rows = 256 if layout == "blocked rows" else 40
    args = make_args(rows, cols, p, q, dtype=torch.float32, seed=11)
    x = args[0].detach()
    x[::5, ::3] = 0.0
    if layout == "features":
        x = x.T.contiguous().T
    inputs = (x.requires_grad_(), *args[1:])
    out = rational_gate(*inputs, positive_support=True, backend=backend)
    want = torch.where(x > 0, rational_gate(*inputs, backend="eager"), 0.0)
    assert (out[x <= 0] == 0).all()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    g = torch.randn(rows, cols)
    got_grads, want_grads = torch.autograd.grad(out, inputs, g), torch.autograd.grad(want, inputs, g)
    assert (got_grads[0][x <= 0] == 0).all()
    for got, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def fast_and_reference(args, backend):
    """(out, ref, fast path grads, reference grads) for one random output gradient."""
    out = rational_gate(*args, backend=backend)
    ref = reference_gate(*args)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, g)
    grads_ref = torch.autograd.grad(ref, args, g, allow_unused=True, materialize_grads=True)
    return out, ref, grads, grads_ref


def test_eager_fast_matches_reference_fp64():
    for p, q in DEGREES:
        out, ref, grads, grads_ref = fast_and_reference(make_args(7, 9, p, q, seed=p), backend="eager")
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, grads_ref, strict=False):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ pole-freeness, tails
extreme_raw = st.one_of(st.floats(-1e4, 1e4), st.sampled_from([-1e30, 1e30, 0.0, -50.0, 50.0]))


@settings(max_examples=40, deadline=None)
@given(
    q=st.integers(0, 12),
    p=st.integers(1, 12),
    raw=st.lists(extreme_raw, min_size=12, max_size=12),
    num=st.lists(st.floats(-1e3, 1e3), min_size=13, max_size=13),
)
def test_pole_free_for_any_parameters(p, q, raw, num):
    c = F.softplus(torch.tensor(raw[:q], dtype=torch.float32)).unsqueeze(1)
    a = torch.tensor(num[: p + 1], dtype=torch.float32).unsqueeze(1)
    grid = torch.linspace(-1, 1, 401)
    assert (denominator_q(grid, c) >= 1.0).all()
    t = torch.cat([grid, torch.tensor([-1e6, -1e3, -10.0, 10.0, 1e3, 1e6])])
    m = t.shape[0]
    one, zero = torch.ones(m), torch.zeros(m)
    a_cols, c_cols = a.expand(p + 1, m), c.expand(q, m)
    out = rational_gate(t[None], zero, one, one, a_cols, c_cols, backend="eager")
    assert torch.isfinite(out).all()
    assert torch.isfinite(rational_reference(t[None], a_cols, c_cols)).all()
    # gradients stay finite too
    tt = t[None].clone().requires_grad_()
    aa = a_cols.clone().requires_grad_()
    cc = c_cols.clone().requires_grad_()
    rational_gate(tt, zero, one, one, aa, cc, backend="eager").sum().backward()
    assert all(torch.isfinite(g).all() for g in (tt.grad, aa.grad, cc.grad))


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_tails(backend):
    p, q = 5, 4
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(p + 1, 1, generator=gen, dtype=torch.float64)
    c = torch.rand(q, 1, generator=gen, dtype=torch.float64)
    t = torch.tensor([-1e6, -1e3, -10.0, 10.0, 1e3, 1e6], dtype=torch.float64)
    m = t.shape[0]
    out = rational_gate(t[None], torch.zeros(m, dtype=torch.float64), torch.ones(m, dtype=torch.float64),
                        torch.ones(m, dtype=torch.float64), a.expand(p + 1, m), c.expand(q, m), backend=backend)[0]
    assert torch.isfinite(out).all()
    for s in (-1.0, 1.0):
        end = torch.tensor([s], dtype=torch.float64, requires_grad=True)
        big_p = sum(a[i] * end**i for i in range(p + 1))
        value = big_p / denominator_q(end, c)
        (slope,) = torch.autograd.grad(value.sum(), end)
        side = t * s > 0
        # Above 1 the tangent line at 1; below -1 the constant R(-1), flat like every gate's lower tail.
        expected = value.detach() + (slope * (t[side] - s) if s > 0 else 0.0)
        torch.testing.assert_close(out[side], expected.expand_as(out[side]), rtol=1e-12, atol=1e-9)
    # no explosion: at most linear growth
    assert out.abs().max() < 1e6 * 1e3


# ------------------------------------------------------------------ gradients reach zero coefficients
def test_gradients_reach_zero_coefficients():
    m = 8
    # asymmetric inputs and weights so that no odd/even symmetry cancels a gradient
    x = torch.linspace(-3, 4.5, m, dtype=torch.float64)[None].requires_grad_()
    weight = torch.linspace(1, 2, m, dtype=torch.float64)
    shift = torch.zeros(m, dtype=torch.float64, requires_grad=True)
    scale_in = torch.ones(m, dtype=torch.float64, requires_grad=True)
    scale_out = torch.ones(m, dtype=torch.float64, requires_grad=True)
    a = torch.zeros(4, 1, dtype=torch.float64, requires_grad=True)
    raw = torch.zeros(3, 1, dtype=torch.float64, requires_grad=True)
    for backend in ("eager", "compiled"):
        for t in (x, shift, scale_in, scale_out, a, raw):
            t.grad = None
        out = rational_gate(x, shift, scale_in, scale_out, a.expand(4, m), F.softplus(raw).expand(3, m),
                            backend=backend)
        (out * weight).sum().backward()
        # all-zero numerator: output 0 and grad_x = 0 (slope 0) is correct; every coefficient moves
        assert (a.grad != 0).all() and torch.isfinite(a.grad).all()
        assert scale_out.grad is not None
    # with P = 0 the denominator/x/shift/scale_in grads are exactly 0 by the math; give P a slope
    for t in (x, shift, scale_in, scale_out):
        t.grad = None
    a2 = torch.tensor([[0.1], [1.0], [0.0], [0.0]], dtype=torch.float64, requires_grad=True)
    raw2 = torch.zeros(3, 1, dtype=torch.float64, requires_grad=True)
    out = rational_gate(x, shift, scale_in, scale_out, a2.expand(4, m), F.softplus(raw2).expand(3, m),
                        backend="eager")
    (out * weight).sum().backward()
    for t in (x, shift, scale_in, scale_out, a2, raw2):
        assert t.grad is not None and (t.grad != 0).any(), t
    assert (a2.grad != 0).all() and (raw2.grad != 0).all()


# ------------------------------------------------------------------ fast backends vs reference
@pytest.mark.parametrize("backend", ["compiled", "cpu_kernel"])
@pytest.mark.parametrize("degree", DEGREES)
def test_fast_backends_match_reference_fp32(degree, backend):
    p, q = degree
    out, ref, grads, grads_ref = fast_and_reference(make_args(16, 24, p, q, dtype=torch.float32, seed=p + q),
                                                    backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, grads_ref, strict=False):
        # column sums over 16 rows of O(1) terms: compare relative to the gradient's scale
        scale = want.abs().max().item() if want.numel() else 1.0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(1.0, scale))


def test_compiled_batch_size_change_does_not_recompile():
    from torch._dynamo.utils import counters

    p, q = 3, 3  # q != 2: the smallest blocked batches have 2 blocks, and dynamo would tie that size to q
    # One graph per layout: row blocks (even batches) and plain rows (odd ones); sizes are symbolic.
    for m in (16, 5):
        rational_gate(*make_args(m, 24, p, q, dtype=torch.float32), backend="compiled").sum().backward()
    before = counters["stats"]["unique_graphs"]
    for m in (48, 512, 33, 7):
        args = make_args(m, 24, p, q, dtype=torch.float32)
        rational_gate(*args, backend="compiled").sum().backward()
    assert counters["stats"]["unique_graphs"] == before


# ------------------------------------------------------------------ dtype policy
@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, "compiled"), (torch.bfloat16, "cpu_kernel"),
                                           (torch.float16, "eager")])
def test_low_precision_input_computed_in_fp32(dtype, backend):
    p, q = 3, 2
    args32 = make_args(8, 12, p, q, dtype=torch.float32)
    x_low = args32[0].detach().to(dtype).requires_grad_()
    params = [t.detach().requires_grad_() for t in args32[1:]]
    out = rational_gate(x_low, *params, backend=backend)
    assert out.dtype == dtype
    x_up = x_low.detach().float().requires_grad_()
    params_up = [t.detach().requires_grad_() for t in params]
    ref = reference_gate(x_up, *params_up)
    # fp32 result rounded once to the low dtype: within half an ulp of the low dtype
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)
    out.float().sum().backward()
    ref.sum().backward()
    assert x_low.grad.dtype == dtype
    torch.testing.assert_close(x_low.grad, x_up.grad.to(dtype), rtol=0, atol=0)
    for got, want in zip(params, params_up, strict=False):
        assert got.grad.dtype == torch.float32
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "cpu_kernel"])
def test_autocast_keeps_fp32_math(backend):
    p, q = 3, 2
    args = make_args(8, 12, p, q, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rational_gate(*args, backend=backend)
        ref_inside = reference_gate(*args)
    ref = reference_gate(*args)
    assert out.dtype == torch.float32 and ref_inside.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref_inside, ref, rtol=0, atol=0)


# ------------------------------------------------------------------ memory
def saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # count each storage once: parameters and x are shared, not copies
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("backend", ["eager", "cpu_kernel"])
def test_fast_path_saves_only_the_input(backend):
    p, q = 5, 4
    m, f = 64, 32
    x = torch.randn(m, f, requires_grad=True)
    small = [torch.zeros(f, requires_grad=True), torch.ones(f, requires_grad=True), torch.ones(f, requires_grad=True)]
    a = torch.randn(p + 1, 1, requires_grad=True)
    c = torch.rand(q, 1, requires_grad=True)
    x_bytes = x.numel() * 4
    fast = saved_bytes(lambda: rational_gate(x, *small, a.expand(p + 1, f), c.expand(q, f), backend=backend))
    ref = saved_bytes(lambda: reference_gate(x, *small, a.expand(p + 1, f), c.expand(q, f)))
    params = sum(t.numel() * 4 for t in (*small, a, c))
    assert fast <= x_bytes + params
    assert ref > 10 * x_bytes  # eager autograd keeps ~20x


# ------------------------------------------------------------------ configuration, fallback, errors
def test_env_var_disables_compile(monkeypatch):
    monkeypatch.setenv("RSAE_COMPILE", "0")
    assert not compile_enabled()
    monkeypatch.setenv("RSAE_COMPILE", "1")
    assert compile_enabled()


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("simulated inductor failure")

    monkeypatch.setattr(rational, "_COMPILE_FAILED", False)
    monkeypatch.setattr(rational, "_variant", lambda args: ("broken",))
    monkeypatch.setitem(rational._COMPILED, ("fwd", 2, 1, False, ("broken",)), broken)
    monkeypatch.setitem(rational._COMPILED, ("bwd", 2, 1, False, ("broken",)), broken)
    args = make_args(4, 3, 2, 1, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="falling back to eager"):
        out = rational_gate(*args, backend="compiled")
    torch.testing.assert_close(out, reference_gate(*args), rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = rational_gate(*args, backend="compiled")
        out.sum().backward()


def test_shape_errors():
    args = make_args(4, 3, 2, 1)
    x, shift, scale_in, scale_out, a, c = args
    with pytest.raises(ValueError, match="shift"):
        rational_gate(x, shift[:2], scale_in, scale_out, a, c)
    with pytest.raises(ValueError, match="numerator"):
        rational_gate(x, shift, scale_in, scale_out, a[:1], c)
    with pytest.raises(ValueError, match="denominator"):
        rational_gate(x, shift, scale_in, scale_out, a, c[:, :2])
    with pytest.raises(ValueError, match="2-D"):
        rational_gate(x[0], shift, scale_in, scale_out, a, c)
