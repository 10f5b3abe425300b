import json

import pytest
import torch

from rsae.eval.gate_curves import gate_curves
from rsae.eval.metrics import FeatureDensity
from rsae.eval.report import (
    REPORT_FORMAT,
    compare,
    make_report,
    plot_mse_vs_l0,
    read_report,
    write_report,
)
from rsae.nn.rational_sae import RSAE

from helpers import make_sae

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("small_cpu_settings")


def histogram_of(density: torch.Tensor) -> dict:
    metric = FeatureDensity(len(density))
    metric.fires += density.double() * 1e4
    metric.n_tokens += 1e4
    return metric.histogram()


def full_report(name: str = "relu-run", mse: float = 1.25, l0: float = 12.0) -> dict:
    model = make_sae("relu")
    metrics = {"mse": torch.tensor(mse), "mse_per_element": mse / 32, "explained_variance": 0.9, "fvu": 0.1,
               "explained_variance_legacy": 0.91, "l0": l0, "l0_tolerance": l0, "alive_fraction": 0.75,
               "ce_clean": None}
    density = torch.cat([torch.zeros(5), torch.logspace(-4, -1, 123)])
    probing = {"sae": {"sentiment": {"k=1": 0.6, "k=5": 0.7}, "mean": {"k=1": 0.6, "k=5": 0.7}},
               "lm": {"sentiment": {"k=1": 0.65, "k=5": 0.8}, "mean": {"k=1": 0.65, "k=5": 0.8}}}
    teacher = make_sae("relu")
    curves = gate_curves(RSAE.from_teacher(teacher, mode="masked"), teacher, features=3, n_points=11)
    training = {"curves": {"step": [0, 10, 20], "loss": [3.0, 2.0, 1.5], "l0": [30.0, 20.0, float("nan")]}}
    return make_report(name, model, metrics, {"hook": "blocks.3.hook_resid_post", "n_tokens": 4096},
                       checkpoint="runs/relu", density_histogram=histogram_of(density), probing=probing,
                       gate_curves=curves, training=training)


def test_round_trip_markdown_and_plots(tmp_path):
    report = full_report()
    paths = write_report(report, tmp_path / "out")
    assert set(paths) == {"json", "markdown", "density", "gate_shapes", "training"}
    assert read_report(tmp_path / "out") == report == read_report(paths["json"])
    assert json.loads(paths["json"].read_text())["format"] == REPORT_FORMAT
    assert report["density_histogram"]["dead"] == 5 and sum(report["density_histogram"]["counts"]) == 123
    assert report["training"]["curves"]["l0"][-1] is None  # NaN is not JSON
    markdown = paths["markdown"].read_text()
    for text in ("explained_variance", "0.9", "alive_fraction", "0.75", "blocks.3.hook_resid_post", "### lm",
                 "| sentiment | 0.65 | 0.8 |", "density.png"):
        assert text in markdown
    for key in ("density", "gate_shapes", "training"):
        data = paths[key].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_minimal_report_writes_no_plots(tmp_path):
    report = make_report("bare", make_sae("topk").cfg, {"mse": 1.0}, {})
    assert set(write_report(report, tmp_path)) == {"json", "markdown"}
    assert report["model"]["k"] == 4 and report["probing"] is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1.0", True, torch.ones(2)])
def test_make_report_rejects_bad_metrics(value):
    with pytest.raises(ValueError, match="metric 'mse'"):
        make_report("bad", make_sae("relu"), {"mse": value}, {})


def test_read_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no report.json"):
        read_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_report(tmp_path / "missing.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt.json is not valid JSON"):
        read_report(corrupt)
    for content, found in (({"format": "other/2"}, "'other/2'"), ({"name": "x"}, "no 'format' field"), ([], "no")):
        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=f"wrong.json has .*{found}.*{REPORT_FORMAT}"):
            read_report(wrong)


