"""Top-k selection's CPU kernel (``topk_cpu.cpp``): built on first use, called through ctypes.

Why a hand-written kernel: ``torch.topk`` on CPU keeps a heap per row (``std::partial_sort`` for small
k), scalar code at about 2 ns a column, and at the TopK SAE's shape ([4096, 4608], k = 32) that costs
more than the encoder's matmul. The kernel reads each row twice, vectorised (the second time from cache):
first for a threshold that at least k entries reach (the k-th largest of 2k interleaved groups' maxima),
then to collect the few dozen entries above it, of which a bit-by-bit count on order keys keeps the k
largest (``topk_cpu.cpp`` has the details, ``benchmarks/bench_select.py`` the timings).

:func:`topk` returns what ``torch.topk(x, k, dim=-1, sorted=False)`` does, as sets: the same multiset of
values and the same indices up to ties, in no particular order (torch's own is sorted for small k; no
caller here depends on it); values in the input dtype (the entries' own bits), int64 indices, no
autograd. NaN follows torch: it ranks above every number and NaNs tie, so a row's NaNs are selected
first (k of them if it has more); -0.0 and 0.0 tie as well.

It covers contiguous fp32 and bf16 CPU tensors with 1 <= k <= min(MAX_K, last dim); :func:`applies`
says so, and everything else (GPU, fp16, fp64, other layouts, larger k) is the caller's to send to
``torch.topk``. It is built, cached and loaded by :func:`rsae.rational.cpu.load_library`, warns once
and is skipped when it cannot be built, and ``RSAE_CPU_KERNEL=0`` turns it off with the rational gate's.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from rsae.rational.cpu import enabled, load_library

__all__ = ["MAX_K", "applies", "declare", "library", "topk", "vector_path"]

SOURCE = Path(__file__).with_name("topk_cpu.cpp")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
MAX_K = 1024
"""Largest k the kernel takes (kMaxK in topk_cpu.cpp)."""


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it if needed; None (after one warning) if it cannot be built."""
    lib = load_library(SOURCE, "topk_cpu", "the top-k CPU kernel", "using torch.topk instead")
    return None if lib is None else declare(lib)


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Sets the ctypes signatures of a loaded ``topk_cpu.cpp`` build and checks that it agrees on MAX_K."""
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.rsae_topk.argtypes = [ptr, i32, i64, i64, i64, ptr, ptr, i32]
    lib.rsae_topk.restype = ctypes.c_int
    lib.rsae_topk_max_k.argtypes = []
    lib.rsae_topk_max_k.restype = ctypes.c_int64
    lib.rsae_topk_avx512.argtypes = []
    lib.rsae_topk_avx512.restype = ctypes.c_int
    if lib.rsae_topk_max_k() != MAX_K:
        raise RuntimeError(f"topk_cpu.cpp takes k <= {lib.rsae_topk_max_k()}, topk_cpu.py says {MAX_K}")
    return lib


def vector_path(lib: ctypes.CDLL | None = None) -> str | None:
    """How the build compares: "avx512" (-march=native on a CPU with AVX-512) or "portable" (plain loops the
    compiler vectorises); None without a build."""
    lib = lib or library()
    return None if lib is None else ("avx512" if lib.rsae_topk_avx512() else "portable")


def applies(x: Tensor, k: int) -> bool:
    """Whether the kernel handles the top ``k`` along the last dim of ``x``: a contiguous fp32 or bf16 CPU
    tensor with at least one element and 1 <= k <= min(MAX_K, x.shape[-1]) (and fewer than 2^31 columns),
    outside torch.compile's tracing (no data to point at), the kernel enabled (``RSAE_CPU_KERNEL``) and built."""
    return (x.device.type == "cpu" and x.dtype in _DTYPE_CODES and x.layout == torch.strided and x.dim() >= 1
            and x.numel() > 0 and x.is_contiguous() and 1 <= k <= min(MAX_K, x.shape[-1])
            and x.shape[-1] < 2**31 and not torch.compiler.is_compiling() and enabled() and library() is not None)


def topk(x: Tensor, k: int, lib: ctypes.CDLL | None = None) -> tuple[Tensor, Tensor]:
    """(values, indices), each of shape ``[*x.shape[:-1], k]``: the k largest entries along the last dim and
    their positions, in no particular order. Call :func:`applies` first. No autograd: gather the values
    from ``x`` with the indices where a gradient must flow. ``lib``: another build (tests), else :func:`library`."""
    lib = lib or library()
    assert lib is not None, "call applies() first"
    if x.device.type != "cpu" or x.layout != torch.strided or x.dim() < 1 or not x.is_contiguous():
        raise ValueError(f"top-k CPU kernel: needs a contiguous CPU tensor (got {x.device}, {x.layout}, "
                         f"shape {tuple(x.shape)})")
    cols = x.shape[-1]
    if x.dtype not in _DTYPE_CODES or not 1 <= k <= min(cols, MAX_K):
        raise ValueError(f"top-k CPU kernel: unsupported input (dtype {x.dtype}, {cols} columns, k={k}; "
                         f"needs fp32 or bf16 and 1 <= k <= min(columns, {MAX_K}))")
    rows = x.numel() // cols
    values = torch.empty(*x.shape[:-1], k, dtype=x.dtype)
    indices = torch.empty(*x.shape[:-1], k, dtype=torch.int64)
    status = lib.rsae_topk(x.data_ptr(), _DTYPE_CODES[x.dtype], rows, cols, k, values.data_ptr(),
                           indices.data_ptr(), torch.get_num_threads())
    if status != 0:  # the checks above should have caught it
        raise RuntimeError(f"top-k CPU kernel refused dtype {x.dtype}, {cols} columns, k={k} (status {status})")
    return values, indices
