"""Acceptance of the calibrated RSAE initialisation: does it reproduce its teacher on held-out real activations?

For each teacher family (relu, jumprelu, topk) and gate mode (masked, pure, thresholded): build the
RSAE from the teacher, `rsae.train.calibration.calibrate` it on calibration activations, then compare
with the teacher on HELD-OUT activations (`evaluate_against_teacher`). Targets (the issue): MSE
within 1%, mean latent cosine >= 0.99, L0 identical in masked mode and within 2% in thresholded
mode; pure mode is reported for comparison.

Activations: by default the residual stream (`blocks.1.hook_resid_post`, BOS dropped) of a tiny
randomly initialised TL-native transformer (transformer-lens' `TransformerBridge.boot_native`) on
random token ids, i.e. real forward passes of a real (if untrained) model, in seconds on a CPU.
With `--activations PATH.npy` ([N, d_in] rows, e.g. cached SmolLM2 activations) those are used
instead. Teachers are trained here on the first part of the rows.

    python benchmarks/calibration_acceptance.py
    python benchmarks/calibration_acceptance.py --activations acts.npy --d-sae 4608 --k 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rsae.nn.config import GATE_MODES, SAEConfig
from rsae.nn.rational_sae import RSAE
from rsae.nn.registry import build_model
from rsae.nn.sae import SparseAutoencoder
from rsae.train.calibration import calibrate, evaluate_against_teacher

RESULTS = Path(__file__).parent / "results"
FAMILIES = ("relu", "jumprelu", "topk")
TARGETS = {"mse_rel_diff": 0.01, "cosine": 0.99, "l0_thresholded_rel_diff": 0.02}


def tiny_model_activations(n_sequences: int = 256, seq_len: int = 65, layer: int = 1, d_model: int = 32,
                           seed: int = 0) -> Tensor:
    """[n_sequences * (seq_len - 1), d_model] residual-stream activations of a tiny random transformer.

    BOS (position 0) is dropped: its norm is far larger than other positions'."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=d_model, n_layers=layer + 1, n_ctx=seq_len, d_head=8,
                                  n_heads=d_model // 8, d_mlp=4 * d_model, d_vocab=512, act_fn="gelu", seed=seed)
    model = TransformerBridge.boot_native(cfg)
    tokens = torch.randint(0, cfg.d_vocab, (n_sequences, seq_len), generator=torch.Generator().manual_seed(seed))
    hook = f"blocks.{layer}.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name == hook, stop_at_layer=layer + 1)
    return cache[hook][:, 1:].reshape(-1, d_model).float().contiguous()


def train_teacher(family: str, x: Tensor, d_sae: int, k: int, steps: int, seed: int = 0,
                  hook_name: str = "blocks.1.hook_resid_post") -> SparseAutoencoder:
    """A teacher trained with Adam on shuffled minibatches of x (sparsity coefficients tuned for unit-scale data)."""
    torch.manual_seed(seed)
    fields: dict[str, Any] = {"d_in": x.shape[1], "d_sae": d_sae, "architecture": family, "hook_name": hook_name,
                              "model_name": "tiny-native", "jumprelu_bandwidth": 0.05,
                              "jumprelu_init_threshold": 0.05}
    if family == "topk":
        fields["k"] = k
    model = build_model(SAEConfig(**fields))
    # Scale-aware sparsity: the penalties are per unit of squared reconstruction error.
    scale = float(x.pow(2).sum(-1).mean())
    coefficient = {"relu": 3e-3 * scale ** 0.5, "jumprelu": 3e-3 * scale, "topk": 0.0}[family]
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    torch.set_flush_denormal(True)
    try:
        for _ in range(steps):
            rows = torch.randint(len(x), (256,), generator=gen)
            loss = model.training_loss(x[rows], sparsity_coefficient=coefficient)
            optimiser.zero_grad()
            loss.total.backward()
            optimiser.step()
    finally:
        torch.set_flush_denormal(False)
    return model.eval()


