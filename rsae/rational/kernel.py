"""Pole-free rational gate math: a readable reference and a fused, low-memory fast path.

The function
------------
Per latent (column) f, with ``u = (x - s_f) / C_in_f``::

    phi(x) = C_out_f * r(u),   r = P / Q on [-1, 1],
    P(t) = sum_{i=0..p} a_i t^i,   Q(t) = 1 + sum_{j=1..q} c_j |t|^j,   c_j >= 0.

Because every ``c_j >= 0`` and ``|t|^j >= 0``, ``Q >= 1`` for every parameter value: the gate has no
poles, whatever the optimiser does. Callers pass the *effective* ``c_j`` (the module keeps a raw
softplus parameter; see :mod:`rsae.rational.gate`). ``q = 0`` (a polynomial) is allowed.

Tails (shaped like a gate)
--------------------------
A rational fitted on [-1, 1] extrapolates wildly outside it, and a degree-12 polynomial tail grows
like ``|t|^12`` (1e72 at ``t = 1e6``: overflow in fp32). Every SAE gate is flat below its threshold
and grows like the identity above it, so the tails follow that shape. With ``tc = clamp(u, -1, 1)``
and ``R = P/Q``::

    r(u) = R(tc) + R'(1) * max(u - 1, 0)

Inside [-1, 1] this is exactly ``R``. Above 1 it is the tangent line at 1 (value and slope match);
below -1 it is the constant ``R(-1)``: a linear continuation there would turn the fit's ripple
slope at -1 into outputs growing with ``|u|`` where every gate is 0. It is finite and at most
linear in ``u`` for any finite input; ``dr/du`` is ``R'(tc)`` for ``u >= -1`` and 0 below. The
gradient with respect to the coefficients includes the tail's dependence on them.

Numerics
--------
The math always runs in fp32 (fp64 if any input is fp64), also for bf16/fp16 inputs and under
``torch.autocast``: bf16 arithmetic in the Horner loops costs ~1e-2 absolute error, more than the
fit itself, while upcasting inside a fused kernel costs nothing measurable. Outputs are cast back
to the input's dtype, gradients to each argument's dtype. ``R'`` is evaluated as
``(P' - R Q') / Q`` rather than ``(P'Q - P Q') / Q^2`` so that huge ``c_j`` (up to ~1e30) cannot
overflow ``Q^2``.

Fast path
---------
:func:`rational_gate` is a custom :class:`torch.autograd.Function` that saves only its input and the
small parameters and recomputes everything in backward, with explicit (analytic) gradient formulas.
Eager autograd of the same expression saves ~20x the input for backward. Three backends run it:

- ``cpu_kernel`` (CPU, fp32/bf16, row-major; the default there): hand-written C++ in
  :mod:`rsae.rational.cpu`, one pass over memory forward and one backward, every sum accumulated while
  grad_x is written (its time and memory against relu: ``benchmarks/bench_gate.py``, results in
  ``benchmarks/results/bench_gate.md``).
- ``compiled`` (everything else: GPU, fp16, fp64, feature-major input): the forward and backward bodies
  below, plain functions whose Horner loops unroll in Python over the degree, compiled with
  ``torch.compile`` (inductor: triton on GPU, vectorised C++/OpenMP on CPU) into fused kernels instead
  of ~40 eager ones. Set ``RSAE_COMPILE=0`` to run them eagerly; if compilation fails they fall back to
  eager with a one-time warning.
- ``eager``: the same bodies uncompiled (still low memory; the fp64 gradcheck reference).

In the compiled backward every sum (the per-column gradients of shift, scale_in and scale_out, and the
coefficient gradients) is taken per column and per block of B rows: it sees x and grad as [M / B, B, F]
row blocks (``B = 128`` for fp32, 256 for bf16/fp16; env var ``RSAE_ROW_BLOCK``, 1 disables it) and
returns [M / B, F] fp32 partial sums that aten sums afterwards (over columns too when the coefficients
are shared), so that all of them share one loop. grad_x still has a loop of its own on row-major input:
inductor does not fuse a pointwise store into a reduction down the rows, which is what the CPU kernel
is for (see benchmarks/results/bench_gate.md). Feature-major input ([F, M] in memory) runs unblocked in
one loop.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from rsae.rational import cpu as rational_cpu

__all__ = [
    "Backend",
    "rational_reference",
    "rational_gate",
    "compile_enabled",
    "compute_dtype",
]

Backend = Literal["auto", "cpu_kernel", "compiled", "eager"]


# --------------------------------------------------------------------------------------------------
# Helpers shared by every path
# --------------------------------------------------------------------------------------------------


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the gate computes in: fp64 if any argument is fp64, else fp32 (never bf16/fp16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def compile_enabled() -> bool:
    """Whether the fast path uses ``torch.compile`` (env var ``RSAE_COMPILE``; default on)."""
    return os.environ.get("RSAE_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def _check_shapes(x: Tensor, shift: Tensor, scale_in: Tensor, scale_out: Tensor, numerator: Tensor,
                  denominator: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, F], got shape {tuple(x.shape)}")
    n_cols = x.shape[1]
    for name, t in (("shift", shift), ("scale_in", scale_in), ("scale_out", scale_out)):
        if t.shape != (n_cols,):
            raise ValueError(f"{name} must have shape ({n_cols},) to match x's last dim, got {tuple(t.shape)}")
    if numerator.dim() != 2 or numerator.shape[1] not in (1, n_cols) or numerator.shape[0] < 2:
        raise ValueError(
            f"numerator must have shape [p+1, {n_cols}] or [p+1, 1] (shared) with p >= 1, got {tuple(numerator.shape)}"
        )
    if denominator.dim() != 2 or denominator.shape[1] != numerator.shape[1]:
        raise ValueError(
            f"denominator must have shape [q, {numerator.shape[1]}] like the numerator (q may be 0), "
            f"got {tuple(denominator.shape)}"
        )


# --------------------------------------------------------------------------------------------------
# Reference path: plain eager torch, differentiated by autograd
# --------------------------------------------------------------------------------------------------


def rational_reference(u: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """``r(u)`` with gate-shaped tails, in plain eager torch (the readable reference; autograd-able).

    Args:
        u: [M, F], already affine-mapped (``(x - shift) / scale_in``).
        numerator: [p+1, F], ``a_0 .. a_p``.
        denominator: [q, F], the EFFECTIVE ``c_1 .. c_q`` (>= 0, not raw). q may be 0.

    Returns r(u) in u's dtype (computed in fp32, or fp64 if any input is fp64). Autograd saves ~20x
    the input for backward; use :func:`rational_gate` for training.
    """
    cd = compute_dtype(u, numerator, denominator)
    with torch.autocast(device_type=u.device.type, enabled=False):
        t = u.to(cd)
        a = numerator.to(cd)
        c = denominator.to(cd)
        tc = t.clamp(-1.0, 1.0)
        y = tc.abs()
        big_p = sum(a[i] * tc**i for i in range(a.shape[0]))
        d_p = sum(i * a[i] * tc ** (i - 1) for i in range(1, a.shape[0]))
        big_q = 1.0 + sum((c[j - 1] * y**j for j in range(1, c.shape[0] + 1)), torch.zeros_like(y))
        d_q = torch.sign(tc) * sum((j * c[j - 1] * y ** (j - 1) for j in range(1, c.shape[0] + 1)),
                                   torch.zeros_like(y))
        value = big_p / big_q
        slope = (d_p - value * d_q) / big_q
        r = value + slope * (t - tc).clamp_min(0.0)
    return r.to(u.dtype)


# --------------------------------------------------------------------------------------------------
# Compiled and eager backends: per-element math as plain functions, wrapped in a Function
# --------------------------------------------------------------------------------------------------


def _horner(coefs: Tensor, t: Tensor, n: int, derivative: bool) -> tuple[Tensor, Tensor | None]:
    """``sum_{i=0..n} coefs[i] t^i`` and (optionally) its t-derivative, unrolled over the static n >= 1."""
    val = coefs[n] * t + coefs[n - 1]
    der = coefs[n].expand_as(t) if derivative else None
    for i in range(n - 2, -1, -1):
        if der is not None:
            der = der * t + val
        val = val * t + coefs[i]
    return val, der


def _denominator_poly(coefs: Tensor, y: Tensor, q: int, derivative: bool) -> tuple[Tensor, Tensor | None]:
    """``B(y) = sum_{j=1..q} c_j y^j`` (Q = 1 + B(|t|)) and optionally dB/dy, by Horner (zero constant)."""
    val = coefs[q - 1].expand_as(y)
    der = None
    for j in range(q - 2, -1, -1):
        if derivative:
            der = val if der is None else der * y + val
        val = val * y + coefs[j]
    if derivative:
        der = val if der is None else der * y + val
    return val * y, der


def _endpoint(numerator: Tensor, denominator: Tensor, s: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-column ``R(s), R'(s)`` at ``s = +-1`` and the partials of the slope ``R'(s)`` w.r.t. a and c.

    Outside [-1, 1] the gate is ``R(s) + R'(s) (u - s)``, so the tail's dependence on the coefficients
    is through these [F]-sized constants only. Computing them (and their partials) once per column
    instead of per element removes the derivative Horner loops from the forward pass and turns the
    tail parts of the coefficient gradients into two column sums (see ``rational_backward``).
    Explicit formulas, with Q(s) = 1 + sum c_j, Q'(s) = s sum j c_j:
        dR'/da_i = (i s^(i-1) - s^i Q'/Q) / Q,    dR'/dc_j = (R Q'/Q - j s R - R') / Q.
    """
    p, q = numerator.shape[0] - 1, denominator.shape[0]
    dev, dt = numerator.device, numerator.dtype
    i = torch.arange(p + 1, device=dev, dtype=dt)
    s_pow = torch.tensor([float(s**k) for k in range(p + 1)], device=dev, dtype=dt)
    s_pow_m1 = torch.tensor([0.0] + [float(s ** (k - 1)) for k in range(1, p + 1)], device=dev, dtype=dt)
    big_p = (s_pow[:, None] * numerator).sum(0)
    d_p = ((i * s_pow_m1)[:, None] * numerator).sum(0)
    if q > 0:
        j = torch.arange(1, q + 1, device=dev, dtype=dt)
        big_q = 1.0 + denominator.sum(0)
        d_q = s * (j[:, None] * denominator).sum(0)
    else:
        j = torch.zeros(0, device=dev, dtype=dt)
        big_q = torch.ones_like(big_p)
        d_q = torch.zeros_like(big_p)
    inv_q = 1.0 / big_q
    value = big_p * inv_q
    slope = (d_p - value * d_q) * inv_q
    dslope_da = ((i * s_pow_m1)[:, None] - s_pow[:, None] * (d_q * inv_q)) * inv_q
    dslope_dc = (value * d_q * inv_q - s * j[:, None] * value - slope) * inv_q
    return value, slope, dslope_da, dslope_dc


