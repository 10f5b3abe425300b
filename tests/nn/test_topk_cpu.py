"""Tests of the top-k CPU kernel (rsae.nn.topk_cpu): the same selection as torch.topk (values exactly, indices up to
ties) on random rows, ties, infinities, signed zeros and NaNs, through every path of the kernel (narrow rows, the
register and memory group paths, buffer cuts, ragged tails) and its portable build; where topk_relu uses it and
where it falls back to torch.topk; and the build (cached, a warning and torch.topk when it cannot be built)."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
import warnings

import pytest
import torch

from rsae.nn import sparse_codes, topk_cpu
from rsae.nn.sparse_codes import topk_relu
from rsae.rational import cpu as rational_cpu

pytestmark = pytest.mark.skipif(topk_cpu.library() is None, reason="no C++ compiler: topk_relu uses torch.topk")

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def rank_sorted(values: torch.Tensor) -> torch.Tensor:
    """Each row's values in torch.topk's order, ascending (NaN as +inf plus one step): a multiset to compare."""
    v = values.float()
    return torch.where(v.isnan(), torch.inf, v).sort(-1).values, v.isnan().sum(-1)


def assert_same_selection(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    """values/indices are a top-k of x along the last dim: the dtype and shape torch.topk gives, distinct in-range
    indices, values that are x's entries at them (the same bits), and the multiset of torch.topk's values."""
    want_values, _ = x.topk(k, dim=-1, sorted=False)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    assert values.shape == indices.shape == want_values.shape
    assert ((indices >= 0) & (indices < x.shape[-1])).all()
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), "an index listed twice"
    bits = BITS[x.dtype]  # gather on the bits: torch.gather may rewrite a bf16 NaN's payload
    assert torch.equal(x.view(bits).gather(-1, indices), values.view(bits)), "values are not x at the indices"
    (got, got_nan), (want, want_nan) = rank_sorted(values), rank_sorted(want_values)
    assert torch.equal(got_nan, want_nan), "a different number of NaNs than torch.topk"
    assert torch.equal(got, want), "not the k largest values"


def check(x: torch.Tensor, k: int, lib: ctypes.CDLL | None = None) -> None:
    assert_same_selection(x, k, *topk_cpu.topk(x, k, lib=lib))


def rows(kind: str, n: int, d: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    if kind == "ties":  # few distinct values: ties at the threshold everywhere
        x = torch.randint(0, 4, (n, d), generator=gen).float()
    elif kind == "constant":
        x = torch.full((n, d), 1.5)
    elif kind == "signed zeros":
        x = torch.where(x.abs() < 0.8, 0.0, x)
        x = torch.where(x.abs() < 0.4, -0.0, x)
    elif kind == "infinities":
        x[torch.rand(n, d, generator=gen) < 0.3] = -torch.inf
        x[:, ::97] = torch.inf
    elif kind == "all -inf":
        x = torch.full((n, d), -torch.inf)
    elif kind == "large":
        x = x * 3e38  # some overflow to inf in bf16 and fp32
    elif kind == "nan":
        x[torch.rand(n, d, generator=gen) < 0.05] = torch.nan
    elif kind == "nan above k":  # more NaNs per row than k: the answer is NaNs, the scan stops early
        x[:, torch.randperm(d, generator=gen)[: min(d, 2 * k)]] = torch.nan
    elif kind == "negative nan":
        x[torch.rand(n, d, generator=gen) < 0.05] = -torch.nan
    elif kind == "all nan":
        x = torch.full((n, d), torch.nan)
    elif kind == "ascending":  # the top k all in the last columns
        x = torch.arange(d, dtype=torch.float32).expand(n, d) + x * 1e-3
    elif kind == "descending":
        x = -torch.arange(d, dtype=torch.float32).expand(n, d) + x * 1e-3
    elif kind == "one group":  # the largest entries share a residue mod 64 and mod 128: a low first threshold
        x = (torch.arange(d) % 128 == 5).float() * 10 + x * 1e-2
    return x.to(dtype).contiguous()


KINDS = ["random", "ties", "constant", "signed zeros", "infinities", "all -inf", "large", "nan", "nan above k",
         "negative nan", "all nan", "ascending", "descending", "one group"]
SHAPES = [
    (64, 4608, 32),  # the quickstart's width and k: 64 groups in registers
    (16, 16384, 32),
    (8, 5000, 64),  # 128 groups in registers, a ragged last block and group chunk
    (8, 3001, 100),  # groups in memory
    (4, 9000, 1024),  # the largest k
    (6, 1500, 1),
    (5, 257, 17),  # no wider than the buffer: one selection over the row
    (3, 64, 64),  # k = width
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d,k", SHAPES, ids=[f"{n}x{d}-k{k}" for n, d, k in SHAPES])
def test_matches_torch_topk(n, d, k, kind, dtype):
    check(rows(kind, n, d, k, dtype, seed=n * d + k), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_buffer_cuts_keep_the_right_entries(dtype):
    """Rows whose entries rise to the end pass the first threshold in bulk: the candidate buffer fills and is cut
    to its k largest many times per row, with ties at each cut."""
    d = 20000
    x = torch.arange(d, dtype=torch.float32).div(7).floor().expand(4, d) * torch.tensor([[1.0], [1.0], [0.5], [2.0]])
    for k in (1, 32, 200, 1000):
        check(x.to(dtype).contiguous(), k)


def test_leading_dims_and_views_of_a_row():
    """[B, T, d] inputs (flattened to rows), a single row, and a contiguous slice of a bigger tensor."""
    x = torch.randn(3, 5, 700)
    values, indices = topk_cpu.topk(x, 20)
    assert values.shape == indices.shape == (3, 5, 20)
    assert_same_selection(x.reshape(15, 700), 20, values.reshape(15, 20), indices.reshape(15, 20))
    check(torch.randn(4608), 32)
    big = torch.randn(10, 4608)
    check(big[3:7], 32)  # storage offset


def test_the_check_catches_a_wrong_answer():
    """assert_same_selection is not vacuous: a swapped index, a repeated one or a wrong value all fail it."""
    x = rows("random", 8, 4608, 32, torch.float32)
    values, indices = topk_cpu.topk(x, 32)
    smallest = x.argmin(-1, keepdim=True)
    wrong_index = indices.clone()
    wrong_index[:, :1] = smallest
    twice = indices.clone()
    twice[:, 1] = twice[:, 0]
    wrong_value = values.clone()
    wrong_value[0, 0] = wrong_value[0, 0] + 1
    for bad_values, bad_indices in [(x.gather(-1, wrong_index), wrong_index), (x.gather(-1, twice), twice),
                                    (wrong_value, indices)]:
        with pytest.raises(AssertionError):
            assert_same_selection(x, 32, bad_values, bad_indices)
    assert_same_selection(x, 32, values, indices)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None,
                    reason="the portable path is the native build off x86")
def test_portable_build_matches_torch_topk(tmp_path):
    """The kernel's plain-loop path (what -march=native gives on CPUs without AVX-512), built without AVX-512."""
    target = tmp_path / "topk_portable.so"
    flags = [*rational_cpu.FLAGS, "-mno-avx512f"]
    subprocess.run(["g++", *flags, str(topk_cpu.SOURCE), "-o", str(target)], check=True, capture_output=True)
    lib = topk_cpu.declare(ctypes.CDLL(str(target)))
    for kind in KINDS:
        for n, d, k in SHAPES[:4] + SHAPES[-2:]:
            for dtype in (torch.float32, torch.bfloat16):
                check(rows(kind, n, d, k, dtype, seed=d), k, lib=lib)