def run(x: Tensor, d_sae: int, k: int, steps: int, refine_steps: int, modes: tuple[str, ...] = GATE_MODES,
        families: tuple[str, ...] = FAMILIES, hook_name: str = "blocks.1.hook_resid_post") -> list[dict[str, Any]]:
    """Rows of the acceptance table: train on the first half of x, calibrate on the next quarter, test on the rest."""
    n = len(x)
    train_x, calib_x, test_x = x[: n // 2], x[n // 2 : 3 * n // 4], x[3 * n // 4 :]
    rows = []
    for family in families:
        teacher = train_teacher(family, train_x, d_sae, k, steps, hook_name=hook_name)
        for mode in modes:
            start = time.perf_counter()
            activations = calib_x if family == "topk" and mode != "masked" else None
            model = RSAE.from_teacher(teacher, mode=mode, activations=activations)
            report = calibrate(model, teacher, calib_x, refine_steps=refine_steps)
            held_out = evaluate_against_teacher(model, teacher, test_x)
            rows.append({"family": family, "mode": mode, "degree": list(model.cfg.degree),
                         "threshold_eps": report.threshold_eps, "l0_tolerance": model.cfg.l0_tolerance,
                         "dead_latents": report.dead_latents, "gate_l2_before": report.gate_l2_before,
                         "gate_l2_after": report.gate_l2_after, "seconds": time.perf_counter() - start,
                         **held_out, "passes": passes(mode, held_out)})
    return rows


def passes(mode: str, f: dict[str, float]) -> bool:
    ok = abs(f["mse_rel_diff"]) <= TARGETS["mse_rel_diff"] and f["cosine"] >= TARGETS["cosine"]
    if mode == "masked":
        return ok and f["l0_exact"] == f["l0_teacher"]
    if mode == "thresholded":
        return ok and abs(f["l0_exact_rel_diff"]) <= TARGETS["l0_thresholded_rel_diff"]
    return ok


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Calibration acceptance: initialised RSAE vs its teacher on held-out activations",
        "",
        f"Data: {meta['data']}; {meta['tokens']} tokens (train / calibrate / held-out = 1/2, 1/4, 1/4), "
        f"d_in {meta['d_in']}, d_sae {meta['d_sae']}, k {meta['k']}, teacher steps {meta['steps']}, "
        f"refine steps {meta['refine_steps']}. Machine: {meta['machine']}.",
        "",
        "Targets: |MSE rel diff| <= 1%, cosine >= 0.99, L0 identical (masked) / within 2% (thresholded). "
        "`pass` applies them (pure mode: MSE and cosine only).",
        "",
        "| family | mode | MSE teacher | MSE RSAE | rel diff | cosine | L0 teacher | L0 exact | L0 tol | "
        "gate L2 before -> after | dead | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['mode']} | {r['mse_teacher']:.4g} | {r['mse_rsae']:.4g} | "
            f"{r['mse_rel_diff']:+.2%} | "
            f"{r['cosine']:.4f} | {r['l0_teacher']:.2f} | {r['l0_exact']:.2f} | {r['l0_tolerance']:.2f} | "
            f"{r['gate_l2_before']:.2e} -> {r['gate_l2_after']:.2e} | {r['dead_latents']} | "
            f"{'yes' if r['passes'] else 'no'} |"
        )
    lines += [
        "",
        "Notes:",
        "- masked: exact by construction (identity on the teacher's support; scales only place the fit window).",
        "- thresholded: `threshold_eps` is set on the calibration rows so that L0 matches the teacher's "
        "(`calibrate(match_l0=True)`); JSON has the value per row.",
        "- pure: never sparse (L0 = d_sae); a JumpReLU teacher's sub-threshold ripple, kept in pure mode, *lowers* "
        "MSE below the teacher's, so |rel diff| can exceed 1% in the good direction.",
        "- topk pure/thresholded: TopK selects per token, which no pointwise gate reproduces. Measured on this "
        "stream, the best per-latent hard threshold (a JumpReLU with each latent's firing-rate-matched "
        "threshold) reaches only cosine 0.931 and MSE +13.7% against the TopK teacher, so the 0.99 / 1% "
        "targets are out of reach for these two modes; masked mode is the TopK answer.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--activations", type=Path, default=None, help="[N, d_in] .npy of real activations")
    parser.add_argument("--hook-name", default="blocks.1.hook_resid_post")
    parser.add_argument("--d-sae", type=int, default=128)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600, help="teacher training steps")
    parser.add_argument("--refine-steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the tiny shapes here run slower with more on a loaded machine)")
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration_acceptance")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.activations is None:
        x = tiny_model_activations(seed=args.seed)
        data = "tiny TL-native transformer (2 layers, d_model 32), blocks.1.hook_resid_post, random tokens, BOS dropped"
    else:
        x = torch.from_numpy(np.load(args.activations)).float()
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))]
        data = str(args.activations)
    rows = run(x, args.d_sae, args.k, args.steps, args.refine_steps, hook_name=args.hook_name)
    meta = {"data": data, "tokens": len(x), "d_in": x.shape[1], "d_sae": args.d_sae, "k": args.k,
            "steps": args.steps, "refine_steps": args.refine_steps,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, meta)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
