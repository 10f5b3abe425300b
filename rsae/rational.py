"""Pole-free rational gate math: a readable reference and a fused, low-memory fast path.

The function
------------
Per latent (column) f, with ``u = (x - s_f) / C_in_f``::

    phi(x) = C_out_f * r(u),   r = P / Q on [-1, 1],
    P(t) = sum_{i=0..p} a_i t^i,   Q(t) = 1 + sum_{j=1..q} c_j |t|^j,   c_j >= 0.

Because every ``c_j >= 0`` and ``|t|^j >= 0``, ``Q >= 1`` for every parameter value: the gate has no
poles, whatever the optimiser does. Callers pass the *effective* ``c_j`` (the module keeps a raw
softplus parameter; see :mod:`rsae.gate`). ``q = 0`` (a polynomial) is allowed.

Tails (linear continuation)
---------------------------
A rational fitted on [-1, 1] extrapolates wildly outside it, and a degree-12 polynomial tail grows
like ``|t|^12`` (1e72 at ``t = 1e6``: overflow in fp32). So outside [-1, 1] the gate continues
linearly, matching value and slope at the end point. With ``tc = clamp(u, -1, 1)`` and ``R = P/Q``::

    r(u) = R(tc) + R'(tc) * (u - tc)

Inside [-1, 1] this is exactly ``R``; outside it is the tangent line at +-1, so it is finite and at
most linear in ``u`` for any finite input, and ``dr/du = R'(tc)`` everywhere (continuous at +-1).
The gradient with respect to the coefficients includes the slope term's dependence on them.

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
Eager autograd of the same expression saves ~20x the input for backward. The forward and backward
bodies are plain functions whose Horner loops unroll in Python over the degree; they are compiled
with ``torch.compile`` (inductor: vectorised C++/OpenMP on CPU, triton on GPU) so that each of
forward and backward is one fused pass over memory instead of ~40 eager kernels. Set the environment
variable ``RSAE_COMPILE=0`` to run the very same functions eagerly (still low memory, slower); if
compilation fails the functions fall back to eager with a one-time warning.
"""

from __future__ import annotations

import os
import types
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = [
    "rational_reference",
    "rational_gate",
    "compile_enabled",
    "compute_dtype",
]


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
    if numerator.dim() != 2 or numerator.shape[1] != n_cols or numerator.shape[0] < 2:
        raise ValueError(f"numerator must have shape [p+1, {n_cols}] with p >= 1, got {tuple(numerator.shape)}")
    if denominator.dim() != 2 or denominator.shape[1] != n_cols:
        raise ValueError(f"denominator must have shape [q, {n_cols}] (q may be 0), got {tuple(denominator.shape)}")