def test_compare_table(tmp_path):
    a = make_report("a", make_sae("relu"), {"mse": 1.0, "l0": 10.0, "custom": 3.0}, {})
    b = make_report("b", make_sae("relu"), {"mse": 2.0, "l0": 5.0, "ce_sae": 2.5}, {})
    table = compare([a, b]).splitlines()
    assert table[0].split() == ["metric", "a", "b"]
    rows = {line.split()[0]: line.split()[1:] for line in table[2:]}
    assert list(rows) == ["mse", "l0", "ce_sae", "custom"]  # standard order first, then the rest
    assert rows["ce_sae"] == ["-", "2.5"] and rows["custom"] == ["3", "-"]
    assert compare([a, a]).splitlines()[0].split() == ["metric", "a", "a", "(2)"]
    assert compare([a, b], markdown=True).splitlines()[0] == "| metric | a | b |"

    with pytest.raises(ValueError, match="'l0' and 'mse'"):
        plot_mse_vs_l0([make_report("x", make_sae("relu"), {"fvu": 0.1}, {})], tmp_path / "x.png")


@pytest.mark.parametrize("family", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("with_pre_acts", [False, True])
def test_gate_curves_masked_init_equals_teacher(family, with_pre_acts):
    teacher = make_sae(family)
    model = RSAE.from_teacher(teacher, mode="masked")
    pre_acts = teacher.pre_activations(torch.randn(256, 32)).detach() if with_pre_acts else None
    curves = gate_curves(model, teacher, features=5, n_points=51, pre_acts=pre_acts)
    h, learned, taught = (torch.tensor(curves[key]) for key in ("h", "model", "teacher"))
    assert h.shape == learned.shape == taught.shape == (5, 51) and len(curves["features"]) == 5
    torch.testing.assert_close(learned, taught, rtol=1e-5, atol=1e-6)
    assert (taught == 0).any() and (taught > 0).any()  # the grid shows both branches
    if with_pre_acts:  # sampled among live latents
        assert all(bool((pre_acts[:, f] > 0).any()) for f in curves["features"])


def test_gate_curves_rules():
    teacher = make_sae("jumprelu")
    curves = gate_curves(teacher, features=[0, 7], n_points=41)
    h, own = torch.tensor(curves["h"]), torch.tensor(curves["model"])
    assert curves["teacher"] is None and curves["features"] == [0, 7]
    torch.testing.assert_close(own, h * (h > 0.05))  # its own gate, jump at theta = 0.05

    topk = make_sae("topk")
    topk.cfg.extra["topk_threshold"] = 0.3
    taught = torch.tensor(gate_curves(RSAE.from_teacher(topk), topk, features=2)["teacher"])
    assert float(taught[taught > 0].min()) > 0.3

    relu = make_sae("relu")
    pure = RSAE.from_teacher(relu, mode="pure")
    curves = gate_curves(pure, relu, features=4, n_points=21)
    h = torch.tensor(curves["h"])
    learned = torch.tensor(curves["model"])
    assert (learned[h < 0] != 0).any()  # pure: phi everywhere, never an exact zero rule
    assert (learned - torch.tensor(curves["teacher"])).abs().max() < 0.2 * h.abs().max()
    with pytest.raises(ValueError, match="features"):
        gate_curves(pure, features=[128])


@pytest.mark.parametrize(("family", "mode"), [("jumprelu", "masked"), ("jumprelu", "pure"), ("relu", "thresholded")])
def test_gate_curves_match_forward(family, mode):
    """The plotted curve is what the model's forward does to each latent (pointwise families)."""
    teacher = make_sae(family)
    model = RSAE.from_teacher(teacher, mode=mode)
    model.gate.fast = False
    curves = gate_curves(model, teacher, features=4, n_points=61)
    h = torch.tensor(curves["h"])
    dense = torch.zeros(h.shape[1], model.cfg.d_sae)
    dense[:, curves["features"]] = h.T
    with torch.no_grad():
        z = model.activate(dense).dense(model.cfg.d_sae)[:, curves["features"]].T
    torch.testing.assert_close(torch.tensor(curves["model"]), z)


def test_compare_marks_runs_far_from_the_reference_l0_as_not_comparable() -> None:
    teacher = make_report("teacher", make_sae("relu"), {"mse": 10.0, "l0": 32.0}, {})
    close = make_report("rsae", make_sae("relu"), {"mse": 9.0, "l0": 34.0}, {})
    dense = make_report("pure", make_sae("relu"), {"mse": 2.0, "l0": 128.0}, {})
    table = compare([teacher, close, dense], ["mse", "l0"], l0_reference=0).splitlines()
    assert table[-1].split(None, 3) == ["comparable_l0", "yes", "yes", "NO (L0 +300%)"]
    assert "comparable_l0" not in compare([teacher, dense], ["mse"])