def test_topk_refuses_what_it_does_not_cover():
    x = torch.randn(4, 100)
    with pytest.raises(ValueError, match="unsupported input"):
        topk_cpu.topk(x.half(), 3)
    with pytest.raises(ValueError, match="unsupported input"):
        topk_cpu.topk(x, 101)
    with pytest.raises(ValueError, match="unsupported input"):
        topk_cpu.topk(torch.randn(2, 2000), topk_cpu.MAX_K + 1)
    with pytest.raises(ValueError, match="unsupported input"):
        topk_cpu.topk(x, 0)
    with pytest.raises(ValueError, match="unsupported input"):
        topk_cpu.topk(torch.randn(4, 0), 1)
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        topk_cpu.topk(torch.randn(100, 4).T, 3)
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        topk_cpu.topk(x.to_sparse(), 3)


def test_applies_only_where_the_kernel_does(monkeypatch):
    x = torch.randn(8, 300)
    assert topk_cpu.applies(x, 32) and topk_cpu.applies(x.bfloat16(), 32)
    assert topk_cpu.applies(x, 300) and topk_cpu.applies(torch.randn(300), 5)
    assert not topk_cpu.applies(x.half(), 32)
    assert not topk_cpu.applies(x.double(), 32)
    assert not topk_cpu.applies(torch.randn(300, 8).T, 4)  # not contiguous
    assert not topk_cpu.applies(x[:, :100], 4)  # a column slice: row stride != width
    assert not topk_cpu.applies(x, 0) and not topk_cpu.applies(x, 301)
    assert not topk_cpu.applies(torch.randn(2, 4000), topk_cpu.MAX_K + 1)
    assert not topk_cpu.applies(torch.randn(0, 300), 4)
    assert not topk_cpu.applies(torch.randn(8, 300, device="meta"), 4)  # any other device
    assert not topk_cpu.applies(x.to_sparse(), 4)
    monkeypatch.setenv("RSAE_CPU_KERNEL", "0")
    assert not topk_cpu.applies(x, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_tensors_take_torch_topk():
    x = torch.randn(64, 4608, device="cuda")
    assert not topk_cpu.applies(x, 32)
    values, indices = topk_relu(x, 32)
    assert values.device == x.device
    assert torch.equal(values.sort(-1).values, x.topk(32, dim=-1).values.relu().sort(-1).values)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts topk_relu's calls of the kernel."""
    calls = []
    real = topk_cpu.topk

    def spy(x, k, lib=None):
        calls.append((x.dtype, k))
        return real(x, k, lib)

    monkeypatch.setattr(topk_cpu, "topk", spy)
    return calls


def test_topk_relu_uses_the_kernel_where_it_applies_and_torch_topk_elsewhere(kernel_calls, monkeypatch):
    x = torch.randn(32, 4608)
    for inp in (x, x.bfloat16()):
        values, indices = topk_relu(inp, 32)
        assert_same_selection(inp.relu(), 32, values, indices)
    assert kernel_calls == [(torch.float32, 32), (torch.bfloat16, 32)]
    for inp, k in [(x.half(), 32), (x.double(), 32), (x.T.contiguous().T, 32), (torch.randn(4, 3000), 1100)]:
        values, indices = topk_relu(inp, k)
        assert torch.equal(values, inp.topk(k, dim=-1, sorted=False).values.relu())
    monkeypatch.setenv("RSAE_CPU_KERNEL", "0")
    topk_relu(x, 32)
    assert len(kernel_calls) == 2


def test_topk_relu_under_torch_compile_traces_torch_topk(kernel_calls):
    """Dynamo's fake tensors have no data for the kernel: traced code keeps torch.topk (the eager backend: no
    inductor build in the test)."""
    x = torch.randn(16, 700)
    compiled = torch.compile(topk_relu, backend="eager", fullgraph=True)
    values, indices = compiled(x, 8)
    assert not kernel_calls
    assert_same_selection(x.relu(), 8, values, indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_topk_relu_gradient_through_the_kernel(kernel_calls, dtype):
    """With autograd on, the values are gathered from pre_acts: the gradient is torch.topk's (scattered into the
    selected entries, zero where the ReLU cut)."""
    gen = torch.Generator().manual_seed(0)
    # Distinct values (distinct bf16 bit patterns), 10 positive per row: no ties, and the ReLU cuts 6 of 16.
    patterns = torch.stack([torch.randperm(1400, generator=gen)[:700] for _ in range(64)])
    positive = patterns < 10
    bits = torch.where(positive, 0x3F80 + patterns, 0xBF80 - 0x10000 + patterns).to(torch.int16)
    pre_acts = bits.view(torch.bfloat16).to(dtype).requires_grad_()
    values, indices = topk_relu(pre_acts, 16)
    assert values.requires_grad and kernel_calls
    weights = torch.randn(64, 700).to(dtype)
    (grad,) = torch.autograd.grad((values * weights.gather(-1, indices)).sum(), pre_acts)
    ref_values, ref_indices = pre_acts.topk(16, dim=-1, sorted=False)
    (ref_grad,) = torch.autograd.grad((ref_values.relu() * weights.gather(-1, ref_indices)).sum(), pre_acts)
    assert torch.equal(grad, ref_grad)
    with torch.no_grad():
        assert not topk_relu(pre_acts, 16)[0].requires_grad


def test_topk_encode_selects_with_the_kernel(kernel_calls):
    """The TopK SAE's training path: the encoder's forward selects through topk_relu."""
    x, W_enc, b_enc = torch.randn(32, 20), torch.randn(20, 600), torch.randn(600)
    values, indices, pre_acts = sparse_codes.topk_encode(x, W_enc, b_enc, 8)
    assert kernel_calls == [(torch.float32, 8)]
    assert_same_selection(pre_acts.relu(), 8, values, indices)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and no loaded library; the real one is reloaded (from its cache) afterwards."""
    monkeypatch.setenv("RSAE_CACHE_DIR", str(tmp_path))
    topk_cpu.library.cache_clear()
    yield tmp_path / "kernels"
    topk_cpu.library.cache_clear()


def test_build_is_cached_beside_the_rational_kernel(fresh_build):
    assert topk_cpu.library() is not None
    (built,) = fresh_build.iterdir()
    assert built.name.startswith("topk_cpu-") and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    topk_cpu.library.cache_clear()
    assert topk_cpu.library() is not None
    assert list(fresh_build.iterdir()) == [built] and built.stat().st_mtime_ns == stamp


def test_failed_build_warns_once_and_topk_relu_falls_back(fresh_build, monkeypatch, tmp_path, kernel_calls):
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo broken 1.0; exit 0; fi\necho 'no' >&2; exit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    x = torch.randn(8, 300)
    unavailable = "(?s)top-k CPU kernel is unavailable .*exited with 1.*using torch.topk instead"
    with pytest.warns(RuntimeWarning, match=unavailable):
        assert not topk_cpu.applies(x, 4)
    assert list(fresh_build.iterdir()) == []  # nothing half-written
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values, indices = topk_relu(x, 4)
    assert not kernel_calls
    assert torch.equal(values, x.topk(4, dim=-1, sorted=False).values.relu())
