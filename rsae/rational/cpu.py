"""The rational gate's CPU kernel (``cpu.cpp``): built on first use, called through ctypes.

Why a hand-written kernel: inductor's backward makes two passes over memory on row-major input (see
:mod:`rsae.rational.kernel`), a multiple of relu's time on CPU. The C++ kernel makes one pass
forward and one backward. It has no torch headers, so the system C++ compiler builds it quickly; the
shared library is cached under ``<rsae cache>/kernels`` keyed by source, compiler, flags
and CPU, and written atomically. It covers fp32 and bf16 inputs with unit column stride on CPU;
everything else (GPU, fp16, fp64, other layouts) takes the compiled or eager bodies. If no compiler
is found or the build fails, :func:`library` warns once and returns None, and the gate falls back.
Set ``RSAE_CPU_KERNEL=0`` to turn it off.

The build, cache and load (:func:`load_library`) and the switch (:func:`enabled`) serve every rsae CPU
kernel: the TopK selection of :mod:`rsae.nn.topk_cpu` goes through them too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
from torch import Tensor

from rsae._io import atomic_path, cache_dir

__all__ = ["MAX_COEFFICIENTS", "applies", "enabled", "library", "load_library", "forward", "backward"]

SOURCE = Path(__file__).with_name("cpu.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
MAX_COEFFICIENTS = 32
"""The kernel keeps p + q + 2 coefficient sums per lane: degrees with p + q <= 30 (the paper's go to (12, 12))."""


def enabled() -> bool:
    """Whether the kernel may be used (env var ``RSAE_CPU_KERNEL``; default on)."""
    return os.environ.get("RSAE_CPU_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """-march=native code only runs where it was built: a shared cache dir must not hand it to another CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def _build(compiler: str, source: Path, name: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), compiler, version, *FLAGS, _cpu_signature()]).encode())
    target = cache_dir() / "kernels" / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    with atomic_path(target) as tmp:  # concurrent builders each write their own temporary file
        done = subprocess.run([compiler, *FLAGS, str(source), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} exited with {done.returncode}:\n{done.stderr.strip()[-2000:]}")
    return target


def load_library(source: Path, name: str, what: str, fallback: str) -> ctypes.CDLL | None:
    """The C++ file ``source`` built with the system compiler (cached as ``<rsae cache>/kernels/<name>-<key>.so``,
    the key hashing source, compiler, flags and CPU) and loaded; None after a warning if it cannot be built.
    ``what`` names the kernel and ``fallback`` says what runs instead, in that warning. Callers cache the
    result (one warning per kernel) and set the functions' ctypes signatures."""
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found (tried $CXX, g++, c++, clang++)")
        return ctypes.CDLL(str(_build(compiler, source, name)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"rsae: {what} is unavailable ({exc}); {fallback} (set RSAE_CPU_KERNEL=0 to silence).",
                      RuntimeWarning, stacklevel=3)
        return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it if needed; None (after one warning) if it cannot be built."""
    lib = load_library(SOURCE, "rational_cpu", "the rational gate's CPU kernel", "using the compiled bodies instead")
    if lib is None:
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.rsae_rational_forward.argtypes = [ptr, i32, i64, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i32, i32, i64,
                                          i64, i32, ptr, i32]
    lib.rsae_rational_backward.argtypes = [ptr, i32, i64, ptr, i64, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i32,
                                           i32, i64, i64, i32, i32, ptr, ptr, i32]
    lib.rsae_rational_forward.restype = lib.rsae_rational_backward.restype = ctypes.c_int
    return lib


def applies(x: Tensor, compute_dtype: torch.dtype, degree: tuple[int, int]) -> bool:
    """Whether the kernel handles this input: CPU, fp32 or bf16, fp32 math, unit column stride, a degree with
    p + q + 2 <= MAX_COEFFICIENTS, and the library built."""
    return (x.device.type == "cpu" and x.dtype in _DTYPE_CODES and compute_dtype == torch.float32 and x.dim() == 2
            and (x.stride(1) == 1 or x.shape[1] == 1) and sum(degree) + 2 <= MAX_COEFFICIENTS and enabled()
            and library() is not None)


def _coefficient_layout(numerator: Tensor) -> tuple[int, int]:
    """(row stride, column stride) of the [k, 1] shared or [k, F] per-column coefficient tensors."""
    return (1, 0) if numerator.shape[1] == 1 else (numerator.shape[1], 1)


def _fp32(t: Tensor) -> Tensor:
    """The kernel reads parameters as contiguous fp32 arrays (no-op when they already are)."""
    return t.to(torch.float32).contiguous()


def _check(status: int) -> None:
    if status != 0:
        raise ValueError(
            f"rational CPU kernel: unsupported degree (needs p >= 1, q >= 0, p + q + 2 <= {MAX_COEFFICIENTS})")


def _row_major(t: Tensor) -> Tensor:
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def forward(x: Tensor, shift: Tensor, inv_scale_in: Tensor, scale_out: Tensor, numerator: Tensor, denominator: Tensor,
            slope_pos: Tensor, positive_support: bool) -> Tensor:
    """The gate's forward (the arguments of ``rational_forward`` in :mod:`rsae.rational.kernel`, fp32 parameters)."""
    lib = library()
    assert lib is not None, "call applies() first"
    params = [_fp32(t) for t in (shift, inv_scale_in, scale_out, numerator, denominator, slope_pos)]
    shift, inv_scale_in, scale_out, numerator, denominator, slope_pos = params
    out = torch.empty(x.shape, dtype=x.dtype)
    rows, cols = x.shape
    _check(lib.rsae_rational_forward(
        x.data_ptr(), _DTYPE_CODES[x.dtype], x.stride(0), out.data_ptr(), out.stride(0),
        rows, cols, shift.data_ptr(), inv_scale_in.data_ptr(), scale_out.data_ptr(), numerator.data_ptr(),
        denominator.data_ptr(), numerator.shape[0] - 1, denominator.shape[0], *_coefficient_layout(numerator),
        int(positive_support), slope_pos.data_ptr(), torch.get_num_threads()))
    return out


def backward(grad: Tensor, x: Tensor, shift: Tensor, inv_scale_in: Tensor, scale_out: Tensor, numerator: Tensor,
             denominator: Tensor, positive_support: bool, per_column_sums: bool) -> tuple[Tensor, ...]:
    """grad_x and the sums of ``rational_backward`` in :mod:`rsae.rational.kernel`, in its order. The coefficient
    sums and the tail sum are per column ([p+1, F], [q, F], [F]) if ``per_column_sums`` (always so for
    per-column coefficients), else totals ([p+1, 1], [q, 1], [1])."""
    lib = library()
    assert lib is not None, "call applies() first"
    params = [_fp32(t) for t in (shift, inv_scale_in, scale_out, numerator, denominator)]
    shift, inv_scale_in, scale_out, numerator, denominator = params
    grad = _row_major(grad.to(x.dtype))
    rows, cols = x.shape
    p, q = numerator.shape[0] - 1, denominator.shape[0]
    per_column_sums = per_column_sums or numerator.shape[1] > 1
    n_threads = torch.get_num_threads()
    # Zero-filled: a thread the OpenMP runtime does not start leaves its slice as it is.
    col_sums = torch.zeros(n_threads, p + q + 5 if per_column_sums else 3, cols)
    coef_sums = torch.zeros(n_threads, p + q + 2)
    grad_x = torch.empty(x.shape, dtype=x.dtype)
    _check(lib.rsae_rational_backward(
        grad.data_ptr(), _DTYPE_CODES[x.dtype], grad.stride(0), x.data_ptr(), x.stride(0), grad_x.data_ptr(),
        grad_x.stride(0), rows, cols, shift.data_ptr(),
        inv_scale_in.data_ptr(), scale_out.data_ptr(), numerator.data_ptr(), denominator.data_ptr(), p, q,
        *_coefficient_layout(numerator), int(positive_support), int(per_column_sums), col_sums.data_ptr(),
        coef_sums.data_ptr(), n_threads))
    sum_gx, sum_gxu, sum_gr, *per_column = col_sums.sum(0)
    coefs = torch.stack(per_column) if per_column_sums else coef_sums.sum(0)[:, None]
    return grad_x, sum_gx, sum_gxu, sum_gr, coefs[: p + 1], coefs[p + 1 : p + q + 1], coefs[p + q + 1]