def _pq(tc: Tensor, numerator: Tensor, denominator: Tensor, p: int, q: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """P, P', Q, Q' at ``tc`` by Horner, unrolled over the (static) degrees.

    Q is evaluated in ``y = |tc|`` and its t-derivative picks up ``sign(tc)`` (0 at tc = 0, as
    torch's ``abs`` backward does, which keeps the reference and the fast path identical).
    """
    big_p = numerator[p]
    d_p = torch.zeros_like(tc)
    for i in range(p - 1, -1, -1):
        d_p = d_p * tc + big_p
        big_p = big_p * tc + numerator[i]
    if q == 0:
        return big_p, d_p, torch.ones_like(tc), torch.zeros_like(tc)
    y = tc.abs()
    # B(y) = sum_{j>=1} c_j y^j: Horner with a zero constant term.
    big_b = denominator[q - 1].expand_as(y)
    d_b = torch.zeros_like(y)
    for j in range(q - 2, -1, -1):
        d_b = d_b * y + big_b
        big_b = big_b * y + denominator[j]
    d_b = d_b * y + big_b
    big_b = big_b * y
    return big_p, d_p, 1.0 + big_b, d_b * torch.sign(tc)


# --------------------------------------------------------------------------------------------------
# Reference path: plain eager torch, differentiated by autograd
# --------------------------------------------------------------------------------------------------


def rational_reference(u: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """``r(u)`` with linear tails, in plain eager torch (the readable reference; autograd-able).

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
        r = value + slope * (t - tc)
    return r.to(u.dtype)


# --------------------------------------------------------------------------------------------------
# Fast path: per-element math as plain functions (compiled by inductor), wrapped in a Function
# --------------------------------------------------------------------------------------------------


def _forward_body(p: int, q: int) -> Callable[..., Tensor]:
    def rational_forward(x: Tensor, shift: Tensor, scale_in: Tensor, scale_out: Tensor, numerator: Tensor,
                         denominator: Tensor) -> Tensor:
        cd = compute_dtype(x, shift, scale_in, scale_out, numerator, denominator)
        u = (x.to(cd) - shift.to(cd)) / scale_in.to(cd)
        tc = u.clamp(-1.0, 1.0)
        big_p, d_p, big_q, d_q = _pq(tc, numerator.to(cd), denominator.to(cd), p, q)
        inv_q = 1.0 / big_q
        value = big_p * inv_q
        slope = (d_p - value * d_q) * inv_q
        return (scale_out.to(cd) * (value + slope * (u - tc))).to(x.dtype)

    return rational_forward


def _backward_body(p: int, q: int) -> Callable[..., tuple[Tensor, ...]]:
    def rational_backward(grad: Tensor, x: Tensor, shift: Tensor, scale_in: Tensor, scale_out: Tensor,
                          numerator: Tensor, denominator: Tensor) -> tuple[Tensor, ...]:
        cd = compute_dtype(x, shift, scale_in, scale_out, numerator, denominator)
        g = grad.to(cd)
        c_in = scale_in.to(cd)
        c_out = scale_out.to(cd)
        u = (x.to(cd) - shift.to(cd)) / c_in
        tc = u.clamp(-1.0, 1.0)
        d = u - tc  # 0 inside [-1, 1]: the tail terms below vanish there
        big_p, d_p, big_q, d_q = _pq(tc, numerator.to(cd), denominator.to(cd), p, q)
        inv_q = 1.0 / big_q
        value = big_p * inv_q
        slope = (d_p - value * d_q) * inv_q
        w = g * c_out

        grad_x = w * slope / c_in
        grad_shift = -grad_x.sum(0)
        grad_scale_in = -(grad_x * u).sum(0)
        grad_scale_out = (g * (value + slope * d)).sum(0)

        # dr/da_i = tc^i/Q + d (i tc^(i-1)/Q - tc^i Q'/Q^2) = alpha tc^i + i beta tc^(i-1), per unit w.
        alpha = w * inv_q * (1.0 - d * d_q * inv_q)
        beta = w * inv_q * d
        grads_a = [alpha.sum(0)]
        power = torch.ones_like(tc)  # tc^(i-1)
        for i in range(1, p + 1):
            term_low = power
            power = power * tc
            grads_a.append((alpha * power + i * beta * term_low).sum(0))

        # dr/dc_j = -P y^j/Q^2 + d(-P' y^j/Q^2 - P j y^(j-1) sgn/Q^2 + 2 P Q' y^j/Q^3)
        #         = gamma y^j + j delta y^(j-1), written with R = P/Q so nothing forms Q^2 or Q^3.
        grads_c = []
        if q > 0:
            y = tc.abs()
            gamma = -w * inv_q * (value + d * (slope - value * d_q * inv_q))
            delta = -w * inv_q * d * torch.sign(tc) * value
            power = torch.ones_like(y)  # y^(j-1)
            for j in range(1, q + 1):
                term_low = power
                power = power * y
                grads_c.append((gamma * power + j * delta * term_low).sum(0))
            grad_den = torch.stack(grads_c)
        else:
            grad_den = denominator.new_zeros(denominator.shape).to(cd)
        return (
            grad_x.to(x.dtype),
            grad_shift.to(shift.dtype),
            grad_scale_in.to(scale_in.dtype),
            grad_scale_out.to(scale_out.dtype),
            torch.stack(grads_a).to(numerator.dtype),
            grad_den.to(denominator.dtype),
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


_EAGER: dict[tuple[str, int, int], Callable[..., Any]] = {}
_COMPILED: dict[tuple[str, int, int], Callable[..., Any]] = {}
_COMPILE_FAILED = False


def _body(kind: str, p: int, q: int, compiled: bool) -> Callable[..., Any]:
    key = (kind, p, q)
    if key not in _EAGER:
        maker = _forward_body if kind == "fwd" else _backward_body
        _EAGER[key] = _fresh_code(maker(p, q), f"p{p}_q{q}")
    if not compiled:
        return _EAGER[key]
    if key not in _COMPILED:
        # dynamic=True: batch size (and width) changes must not recompile.
        _COMPILED[key] = torch.compile(_EAGER[key], dynamic=True, fullgraph=True)
    return _COMPILED[key]


def _run(kind: str, p: int, q: int, compiled: bool, *args: Tensor) -> Any:
    global _COMPILE_FAILED
    if compiled and not _COMPILE_FAILED:
        try:
            return _body(kind, p, q, True)(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure must degrade, not crash training
            _COMPILE_FAILED = True
            warnings.warn(
                f"rsae: torch.compile of the rational gate failed ({type(exc).__name__}: {exc}); "
                "falling back to eager for the rest of this process (set RSAE_COMPILE=0 to silence).",
                RuntimeWarning,
                stacklevel=3,
            )
    return _body(kind, p, q, False)(*args)


class _RationalGateFunction(torch.autograd.Function):
    """Saves only x and the small parameters; backward recomputes with explicit formulas."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shift: Tensor, scale_in: Tensor, scale_out: Tensor, numerator: Tensor,
                denominator: Tensor, compiled: bool) -> Tensor:
        p, q = numerator.shape[0] - 1, denominator.shape[0]
        ctx.degree = (p, q)
        ctx.compiled = compiled
        ctx.save_for_backward(x, shift, scale_in, scale_out, numerator, denominator)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _run("fwd", p, q, compiled, x, shift, scale_in, scale_out, numerator, denominator)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, shift, scale_in, scale_out, numerator, denominator = ctx.saved_tensors
        p, q = ctx.degree
        with torch.autocast(device_type=x.device.type, enabled=False):
            grads = _run("bwd", p, q, ctx.compiled, grad, x, shift, scale_in, scale_out, numerator, denominator)
        needed = ctx.needs_input_grad
        return (*(gr if need else None for gr, need in zip(grads, needed[:6])), None)


def rational_gate(x: Tensor, shift: Tensor, scale_in: Tensor, scale_out: Tensor, numerator: Tensor,
                  denominator: Tensor, *, compiled: bool | None = None) -> Tensor:
    """``C_out * r((x - shift) / C_in)`` per column, fused and low-memory (see module docstring).

    Args:
        x: [M, F] input (any float dtype; computed in fp32/fp64, returned in x's dtype).
        shift, scale_in, scale_out: [F] per-column parameters (scale_in assumed > 0).
        numerator: [p+1, F] coefficients ``a_0..a_p`` (p >= 1).
        denominator: [q, F] EFFECTIVE coefficients ``c_1..c_q`` (>= 0; q may be 0).
            Coefficient tensors may be ``expand``-ed views of shared [p+1, 1] / [q, 1] coefficients:
            backward returns full [p+1, F] / [q, F] gradients and autograd sums them back.
        compiled: use torch.compile'd bodies; default from env var ``RSAE_COMPILE`` (on).

    Per-element parameters (TopK's k selected values per token) are supported by calling this on
    x of shape [1, N*k] with gathered [N*k] parameters and [p+1, N*k] coefficients.
    """
    _check_shapes(x, shift, scale_in, scale_out, numerator, denominator)
    if compiled is None:
        compiled = compile_enabled()
    return _RationalGateFunction.apply(x, shift, scale_in, scale_out, numerator, denominator, compiled)