def _forward_body(p: int, q: int, positive_support: bool) -> Callable[..., Tensor]:
    def rational_forward(x: Tensor, shift: Tensor, inv_scale_in: Tensor, scale_out: Tensor, numerator: Tensor,
                         denominator: Tensor, slope_pos: Tensor) -> Tensor:
        # Parameters arrive already in the compute dtype (see _RationalGateFunction); only x may be narrower.
        cd = inv_scale_in.dtype
        u = (x.to(cd) - shift) * inv_scale_in
        tc = u.clamp(-1.0, 1.0)
        d = u - tc
        value, _ = _horner(numerator, tc, p, False)
        if q > 0:
            big_b, _ = _denominator_poly(denominator, tc.abs(), q, False)
            value = value / (1.0 + big_b)
        # The upper tail's slope is a per-column constant; the lower tail is flat (d < 0 drops out).
        r = value + d.clamp_min(0.0) * slope_pos
        out = scale_out * r
        if positive_support:
            out = torch.where(x > 0, out, 0.0)
        return out.to(x.dtype)

    return rational_forward


def _backward_body(p: int, q: int, positive_support: bool, blocked: bool = False) -> Callable[..., tuple[Tensor, ...]]:
    # blocked: x and grad arrive as [M / B, B, F] views (B a block of rows) and every sum is taken over
    # each block only (dim 1), giving [M / B, F] partials that the caller sums with aten (see module doc).
    def column_sum(t: Tensor) -> Tensor:
        return t.sum(1) if blocked else t.sum(0)

    def rational_backward(grad: Tensor, x: Tensor, shift: Tensor, inv_scale_in: Tensor, scale_out: Tensor,
                          numerator: Tensor, denominator: Tensor) -> tuple[Tensor, ...]:
        cd = inv_scale_in.dtype
        if positive_support:
            grad = torch.where(x > 0, grad, 0.0)
        u = (x.to(cd) - shift) * inv_scale_in
        tc = u.clamp(-1.0, 1.0)
        d = u - tc  # 0 inside [-1, 1]
        y = tc.abs()
        sgn = torch.sign(tc)
        big_p, d_p = _horner(numerator, tc, p, True)
        w = grad.to(cd) * scale_out
        if q > 0:
            big_b, d_b = _denominator_poly(denominator, y, q, True)
            inv_q = 1.0 / (1.0 + big_b)
            value = big_p * inv_q
            # R' = (P' - R Q') / Q: never forms Q^2, so c_j up to ~1e30 cannot overflow.
            slope = (d_p - value * d_b * sgn) * inv_q
            w_q = w * inv_q
        else:
            value, slope, w_q = big_p, d_p, w
        slope = slope * (u >= -1.0)  # the lower tail is flat
        grad_x = w * slope * inv_scale_in
        sum_grad_x = column_sum(grad_x)
        sum_grad_x_u = column_sum(grad_x * u)
        sum_g_r = column_sum(grad.to(cd) * (value + slope * d))

        # Value part R(tc) = P/Q: dR/da_i = tc^i / Q, dR/dc_j = -R y^j / Q. Powers of y are shared by
        # both, with tc^i = sgn * y^i for odd i. The slope part only lives in the tails (|tc| = 1),
        # where it is (per column) w d dR'(+-1)/dcoef: two sums suffice, combined outside.
        w_q_sgn = w_q * sgn
        sums_a = [column_sum(w_q), column_sum(w_q * tc)]
        sums_c = []
        w_qr = -w_q * value
        power = y
        for k in range(1, max(p, q) + 1):
            if k > 1:
                power = power * y
                if k <= p:
                    sums_a.append(column_sum((w_q_sgn if k % 2 else w_q) * power))
            if k <= q:
                sums_c.append(column_sum(w_qr * power))
        tail_pos = column_sum(w * d.clamp_min(0.0))
        return (
            grad_x.to(x.dtype),
            sum_grad_x,
            sum_grad_x_u,
            sum_g_r,
            torch.stack(sums_a),
            torch.stack(sums_c) if q > 0 else tail_pos.new_zeros((0, *tail_pos.shape)),
            tail_pos,
        )

    return rational_backward


