"""Tests of the rational gate's CPU kernel (rsae.rational.cpu): agreement with the eager bodies on every
coefficient layout, shape and stride the gate meets, bf16 rounding, backend selection, and the build
(cached, atomic, and a clean fallback when it cannot be built)."""

from __future__ import annotations

import warnings

import pytest
import torch

import rsae.rational.kernel as rational
from rsae.rational import cpu as rational_cpu
from rsae.rational.kernel import rational_gate

pytestmark = pytest.mark.skipif(rational_cpu.library() is None, reason="no C++ compiler: the gate falls back")


def gate_args(rows: int, cols: int, p: int, q: int, coefficients: str, seed: int = 0) -> list[torch.Tensor]:
    """fp32 leaves; x spans the rational and both tails. coefficients: shared [k, 1], per-column [k, F], or
    expanded (a stride-0 [k, F] view of shared ones, whose gradient autograd sums back)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * 2
    shift, scale_in, scale_out = torch.randn(cols, generator=gen) * 0.1, torch.rand(cols, generator=gen) + 0.5, \
        torch.rand(cols, generator=gen) + 0.5
    width = cols if coefficients == "per-column" else 1
    a, c = torch.randn(p + 1, width, generator=gen) * 0.5, torch.rand(q, width, generator=gen)
    return [t.requires_grad_() for t in (x, shift, scale_in, scale_out, a, c)]


def run(args: list[torch.Tensor], backend: str, coefficients: str, grad: torch.Tensor,
        positive_support: bool = False) -> list[torch.Tensor]:
    x, a, c = args[0], *args[4:]
    if coefficients == "expanded":
        a, c = a.expand(a.shape[0], x.shape[1]), c.expand(c.shape[0], x.shape[1])
    out = rational_gate(x, *args[1:4], a, c, positive_support=positive_support, backend=backend)
    return [out, *torch.autograd.grad(out, args, grad)]


@pytest.mark.parametrize("coefficients", ["shared", "expanded", "per-column"])
@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 300), (3, 7), (8, 64), (5, 100), (64, 1000)])
@pytest.mark.parametrize("degree", [(9, 8), (3, 0), (1, 1)])
@pytest.mark.parametrize("positive_support", [False, True])
def test_kernel_matches_eager(rows, cols, degree, coefficients, positive_support):
    """Full blocks of 64 columns, single vectors and a partial last vector; one row (the TopK path, split by
    columns across threads) and several (split by rows)."""
    args = gate_args(rows, cols, *degree, coefficients, seed=rows * cols)
    grad = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    got = run(args, "cpu_kernel", coefficients, grad, positive_support)
    # The truth in fp64: fp32 eager's own sums are no closer to it than the kernel's.
    args64 = [t.detach().double().requires_grad_() for t in args]
    want = run(args64, "eager", coefficients, grad.double(), positive_support)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == torch.float32
        # sums over up to 64 x 1000 terms of O(1): compare relative to each gradient's scale
        scale = w.abs().max().item() if w.numel() else 1.0
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=2e-6 * max(1.0, scale))


def test_kernel_takes_strided_rows_and_gradients():
    """x a column slice of a wider tensor (row stride > width) and a transposed-layout incoming gradient."""
    args = gate_args(16, 40, 5, 4, "shared")
    wide = torch.randn(16, 56)
    wide[:, 8:48] = args[0].detach()
    x = wide[:, 8:48].requires_grad_()
    args_view = [x, *args[1:]]
    grad = torch.randn(40, 16).T
    assert x.stride(0) == 56 and not grad.is_contiguous()
    got, want = run(args_view, "cpu_kernel", "shared", grad), run(args, "eager", "shared", grad.contiguous())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_bf16_rounds_like_torch_and_keeps_nan():
    """On bf16 input the kernel computes in fp32 and rounds once, to nearest even, NaN staying NaN: exactly
    its fp32 result on the upcast input, cast by torch."""
    args = gate_args(32, 200, 9, 8, "shared", seed=4)
    x16 = args[0].detach().to(torch.bfloat16)
    x16[3, 5] = float("nan")
    x16 = x16.requires_grad_()
    x32 = x16.detach().float().requires_grad_()
    grad16 = torch.randn(32, 200).to(torch.bfloat16)
    out16 = rational_gate(x16, *args[1:], backend="cpu_kernel")
    out32 = rational_gate(x32, *args[1:], backend="cpu_kernel")
    assert out16.dtype == torch.bfloat16 and out16.isnan().sum() == 1
    torch.testing.assert_close(out16, out32.to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)
    (gx16,) = torch.autograd.grad(out16, x16, grad16)
    (gx32,) = torch.autograd.grad(out32, x32, grad16.float())
    torch.testing.assert_close(gx16, gx32.to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)


def test_auto_picks_the_kernel_only_where_it_applies(monkeypatch):
    x = torch.zeros(4, 8)
    assert rational._resolve_backend("auto", x, torch.float32, (3, 2)) == "cpu_kernel"
    assert rational._resolve_backend("auto", x.to(torch.bfloat16), torch.float32, (3, 2)) == "cpu_kernel"
    assert rational._resolve_backend("auto", x.double(), torch.float64, (3, 2)) == "compiled"
    assert rational._resolve_backend("auto", x.half(), torch.float32, (3, 2)) == "compiled"
    assert rational._resolve_backend("auto", x.T.contiguous().T, torch.float32, (3, 2)) == "compiled"  # feature-major
    assert rational._resolve_backend("auto", x, torch.float32, (16, 15)) == "compiled"  # more sums than it keeps
    monkeypatch.setenv("RSAE_COMPILE", "0")
    assert rational._resolve_backend("auto", x.double(), torch.float64, (3, 2)) == "eager"
    monkeypatch.setenv("RSAE_CPU_KERNEL", "0")
    assert rational._resolve_backend("auto", x, torch.float32, (3, 2)) == "eager"


def test_kernel_refuses_an_unsupported_degree_instead_of_overrunning(monkeypatch):
    args = gate_args(2, 16, 16, 15, "shared")
    params = [t.detach() for t in args[1:]]
    with pytest.raises(ValueError, match="unsupported degree"):
        rational_cpu.forward(args[0].detach(), *params, torch.zeros(1), positive_support=False)
    with pytest.raises(ValueError, match="unsupported degree"):
        rational_cpu.backward(torch.ones(2, 16), args[0].detach(), *params, positive_support=False,
                              per_column_sums=False)
    monkeypatch.setenv("RSAE_COMPILE", "0")  # auto then takes the eager bodies (no compile in the test)
    out = rational_gate(*args)
    assert torch.isfinite(out).all()


def test_backend_errors_name_the_problem():
    x = torch.zeros(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="cpu_kernel.*float64"):
        rational._resolve_backend("cpu_kernel", x, torch.float64, (3, 2))
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        rational._resolve_backend("fast", x, torch.float64, (3, 2))


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and no loaded library; the real one is reloaded (from its cache) afterwards."""
    monkeypatch.setenv("RSAE_CACHE_DIR", str(tmp_path))
    rational_cpu.library.cache_clear()
    yield tmp_path / "kernels"
    rational_cpu.library.cache_clear()


def test_build_is_cached_and_leaves_no_partial_files(fresh_build):
    assert rational_cpu.library() is not None
    (built,) = fresh_build.iterdir()
    assert built.suffix == ".so" and not built.name.startswith(".building-")
    stamp = built.stat().st_mtime_ns
    rational_cpu.library.cache_clear()
    assert rational_cpu.library() is not None
    assert list(fresh_build.iterdir()) == [built] and built.stat().st_mtime_ns == stamp


def test_failed_build_warns_once_and_the_gate_falls_back(fresh_build, monkeypatch, tmp_path):
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo broken 1.0; exit 0; fi\necho 'no' >&2; exit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    args = gate_args(4, 6, 3, 2, "shared")
    with pytest.warns(RuntimeWarning, match="CPU kernel is unavailable .*exited with 1"):
        assert rational_cpu.library() is None
    assert list(fresh_build.iterdir()) == []  # nothing half-written
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rational._resolve_backend("auto", args[0], torch.float32, (3, 2)) in ("compiled", "eager")
        out = rational_gate(*args, backend="eager")
    assert torch.isfinite(out).all()
