"""rsae.eval.metrics against independent numpy computations, batch by batch and across two DDP ranks."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import R2Score

from rsae.eval.metrics import (
    L0,
    AliveFraction,
    DownstreamCE,
    ExplainedVariance,
    FeatureDensity,
    FractionOfVarianceUnexplained,
    LegacyExplainedVariance,
    ReconstructionMSE,
    SAEMetrics,
)
from rsae.nn.sae import Latents

from helpers import D_IN, D_SAE, make_sae, sparse_dictionary_data

N_LATENTS, K, TOL = 48, 5, 1e-3
SIZES = (7, 64, 2, 33)  # unequal on purpose: per-batch means of means would differ from the global mean


def _data(dtype: np.dtype = np.float64) -> dict[str, np.ndarray]:
    """x with a large offset (so ||mu||^2 matters), a noisy reconstruction, codes with dead and tiny latents."""
    rng = np.random.default_rng(0)
    n = sum(SIZES)
    x = rng.normal(size=(n, 16)) * rng.uniform(0.5, 2, size=16) + 3.0
    x_hat = x + 0.3 * rng.normal(size=x.shape)
    z = np.maximum(rng.normal(size=(n, N_LATENTS)) - 0.8, 0)
    z[rng.random(z.shape) < 0.05] = 1e-5  # below TOL: counts for exact L0 and density, not for L0 at TOL
    z[:, :6] = 0  # dead latents
    nll_clean = rng.uniform(1, 3, size=n)
    return {
        "x": x.astype(dtype),
        "x_hat": x_hat.astype(dtype),
        "z": z.astype(dtype),
        "nll_clean": nll_clean,
        "nll_sae": nll_clean + rng.uniform(0, 1, size=n),
        "nll_zero": nll_clean + rng.uniform(2, 4, size=n),
    }


def _batches(arrays: dict[str, np.ndarray]) -> list[dict[str, torch.Tensor]]:
    bounds = np.cumsum((0, *SIZES))
    return [
        {k: torch.from_numpy(v[a:b]) for k, v in arrays.items()} for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def _sparse(z: torch.Tensor) -> Latents:
    """TopK-style codes of a dense z; rows with fewer than K non-zeros keep some zero values."""
    values, indices = z.topk(K, dim=-1)
    return Latents(values, indices)


def _topk_dense(z: np.ndarray) -> np.ndarray:
    latents = _sparse(torch.from_numpy(z))
    return latents.dense(z.shape[1]).numpy()


# --- reference computations --------------------------------------------------------------------------------
def _np_mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    return float(((x - x_hat) ** 2).sum(1).mean())


def _np_ev(x: np.ndarray, x_hat: np.ndarray) -> float:
    return 1 - _np_mse(x, x_hat) / float((x**2).sum(1).mean() - (x.mean(0) ** 2).sum())


def _np_legacy(batches: list[dict[str, torch.Tensor]]) -> float:
    per_token = []
    for b in batches:
        x, x_hat = b["x"].double().numpy(), b["x_hat"].double().numpy()
        per_token.append(1 - ((x - x_hat) ** 2).sum(1) / ((x - x.mean(0)) ** 2).sum(1))
    return float(np.concatenate(per_token).mean())


# --- single metrics ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_element", [False, True])
def test_mse_matches_numpy(per_element: bool) -> None:
    data = _data()
    metric = ReconstructionMSE(per_element=per_element)
    for b in _batches(data):
        metric.update(b["x"], b["x_hat"])
    expected = _np_mse(data["x"], data["x_hat"]) / (data["x"].shape[1] if per_element else 1)
    assert metric.compute().dtype == torch.float64
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-12)


def test_explained_variance_matches_numpy_and_r2score() -> None:
    data = _data(np.float32)
    ev, fvu, r2 = ExplainedVariance(), FractionOfVarianceUnexplained(), R2Score(multioutput="variance_weighted")
    for b in _batches(data):
        ev.update(b["x"], b["x_hat"])
        fvu.update(b["x"], b["x_hat"])
        r2.update(b["x_hat"].double(), b["x"].double())
    expected = _np_ev(data["x"].astype(np.float64), data["x_hat"].astype(np.float64))
    assert float(ev.compute()) == pytest.approx(expected, rel=1e-10)
    assert float(fvu.compute()) == pytest.approx(1 - expected, rel=1e-9)
    assert float(fvu.compute()) == pytest.approx(1 - float(r2.compute()), rel=1e-9)
    # Not the legacy definition: with a large offset, variance about the batch mean is the point.
    assert float(ev.compute()) != pytest.approx(_np_legacy(_batches(data)), rel=1e-3)


def test_explained_variance_forward_and_reset() -> None:
    data = _data()
    metric = ExplainedVariance()
    batches = _batches(data)
    for b in batches:
        metric(b["x"], b["x_hat"])  # forward() merges per-batch states into the lazily sized global one
    assert float(metric.compute()) == pytest.approx(_np_ev(data["x"], data["x_hat"]), rel=1e-12)
    metric.reset()
    metric.update(batches[1]["x"], batches[1]["x_hat"])
    assert float(metric.compute()) == pytest.approx(_np_ev(*(batches[1][k].numpy() for k in ("x", "x_hat"))))


def test_legacy_explained_variance_matches_numpy() -> None:
    batches = _batches(_data())
    metric = LegacyExplainedVariance()
    for b in batches:
        metric.update(b["x"], b["x_hat"])
    assert float(metric.compute()) == pytest.approx(_np_legacy(batches), rel=1e-12)


@pytest.mark.parametrize("tolerance", [0.0, TOL])
def test_l0_matches_numpy_dense_and_sparse(tolerance: float) -> None:
    data = _data()
    dense, sparse = L0(tolerance), L0(tolerance)
    for b in _batches(data):
        dense.update(b["z"])
        sparse.update(_sparse(b["z"]).values)
    assert float(dense.compute()) == pytest.approx((np.abs(data["z"]) > tolerance).sum(1).mean(), rel=1e-12)
    topk = _topk_dense(data["z"])
    assert float(sparse.compute()) == pytest.approx((np.abs(topk) > tolerance).sum(1).mean(), rel=1e-12)
    if tolerance == 0:
        assert float(dense.compute()) > float(L0(TOL)(torch.from_numpy(data["z"])))


def test_density_alive_and_histogram_match_numpy() -> None:
    data = _data()
    density, alive, sparse = FeatureDensity(N_LATENTS), AliveFraction(N_LATENTS), FeatureDensity(N_LATENTS)
    for b in _batches(data):
        density.update(b["z"])
        alive.update(b["z"], None)
        sparse.update(*_sparse(b["z"]))
    expected = (data["z"] != 0).mean(0)
    np.testing.assert_allclose(density.compute().numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(alive.density().numpy(), expected, rtol=1e-12)
    assert float(alive.compute()) == pytest.approx((expected > 0).mean())
    np.testing.assert_allclose(sparse.compute().numpy(), (_topk_dense(data["z"]) != 0).mean(0), rtol=1e-12)

    histogram = density.histogram(bins=10)
    json.dumps(histogram)  # plain Python numbers only
    live = np.log10(expected[expected > 0])
    counts, edges = np.histogram(live, bins=10, range=(live.min(), live.max()))
    assert histogram["dead"] == 6 and histogram["live"] == N_LATENTS - 6 and sum(histogram["counts"]) == live.size
    assert histogram["counts"] == counts.tolist()
    np.testing.assert_allclose(histogram["log10_density_edges"], edges, rtol=1e-12)
    assert alive.histogram(bins=10) == histogram


def test_histogram_edge_cases() -> None:
    metric = FeatureDensity(4)
    metric.update(torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
    histogram = metric.histogram(bins=2)
    assert histogram["log10_density_edges"] == [-0.5, 0.0, 0.5] and histogram["counts"] == [0, 1]
    assert histogram["dead"] == 3
    metric.reset()
    metric.update(torch.zeros(3, 4))
    assert metric.histogram()["counts"] == [] and metric.histogram()["dead"] == 4
    with pytest.raises(ValueError, match="bins"):
        metric.histogram(bins=0)


def test_downstream_ce_matches_numpy() -> None:
    data = _data()
    metric = DownstreamCE()
    for b in _batches(data):
        metric.update(b["nll_clean"], b["nll_sae"].float(), b["nll_zero"].bfloat16())
    # The reference sees the same rounded inputs; the metric must add them up without further loss.
    clean = float(np.mean(data["nll_clean"]))
    sae = float(torch.from_numpy(data["nll_sae"]).float().double().mean())
    zero = float(torch.from_numpy(data["nll_zero"]).bfloat16().double().mean())
    out = metric.compute()
    assert set(out) == {"ce_clean", "ce_sae", "ce_zero", "ce_degradation", "loss_recovered"}
    assert float(out["ce_clean"]) == pytest.approx(clean, rel=1e-12)
    assert float(out["ce_sae"]) == pytest.approx(sae, rel=1e-12)
    assert float(out["ce_zero"]) == pytest.approx(zero, rel=1e-12)
    assert float(out["ce_degradation"]) == pytest.approx(sae - clean, rel=1e-12)
    assert float(out["loss_recovered"]) == pytest.approx((zero - sae) / (zero - clean), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_summed_in_float64(dtype: torch.dtype) -> None:
    data = _data()
    batches = [{k: v.to(dtype) for k, v in b.items()} for b in _batches(data)]
    exact = {k: torch.cat([b[k] for b in batches]).double().numpy() for k in ("x", "x_hat", "z")}
    mse, ev, l0 = ReconstructionMSE(), ExplainedVariance(), L0(TOL)
    for b in batches:
        mse.update(b["x"], b["x_hat"])
        ev.update(b["x"], b["x_hat"])
        l0.update(b["z"])
    assert float(mse.compute()) == pytest.approx(_np_mse(exact["x"], exact["x_hat"]), rel=1e-12)
    assert float(ev.compute()) == pytest.approx(_np_ev(exact["x"], exact["x_hat"]), rel=1e-10)
    assert float(l0.compute()) == pytest.approx((np.abs(exact["z"]) > TOL).sum(1).mean(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_l0_tolerance_is_exact_in_low_precision(dtype: torch.dtype) -> None:
    # Representable neighbours of the tolerance: a naive `abs > tol` in the input dtype rounds tol first.
    t = torch.tensor(TOL, dtype=dtype)
    below, above = torch.nextafter(t, t.new_tensor(0.0)), torch.nextafter(t, t.new_tensor(1.0))
    values = torch.stack([below, t, above, -above]).reshape(1, 4)
    expected = sum(abs(float(v)) > TOL for v in values.flatten())
    assert float(L0(TOL)(values)) == expected


# --- bundle ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["relu", "topk"])
def test_sae_metrics_bundle(family: str) -> None:
    model = make_sae(family)
    x = sparse_dictionary_data(96).reshape(3, 32, D_IN)  # leading dims are flattened
    bundle, dense_bundle = SAEMetrics(D_SAE).to("cpu"), SAEMetrics(D_SAE, d_in=D_IN)
    with torch.no_grad():
        for chunk in (x[:1], x[1:]):
            output = model.run(chunk)
            bundle.update(chunk, output)
            dense = Latents(output.latents.dense(D_SAE), None)
            dense_bundle.update(chunk.reshape(-1, D_IN), output._replace(latents=dense))
        output = model.run(x)
    result = bundle.compute()
    assert tuple(result) == SAEMetrics.KEYS and all(isinstance(v, float) for v in result.values())
    assert result == pytest.approx(dense_bundle.compute(), rel=1e-12)
    np.testing.assert_array_equal(bundle.density().numpy(), dense_bundle.density().numpy())

    xs, x_hat = x.reshape(-1, D_IN).double().numpy(), output.x_hat.double().numpy()
    z = output.latents.dense(D_SAE).double().numpy()
    assert result["mse"] == pytest.approx(_np_mse(xs, x_hat), rel=1e-6)
    assert result["mse_per_element"] == pytest.approx(result["mse"] / D_IN, rel=1e-12)
    assert result["explained_variance"] == pytest.approx(_np_ev(xs, x_hat), rel=1e-6)
    assert result["fvu"] == pytest.approx(1 - result["explained_variance"], rel=1e-12)
    assert result["l0"] == pytest.approx((z != 0).sum(1).mean(), rel=1e-12)
    assert result["l0_tolerance"] == pytest.approx((np.abs(z) > 1e-6).sum(1).mean(), rel=1e-12)
    assert result["alive_fraction"] == pytest.approx(((z != 0).sum(0) > 0).mean(), rel=1e-12)
    assert bundle.density_histogram(bins=5)["live"] == int(((z != 0).sum(0) > 0).sum())

    bundle.reset()
    with torch.no_grad():
        bundle.update(x, output)
    again = bundle.compute()
    del again["explained_variance_legacy"], result["explained_variance_legacy"]  # depends on batching
    assert again == pytest.approx(result, rel=1e-12)


# --- bad inputs ------------------------------------------------------------------------------------------
X, X_HAT = torch.randn(4, 3), torch.randn(4, 3)
NAN = torch.tensor([[0.0, float("nan"), 1.0]]).expand(4, 3)


@pytest.mark.parametrize(
    ("metric", "args", "match"),
    [
        (ReconstructionMSE(), (X, X_HAT[:, :2]), r"ReconstructionMSE: .*x \(4, 3\), x_hat \(4, 2\)"),
        (ExplainedVariance(), (X, X_HAT[:3]), r"ExplainedVariance: .*same shape"),
        (ExplainedVariance(d_in=5), (X, X_HAT), r"ExplainedVariance: x has width 3 .*d_in=5"),
        (
            FractionOfVarianceUnexplained(),
            (X, NAN),
            r"FractionOfVarianceUnexplained: NaN or Inf in x_hat \(shapes \(4, 3\)\)",
        ),
        (LegacyExplainedVariance(), (X[:1], X_HAT[:1]), r"LegacyExplainedVariance: needs at least 2 tokens"),
        (ReconstructionMSE(), (X[0], X_HAT[0]), r"ReconstructionMSE: expected x of shape \[N, width\]"),
        (L0(), (torch.tensor([[1.0, float("inf")]]),), r"L0: NaN or Inf in values"),
        (FeatureDensity(3), (torch.ones(2, 4),), r"FeatureDensity: dense values must be \[N, d_sae=3\]"),
        (FeatureDensity(8), (torch.ones(2, 2), torch.zeros(2, 3, dtype=torch.long)), r"values \(2, 2\), indices"),
        (AliveFraction(8), (torch.ones(2, 2), torch.full((2, 2), 8)), r"AliveFraction: indices must lie in \[0, d_sae"),
        (FeatureDensity(8), (torch.ones(2, 2), torch.ones(2, 2)), r"indices must be an integer tensor"),
        (DownstreamCE(), (torch.ones(3), torch.ones(3), torch.ones(2)), r"DownstreamCE: .*nll_zero \(2,\)"),
        (DownstreamCE(), (torch.ones(2, 3),) * 3, r"DownstreamCE: expected three 1-D"),
        (DownstreamCE(), (torch.ones(3), torch.full((3,), math.inf), torch.ones(3)), r"NaN or Inf in nll_sae "),
    ],
)
def test_bad_inputs_raise(metric: Any, args: tuple[torch.Tensor, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        metric.update(*args)


def test_bad_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        L0(-1.0)
    with pytest.raises(ValueError, match="d_sae"):
        FeatureDensity(0)
    model = make_sae("relu")
    x = sparse_dictionary_data(8)
    with torch.no_grad():
        output = model.run(x)
    with pytest.raises(ValueError, match="different token counts"):
        SAEMetrics(D_SAE).update(x[:4], output)


# --- DDP -------------------------------------------------------------------------------------------------
def _ddp_metrics() -> dict[str, Any]:
    return {
        "mse": ReconstructionMSE(),
        "mse_per_element": ReconstructionMSE(per_element=True),
        "ev": ExplainedVariance(),
        "ev_idle_rank": ExplainedVariance(d_in=16),  # only rank 0 updates it: needs d_in
        "fvu": FractionOfVarianceUnexplained(),
        "legacy": LegacyExplainedVariance(),
        "l0": L0(),
        "l0_tol": L0(TOL),
        "density": FeatureDensity(N_LATENTS),
        "alive": AliveFraction(N_LATENTS),
        "ce": DownstreamCE(),
    }


def _feed(metrics: dict[str, Any], batch: dict[str, torch.Tensor], idle: bool) -> None:
    for name in ("mse", "mse_per_element", "ev", "fvu", "legacy") + (() if idle else ("ev_idle_rank",)):
        metrics[name].update(batch["x"], batch["x_hat"])
    metrics["l0"].update(batch["z"])
    metrics["l0_tol"].update(_sparse(batch["z"]).values)
    metrics["density"].update(*_sparse(batch["z"]))
    metrics["alive"].update(batch["z"])
    metrics["ce"].update(batch["nll_clean"], batch["nll_sae"], batch["nll_zero"])


def _results(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, metric in metrics.items():
        value = metric.compute()
        if isinstance(value, dict):
            out.update({f"{name}.{k}": float(v) for k, v in value.items()})
        else:
            out[name] = value.tolist()
    out["histogram"] = metrics["density"].histogram(bins=7)
    return out


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        metrics = _ddp_metrics()
        for i, batch in enumerate(_batches(_data())):
            if i % world_size == rank:  # disjoint halves of unequal size (7 + 2 vs 64 + 33 tokens)
                _feed(metrics, batch, idle=rank != 0)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(_results(metrics)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_ddp_two_ranks_match_single_process(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    single = _ddp_metrics()
    for i, batch in enumerate(_batches(_data())):
        _feed(single, batch, idle=i % 2 == 1)
    expected = _results(single)
    for rank in range(2):
        got = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if key == "histogram":
                assert got[key]["counts"] == value["counts"] and got[key]["dead"] == value["dead"], key
                np.testing.assert_allclose(got[key]["log10_density_edges"], value["log10_density_edges"], rtol=1e-12)
            else:
                np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)


def test_empty_batches_change_nothing() -> None:
    # A batch whose every position was masked (BOS/PAD only) must be a no-op, not a NaN or an error.
    batch = _batches(_data())[0]
    metrics, reference = _ddp_metrics(), _ddp_metrics()
    _feed(metrics, {k: v[:0] for k, v in batch.items()}, idle=False)
    for m in (metrics, reference):
        _feed(m, batch, idle=False)
    assert _results(metrics) == _results(reference)


@pytest.mark.parametrize("family", ["relu", "topk"])
def test_l0_gate_band_counts_a_pure_gate_at_its_own_scale(family: str) -> None:
    """A pure RSAE is never exactly zero: its exact L0 is the width, while `l0_gate_band` counts the codes above
    threshold_eps * |C_out_i|, per latent (dense codes, or TopK's selected ones), read from the model at each
    update; baselines and masked RSAEs have no band and report their exact L0."""
    from rsae.nn.rational_sae import RSAE

    x = sparse_dictionary_data(96)
    teacher = make_sae(family)
    pure = RSAE.from_teacher(teacher, mode="pure", degree=(3, 2), activations=x)
    with torch.no_grad():
        pure.gate.scale_out.copy_(torch.linspace(0.5, 2.0, D_SAE))  # a band that differs per latent
    for model, band in ((pure, pure.gate_band()), (teacher, None), (RSAE.from_teacher(teacher), None)):
        bundle = SAEMetrics(D_SAE, d_in=D_IN, zero_band=model.zero_band)
        with torch.no_grad():
            output = model.run(x)
            bundle.update(x, output)
        z = output.latents.dense(D_SAE).abs()
        result = bundle.compute()
        expected = (z > (0 if band is None else band)).sum(1).double().mean()
        assert result["l0_gate_band"] == pytest.approx(float(expected), rel=1e-12)
        if band is None:
            assert result["l0_gate_band"] == result["l0"]
        else:
            assert result["l0_gate_band"] < result["l0"]
