"""rsae's SAE training step against its peers' own steps, SAELens and EleutherAI sparsify, side by side.

Rows: TopK from all three; SAELens' standard SAE (ReLU + L1) against rsae's ReLU; SAELens' JumpReLU against
rsae's; each in fp32 and under bf16 autocast, at each --d-sae. A row runs alone, in a fresh process inside its
library's venv (benchmarks/peers/step_runner.py, which says what a step is), on the same synthetic batches
read from one file, with the same warm-up and the median over blocks of steps. Blocks during which other
processes used the CPU are discarded and counted. Each row gives tokens/s, peak RSS, rsae's tokens/s over the
row's (rsae's model of the same family), and the FVU on a fixed evaluation batch before and after its steps,
so that a fast step that learns nothing shows.

Goals (issue 17): rsae at least 2x the fastest peer's tokens/s for TopK in both dtypes and at least 1.5x
SAELens' for ReLU and JumpReLU, with a peak RSS no higher than the lowest peer's.

The peers cannot share rsae's environment (SAELens 6.54 pins transformer-lens 3.x, rsae needs 4.3), so each
gets a venv, made on first use with torch pinned to rsae's version and needing nothing but PyPI; a venv that
already imports its peer is used as it is.

    python benchmarks/bench_peers.py --json benchmarks/results/bench_peers.json \
        --markdown benchmarks/results/bench_peers.md
    python benchmarks/bench_peers.py --quick      # smoke run: d_sae 256, batch 256, 2 blocks of 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timing import MALLOC_ENVIRONMENTS, cpu_model

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "peers" / "step_runner.py"
# pip requirement and module to import, per peer.
PEERS = {"saelens": ("sae-lens==6.54.*", "sae_lens"), "sparsify": ("eai-sparsify", "sparsify")}
# Table order; each peer row is compared with the rsae row of its family.
ROWS = [("rsae", "topk"), ("sparsify", "topk"), ("saelens", "topk"), ("rsae", "relu"), ("saelens", "relu"),
        ("rsae", "jumprelu"), ("saelens", "jumprelu")]
LABELS = {("rsae", "topk"): "rsae TopK", ("sparsify", "topk"): "sparsify TopK (fused encoder)",
          ("saelens", "topk"): "SAELens TopK", ("rsae", "relu"): "rsae ReLU",
          ("saelens", "relu"): "SAELens standard (ReLU + L1)", ("rsae", "jumprelu"): "rsae JumpReLU",
          ("saelens", "jumprelu"): "SAELens JumpReLU"}
GOALS = {"topk": 2.0, "relu": 1.5, "jumprelu": 1.5}


def ensure_venv(venv: Path, requirement: str, module: str, env: dict[str, str]) -> Path:
    """The venv's Python, after creating the venv and installing the peer unless it imports already."""
    python = venv / "bin" / "python"
    imports = [python, "-c", f"import {module}"]
    if python.exists() and subprocess.run(imports, env=env, capture_output=True).returncode == 0:
        return python
    print(f"installing {requirement} into {venv} (a few minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    # Torch pinned to rsae's: every row runs the same kernels, and unpinned pip would pull a multi-GB CUDA build.
    torch_pin = "torch==" + torch.__version__.split("+")[0]
    subprocess.run([python, "-m", "pip", "install", "--quiet", torch_pin, requirement], check=True)
    return python


def make_data(path: Path, d_in: int, batch: int, pool: int = 4, seed: int = 0) -> None:
    """`pool` training batches and one evaluation batch of synthetic activations, saved for every row to load.

    Each token sums 32 of 8 * d_in fixed random unit directions with uniform [0, 2) magnitudes, plus Gaussian
    noise: pure Gaussian data has no sparse structure to learn, and FVU would hardly move in any row."""
    g = torch.Generator().manual_seed(seed)
    n = (pool + 1) * batch
    directions = F.normalize(torch.randn(8 * d_in, d_in, generator=g), dim=-1)
    indices = torch.randint(len(directions), (n, 32), generator=g)
    magnitudes = 2 * torch.rand(n, 32, generator=g)
    x = F.embedding_bag(indices, directions, per_sample_weights=magnitudes, mode="sum")
    x = (x + 0.1 * torch.randn(n, d_in, generator=g)).view(pool + 1, batch, d_in)
    torch.save({"batches": x[:pool].clone(), "eval": x[pool].clone()}, path)


def steps_per_block(args: argparse.Namespace, d_sae: int) -> int:
    # Fewer steps per block at large d_sae keeps the full run near 15 minutes on 2 cores.
    return args.steps or max(1, round(3 * 4608 / d_sae))


def run_row(python: Path, impl: str, family: str, d_sae: int, bf16: bool, data: Path,
            args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    steps = steps_per_block(args, d_sae)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [python, RUNNER, "--impl", impl, "--family", family, "--d-sae", str(d_sae), "--k", str(args.k),
                   "--data", data, "--out", out, "--threads", str(args.threads), "--warmup", str(args.warmup),
                   "--steps", str(steps), "--blocks", str(args.blocks), "--max-blocks", str(2 * args.blocks),
                   "--max-other-cpu", str(args.max_other_cpu), "--lr", str(args.lr)] + (["--bf16"] if bf16 else [])
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            # One peer's failure should not cost the other rows.
            error = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"impl": impl, "family": family, "dtype": "bf16" if bf16 else "fp32", "d_sae": d_sae,
                    "error": error[0]}
        return json.loads(out.read_text())


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """rsae's tokens/s over each row's, against the rsae row of the same family, dtype and d_sae."""
    rsae = {(r["family"], r["dtype"], r["d_sae"]): r for r in rows if r["impl"] == "rsae" and "error" not in r}
    for r in rows:
        ref = rsae.get((r["family"], r["dtype"], r["d_sae"]))
        r["rsae_ratio"] = ref["tokens_per_s"] / r["tokens_per_s"] if ref and "error" not in r else None


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal of the docstring, per family, dtype and d_sae, against the rows this run measured."""
    out = []
    for r in rows:
        if r["impl"] != "rsae" or "error" in r:
            continue
        peers = [p for p in rows if p["impl"] != "rsae" and "error" not in p
                 and (p["family"], p["dtype"], p["d_sae"]) == (r["family"], r["dtype"], r["d_sae"])]
        if not peers:
            continue
        fastest = max(peers, key=lambda p: p["tokens_per_s"])
        speedup = r["tokens_per_s"] / fastest["tokens_per_s"]
        lowest = min(p["peak_rss_mib"] for p in peers)
        out.append({"family": r["family"], "dtype": r["dtype"], "d_sae": r["d_sae"], "against": fastest["impl"],
                    "speedup": speedup, "speedup_goal": GOALS[r["family"]], "speed_met": speedup >= GOALS[r["family"]],
                    "peak_rss_mib": r["peak_rss_mib"], "lowest_peer_peak_rss_mib": lowest,
                    "memory_met": r["peak_rss_mib"] <= lowest,
                    "contended": r["contended"] or any(p["contended"] for p in peers)})
    return out


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| d_sae | dtype | row | tokens/s | rsae / row | peak RSS (MiB) | step peak (MiB) | FVU start -> end "
             "| blocks kept (skipped) |", "|---:|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        head = f"| {r['d_sae']} | {r['dtype']} | {LABELS[r['impl'], r['family']]}"
        if "error" in r:
            lines.append(f"{head} | failed: {r['error'][:80]} | | | | | |")
            continue
        # A row from contended blocks only (the machine was never quiet) is marked, not dropped.
        mark = " (contended)" if r["contended"] else ""
        ratio = f"{r['rsae_ratio']:.2f}x" if r["rsae_ratio"] is not None else "-"
        step_peak = f"{r['step_peak_mib']:,.0f}" if r["step_peak_mib"] is not None else "-"
        lines.append(f"{head} | {r['tokens_per_s']:,.0f}{mark} | {ratio} | {r['peak_rss_mib']:,.0f} | {step_peak} "
                     f"| {r['fvu_start']:.3f} -> {r['fvu_end']:.3f} | {r['blocks_kept']} ({r['blocks_skipped']}) |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-sae", type=int, nargs="+", default=[4608, 16384])
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row")
    parser.add_argument("--steps", type=int, default=0,
                        help="steps per timed block; default 3 at d_sae 4608, fewer in proportion above (1 at 16384)")
    parser.add_argument("--blocks", type=int, default=5, help="clean timed blocks per row (up to twice as many run)")
    parser.add_argument("--max-other-cpu", type=float, default=0.1,
                        help="skip a block when other processes used more than this many cores during it")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, the same for every row")
    parser.add_argument("--malloc", choices=sorted(MALLOC_ENVIRONMENTS), default="fixed",
                        help="glibc malloc settings for every row (see timing.py); default: fixed")
    parser.add_argument("--saelens-venv", type=Path, default=HERE / ".venvs" / "saelens")
    parser.add_argument("--sparsify-venv", type=Path, default=HERE / ".venvs" / "sparsify")
    parser.add_argument("--quick", action="store_true", help="smoke run: d_sae 256, batch 256, 2 blocks of 2 steps")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.d_sae, args.batch_size, args.blocks, args.steps, args.warmup = [256], 256, 2, 2, 1

    # Same threads and allocator for every row; the peers must not reach for the Hub or wandb.
    env = {**os.environ, **MALLOC_ENVIRONMENTS[args.malloc], "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    pythons = {"rsae": Path(sys.executable),
               "saelens": ensure_venv(args.saelens_venv, *PEERS["saelens"], env),
               "sparsify": ensure_venv(args.sparsify_venv, *PEERS["sparsify"], env)}
    load_at_start = os.getloadavg()

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "activations.pt"
        make_data(data, args.d_in, args.batch_size)
        for d_sae in args.d_sae:
            for dtype in args.dtypes:
                for impl, family in ROWS:
                    row = run_row(pythons[impl], impl, family, d_sae, dtype == "bf16", data, args, env)
                    rows.append(row)
                    status = row.get("error") or (f"{row['tokens_per_s']:,.0f} tokens/s, "
                                                  f"{row['blocks_skipped']} block(s) skipped")
                    print(f"d_sae {d_sae} {dtype} {LABELS[impl, family]}: {status}", flush=True)
    add_ratios(rows)
    checks = goals(rows)

    versions = {impl: next((r["version"] for r in rows if r["impl"] == impl and "version" in r), None)
                for impl in pythons}
    report = {"machine": cpu_model(), "threads": args.threads, "torch": torch.__version__,
              "python": platform.python_version(), "versions": versions, "malloc": args.malloc,
              "load_average_at_start": load_at_start,
              "shape": {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "batch": args.batch_size},
              "warmup": args.warmup, "blocks": args.blocks,
              "steps_per_block": {d: steps_per_block(args, d) for d in args.d_sae}, "lr": args.lr,
              "max_other_cpu": args.max_other_cpu, "quick": args.quick, "rows": rows, "goals": checks}
    steps = " or ".join(f"{steps_per_block(args, d)} (d_sae {d})" for d in args.d_sae)
    lines = [
        "# rsae's training step against SAELens' and sparsify's",
        "",
        f"d_in {args.d_in}, k {args.k}, batch {args.batch_size} tokens; {args.threads} threads on "
        f"{report['machine']}; torch {torch.__version__}; rsae {versions['rsae']}, SAELens {versions['saelens']}, "
        f"sparsify {versions['sparsify']}; malloc `{args.malloc}`. Each row alone in its own process: its library's "
        f"forward, loss, backward and Adam step, {args.warmup} warm-up step(s), then the median of {args.blocks} "
        f"blocks of {steps} steps; blocks during which other processes used more than "
        f"{args.max_other_cpu} cores are skipped. Same synthetic activations and Adam lr {args.lr} for every row; "
        "FVU on a fixed evaluation batch before and after the row's steps. Step peak: the peak RSS during the "
        "steps less the RSS before them.",
        "",
        *table(rows),
        "",
        "Goals: rsae >= 2x the fastest peer for TopK, >= 1.5x SAELens for ReLU and JumpReLU, peak RSS <= the "
        "lowest peer's.",
        "",
        *(f"- {c['family']} {c['dtype']} d_sae {c['d_sae']}: {c['speedup']:.2f}x {c['against']} "
          f"({'met' if c['speed_met'] else 'not met'}); peak RSS {c['peak_rss_mib']:,.0f} vs "
          f"{c['lowest_peer_peak_rss_mib']:,.0f} MiB ({'met' if c['memory_met'] else 'not met'})"
          f"{'; from contended rows' if c['contended'] else ''}" for c in checks),
    ]
    print("\n".join(lines[4:]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