def _fresh_code(fn: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    """A copy of ``fn`` with its own code object.

    Dynamo keys its compiled-graph cache (and its recompile limit, 8 by default) on the code
    object; closures over different degrees would otherwise share one cache and, after a handful of
    degree/dtype/layout combinations, silently fall back to eager.
    """
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{suffix}")
    new = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    new.__qualname__ = code.co_name
    return new


# Inductor's default heuristics materialise shared per-element subexpressions (powers, 1/Q, ...)
# as full [M, F] buffers once many reductions read them: ~7x the input in temporaries and an extra
# pass over memory. Raising the realisation thresholds lets each reduction loop recompute them in
# registers instead (CSE dedupes within the loop), leaving grad_x as the only [M, F] buffer; the
# horizontal-fusion limit is raised so all column sums share one loop. Scoped to these functions.
_INDUCTOR_OPTIONS: dict[str, Any] = {
    "realize_reads_threshold": 1_000_000,
    "realize_opcount_threshold": 1_000_000,
    "realize_cpu_opcount_threshold": 1_000_000,
    "realize_acc_reads_threshold": 1_000_000,
    "realize_cpu_acc_reads_threshold": 1_000_000,
    "cpp.max_horizontal_fusion_size": 64,
    "max_fusion_size": 256,
}

_EAGER: dict[tuple[Any, ...], Callable[..., Any]] = {}
_COMPILED: dict[tuple[Any, ...], Callable[..., Any]] = {}
_COMPILE_FAILED = False


def _body(kind: str, p: int, q: int, positive_support: bool, compiled: bool,
          variant: tuple[Any, ...] = ()) -> Callable[..., Any]:
    key = (kind, p, q, positive_support, variant)
    if key not in _EAGER:
        if kind == "fwd":
            body = _forward_body(p, q, positive_support)
        else:
            body = _backward_body(p, q, positive_support, kind == "bwd_blocked")
        _EAGER[key] = _fresh_code(body, f"p{p}_q{q}_v{len(_EAGER)}")
    if not compiled:
        return _EAGER[key]
    if key not in _COMPILED:
        # dynamic=True: batch size (and width) changes must not recompile.
        _COMPILED[key] = torch.compile(_EAGER[key], dynamic=True, fullgraph=True, options=_INDUCTOR_OPTIONS)
    return _COMPILED[key]


def _variant(args: tuple[Tensor, ...]) -> tuple[Any, ...]:
    """What makes dynamo specialise a graph: dtypes and size-1 dims (shared coefficients, the TopK
    path's single row). Each variant gets its own code object, so a process that meets many of
    them (the test suite, mixed precision) never hits dynamo's per-code recompile limit."""
    return tuple((t.dtype, tuple(size == 1 for size in t.shape)) for t in args)


ROW_BLOCK = int(os.environ.get("RSAE_ROW_BLOCK", "128"))


def _row_block(n_rows: int, element_size: int = 4) -> int:
    """Rows per block for the blocked backward: the largest power of two <= ROW_BLOCK dividing n_rows
    (1, i.e. unblocked, for odd n_rows or tiny inputs). The p + q + 5 fp32 [M / B, F] partials cost
    4 (p + q + 5) / B bytes per element; for 2-byte inputs B is doubled so they stay the same fraction of
    relu's peak either way."""
    block = ROW_BLOCK * max(1, 4 // element_size) if ROW_BLOCK > 1 else 1
    while block > 1 and (n_rows % block or n_rows < 2 * block):
        block //= 2
    return block


def _run(kind: str, p: int, q: int, positive_support: bool, compiled: bool, *args: Tensor) -> Any:
    global _COMPILE_FAILED
    if compiled and not _COMPILE_FAILED:
        try:
            return _body(kind, p, q, positive_support, True, _variant(args))(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure must degrade, not crash training
            _COMPILE_FAILED = True
            warnings.warn(
                f"rsae: torch.compile of the rational gate failed ({type(exc).__name__}: {exc}); "
                "falling back to eager for the rest of this process (set RSAE_COMPILE=0 to silence).",
                RuntimeWarning,
                stacklevel=3,
            )
    return _body(kind, p, q, positive_support, False)(*args)


def _compact(coefs: Tensor, cd: torch.dtype) -> Tensor:
    """Coefficients as a fresh contiguous tensor: [k, 1] when shared across columns (stride 0), else [k, F].

    Handing views (e.g. ``expand`` of a [k, 1] tensor) to the compiled bodies makes dynamo trace the
    view's base and specialise the column count, so every new width (and, on the TopK path, every
    new batch size N*k) would recompile. The [k, 1] form also lets the kernel broadcast a scalar per
    coefficient instead of loading a stride-0 row.
    """
    if coefs.shape[1] > 1 and coefs.stride(1) == 0:
        coefs = coefs[:, :1]
    return coefs.to(dtype=cd, memory_format=torch.contiguous_format, copy=True)


class _RationalGateFunction(torch.autograd.Function):
    """Saves only x and the small parameters; backward recomputes with explicit formulas."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shift: Tensor, scale_in: Tensor, scale_out: Tensor, numerator: Tensor,
                denominator: Tensor, positive_support: bool, backend: Backend) -> Tensor:
        p, q = numerator.shape[0] - 1, denominator.shape[0]
        ctx.positive_support = positive_support
        ctx.save_for_backward(x, shift, scale_in, scale_out, numerator, denominator)
        with torch.autocast(device_type=x.device.type, enabled=False):
            cd = compute_dtype(x, shift, scale_in, scale_out, numerator, denominator)
            ctx.degree, ctx.backend = (p, q), _resolve_backend(backend, x, cd, (p, q))
            a, c = _compact(numerator, cd), _compact(denominator, cd)
            _, slope_pos, _, _ = _endpoint(a, c, 1)
            args = (x, shift.to(cd), 1.0 / scale_in.to(cd), scale_out.to(cd), a, c, slope_pos)
            if ctx.backend == "cpu_kernel":
                return rational_cpu.forward(*args, positive_support)
            return _run("fwd", p, q, positive_support, ctx.backend == "compiled", *args)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, shift, scale_in, scale_out, numerator, denominator = ctx.saved_tensors
        p, q = ctx.degree
        positive_support = ctx.positive_support
        with torch.autocast(device_type=x.device.type, enabled=False):
            cd = compute_dtype(x, shift, scale_in, scale_out, numerator, denominator)
            a, c = _compact(numerator, cd), _compact(denominator, cd)
            inv_scale_in = 1.0 / scale_in.to(cd)
            compiled = ctx.backend == "compiled"
            # Feature-major x ([F, M] in memory): the column sums run along contiguous memory, and inductor
            # fuses them and grad_x into one loop without any blocking.
            feature_major = x.shape[0] > 1 and x.stride(0) == 1
            if feature_major and grad.stride(0) != 1:
                # Gradients summed from several consumers may come back row-major; one copy into x's layout
                # costs far less than a kernel that reads one of them across the grain.
                grad = grad.T.contiguous().T
            block = _row_block(x.shape[0], x.element_size()) if compiled and not feature_major else 1
            params = (shift.to(cd), inv_scale_in, scale_out.to(cd), a, c)
            if ctx.backend == "cpu_kernel":
                grad_x, sum_gx, sum_gxu, sum_gr, sums_a, sums_c, tail_pos = rational_cpu.backward(
                    grad, x, *params, positive_support, per_column_sums=numerator.shape[1] > 1)
            elif block > 1:
                n_rows, n_cols = x.shape
                blocked = (n_rows // block, block, n_cols)
                grad_x, *sums = _run("bwd_blocked", p, q, positive_support, compiled, grad.contiguous().view(blocked),
                                     x.contiguous().view(blocked), *params)
                grad_x = grad_x.view(n_rows, n_cols)
                # [.., M / B, F] partials: aten's sum over the blocks streams through rows.
                sum_gx, sum_gxu, sum_gr, sums_a, sums_c, tail_pos = (t.sum(-2) for t in sums)
            else:
                grad_x, sum_gx, sum_gxu, sum_gr, sums_a, sums_c, tail_pos = _run(
                    "bwd", p, q, positive_support, compiled, grad, x, *params)
            _, _, dpos_da, dpos_dc = _endpoint(a, c, 1)
            # Per-column [k, F] coefficient gradients; shared [k, 1] coefficients take their sum.
            grad_a = sums_a + tail_pos * dpos_da
            grad_c = sums_c + tail_pos * dpos_dc
            if numerator.shape[1] == 1:
                grad_a, grad_c = grad_a.sum(1, keepdim=True), grad_c.sum(1, keepdim=True)
            grads = (
                grad_x,
                (-sum_gx).to(shift.dtype),
                (-sum_gxu).to(scale_in.dtype),  # du/dC_in = -u / C_in
                sum_gr.to(scale_out.dtype),
                grad_a.to(numerator.dtype),
                grad_c.to(denominator.dtype),
            )
        needed = ctx.needs_input_grad
        return (*(gr if need else None for gr, need in zip(grads, needed[:6], strict=False)), None, None)


def _resolve_backend(backend: Backend, x: Tensor, cd: torch.dtype, degree: tuple[int, int]) -> Backend:
    if backend == "auto":
        if rational_cpu.applies(x, cd, degree):
            return "cpu_kernel"
        return "compiled" if compile_enabled() else "eager"
    if backend == "cpu_kernel" and not rational_cpu.applies(x, cd, degree):
        raise ValueError(
            f"backend='cpu_kernel' needs a 2-D CPU fp32/bf16 input with unit column stride, fp32 parameters, "
            f"p + q + 2 <= {rational_cpu.MAX_COEFFICIENTS} and a built kernel (got {x.dtype} on {x.device}, strides "
            f"{x.stride()}, compute dtype {cd}, degree {degree}); use 'auto'."
        )
    if backend not in ("cpu_kernel", "compiled", "eager"):
        raise ValueError(f"unknown backend {backend!r}; expected one of auto, cpu_kernel, compiled, eager")
    return backend


def rational_gate(x: Tensor, shift: Tensor, scale_in: Tensor, scale_out: Tensor, numerator: Tensor,
                  denominator: Tensor, *, positive_support: bool = False, backend: Backend = "auto") -> Tensor:
    """``C_out * r((x - shift) / C_in)`` per column, fused and low-memory (see module docstring).

    Args:
        x: [M, F] input (any float dtype; computed in fp32/fp64, returned in x's dtype).
        shift, scale_in, scale_out: [F] per-column parameters (scale_in assumed > 0).
        numerator: [p+1, F] coefficients ``a_0..a_p`` (p >= 1).
        denominator: [q, F] EFFECTIVE coefficients ``c_1..c_q`` (>= 0; q may be 0).
            Coefficient tensors may be ``expand``-ed views of shared [p+1, 1] / [q, 1] coefficients:
            backward returns full [p+1, F] / [q, F] gradients and autograd sums them back.
        positive_support: zero where ``x <= 0``, in the output and in every gradient: the masked ReLU RSAE's
            support rule, ``torch.where(x > 0, rational_gate(x, ...), 0)``, applied inside the gate's own pass
            (on its own, the ``where`` costs two more passes over [M, F] memory each way).
        backend: "cpu_kernel" (the C++ kernel, :mod:`rsae.rational.cpu`), "compiled" (torch.compile'd
            bodies), "eager" (the same bodies, uncompiled), or "auto": the kernel where it applies (CPU,
            fp32/bf16), else compiled unless env var ``RSAE_COMPILE=0``, else eager.

    Per-element parameters (TopK's k selected values per token) are supported by calling this on
    x of shape [1, N*k] with gathered [N*k] parameters and [p+1, N*k] coefficients.
    """
    _check_shapes(x, shift, scale_in, scale_out, numerator, denominator)
    return _RationalGateFunction.apply(x, shift, scale_in, scale_out, numerator, denominator, positive_support, backend)
