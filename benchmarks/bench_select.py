"""Top-k selection on CPU: torch.topk against rsae's kernel (rsae.nn.topk_cpu), the selection in topk_relu.

Each case times ``torch.topk(x, k, dim=-1, sorted=False)`` and ``topk_cpu.topk(x, k)`` on the same input,
interleaved (one call of each per round, so load from other tenants of a shared machine hits both alike),
and reports the medians and their ratio. Inputs are standard normal pre-activations, one fixed tensor per
case, filled in the case's dtype; before timing, the kernel's answer is checked against torch.topk's (the
same multiset of values, the values at the returned indices). topk_relu keeps the kernel only if it is
faster at the quickstart's shape ([4096, 4608], k 32) in fp32 and bf16; ``decision`` in the report says so.

    python benchmarks/bench_select.py                                 # both widths, fp32 and bf16, k 32
    python benchmarks/bench_select.py --json benchmarks/results/bench_select.json \\
        --markdown benchmarks/results/bench_select.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from timing import cpu_model, interleave, write_results

from rsae.nn import topk_cpu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUICKSTART = (4096, 4608, 32)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def check_agreement(x: torch.Tensor, k: int) -> None:
    values, indices = topk_cpu.topk(x, k)
    want = x.topk(k, dim=-1, sorted=False).values
    bits = torch.int32 if x.dtype == torch.float32 else torch.int16
    assert torch.equal(x.view(bits).gather(-1, indices), values.view(bits)), "values are not x at the indices"
    assert torch.equal(values.float().sort(-1).values, want.float().sort(-1).values), "not torch.topk's values"


def benchmark(rows: int, cols: int, k: int, dtype: str, warmup: int, repeats: int) -> dict[str, object]:
    x = torch.empty(rows, cols, dtype=DTYPES[dtype]).normal_(generator=torch.Generator().manual_seed(cols + k))
    check_agreement(x, k)
    steps = {
        "torch.topk": lambda: timed(lambda: x.topk(k, dim=-1, sorted=False)),
        "kernel": lambda: timed(lambda: topk_cpu.topk(x, k)),
    }
    times = interleave(steps, warmup, repeats)
    torch_s, kernel_s = statistics.median(times["torch.topk"]), statistics.median(times["kernel"])
    return {
        "rows": rows, "cols": cols, "k": k, "dtype": dtype,
        "torch_topk_median_s": torch_s, "kernel_median_s": kernel_s, "speedup": torch_s / kernel_s,
        "speedup_of_fastest": min(times["torch.topk"]) / min(times["kernel"]),
        "torch_topk_s": times["torch.topk"], "kernel_s": times["kernel"],
    }


def markdown(report: dict[str, object]) -> str:
    lines = [
        "# Top-k selection: torch.topk vs the CPU kernel",
        "",
        f"`benchmarks/bench_select.py`: `torch.topk(x, k, dim=-1, sorted=False)` against `rsae.nn.topk_cpu.topk` "
        f"on the same standard normal input, interleaved, median of {report['repeats']} calls each (after "
        f"{report['warmup']} warm-up rounds); torch {report['torch']}, {report['threads']} threads, "
        f"{report['machine']} (kernel path: {report['kernel_path']}); load average "
        f"{report['load_average_at_start'][0]:.1f} at start, the machine is shared.",
        "",
        "| dtype | shape | k | torch.topk (ms) | kernel (ms) | speedup | speedup, fastest calls |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['dtype']} | [{row['rows']}, {row['cols']}] | {row['k']} | {row['torch_topk_median_s'] * 1e3:.1f} "
            f"| {row['kernel_median_s'] * 1e3:.1f} | {row['speedup']:.2f}x | {row['speedup_of_fastest']:.2f}x |"
        )
    lines += ["", f"Decision: {report['decision']}", ""]
    return "\n".join(lines)


def decide(results: list[dict[str, object]]) -> str:
    rows, cols, k = QUICKSTART
    quickstart = {r["dtype"]: r["speedup"] for r in results if (r["rows"], r["cols"], r["k"]) == (rows, cols, k)}
    if set(quickstart) != set(DTYPES):
        return f"not measured at the quickstart's shape [{rows}, {cols}], k {k} in both dtypes"
    faster = all(speedup > 1.0 for speedup in quickstart.values())
    detail = ", ".join(f"{dtype} {speedup:.2f}x" for dtype, speedup in sorted(quickstart.items()))
    verdict = "topk_relu selects with the kernel" if faster else "topk_relu should keep torch.topk"
    return f"{verdict} (at [{rows}, {cols}], k {k}: {detail} the speed of torch.topk)."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, nargs="+", default=[4608, 16384], help="widths (d_sae)")
    parser.add_argument("--k", type=int, nargs="+", default=[32])
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the kernel uses as many)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    parser.add_argument("--markdown", type=Path, default=None, help="write a summary table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if topk_cpu.library() is None:
        raise SystemExit("the top-k CPU kernel could not be built (see the warning above)")

    report: dict[str, object] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": cpu_model(),
        "kernel_path": topk_cpu.vector_path(), "warmup": args.warmup, "repeats": args.repeats,
        "load_average_at_start": os.getloadavg(), "results": [],
    }
    for cols in args.cols:
        for k in args.k:
            for dtype in args.dtype:
                row = benchmark(args.rows, cols, k, dtype, args.warmup, args.repeats)
                report["results"].append(row)
                print(f"{dtype} [{args.rows}, {cols}] k {k}: torch.topk {row['torch_topk_median_s'] * 1e3:.1f} ms, "
                      f"kernel {row['kernel_median_s'] * 1e3:.1f} ms, {row['speedup']:.2f}x", flush=True)
    report["decision"] = decide(report["results"])
    print(report["decision"])
    write_results(report, args.json, args.markdown, markdown)


if __name__ == "__main__":
    main()
