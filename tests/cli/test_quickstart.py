"""`rsae quickstart` end to end on the real model, shrunk to a few thousand tokens; then the resume path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsae.cli import main

SMALL = ["--n-tokens", "12800", "--d-sae", "512", "--k", "16", "--teacher-epochs", "3", "--finetune-epochs", "1",
         "--batch-size", "1024", "--ce-sequences", "8"]
RUNS = ("teacher", "rsae-init", "rsae", "control")


@pytest.mark.real_model
def test_quickstart_runs_every_stage_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), *SMALL]) == 0
    table = capsys.readouterr().out
    for text in ("metric", "explained_variance", "loss_recovered", *RUNS):
        assert text in table
    metrics = {run: json.loads((out / "reports" / run / "report.json").read_text())["metrics"] for run in RUNS}
    # The masked RSAE starts as its teacher; the LM is real (clean CE of English text).
    assert metrics["rsae-init"]["mse"] == pytest.approx(metrics["teacher"]["mse"], rel=1e-3)
    assert 2.3 < metrics["teacher"]["ce_clean"] < 4.5
    assert all(m["l0"] == 16 and 0 < m["loss_recovered"] <= 1.0 for m in metrics.values())
    for plot in ("training_curves.png", "mse_vs_l0.png", "reports/rsae/gate_shapes.png"):
        assert (out / plot).stat().st_size > 0

    assert main(["quickstart", "--out", str(out), *SMALL]) == 0  # a second run reuses cache and stages
    again = capsys.readouterr().out
    assert "nothing to do" in again and all(f"[{run}] done already" in again for run in RUNS)


def test_print_configs_shows_each_stage_as_its_yaml_with_the_flags_applied(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from rsae.cli.quickstart import config_file

    assert main(["quickstart", "--print-configs", "--out", str(tmp_path / "qs"), "--family", "relu",
                 "--sparsity", "3", "--mode", "thresholded", "--n-tokens", "40960", "--batch-size", "1024"]) == 0
    out = capsys.readouterr().out
    blocks = [b for b in out.split("# ") if b.strip()]
    headers = [b.splitlines()[0] for b in blocks]
    assert [h.split(":")[0] for h in headers] == ["teacher", "test/teacher", "rsae-init", "test/rsae-init", "rsae",
                                                  "test/rsae", "control", "test/control"]
    assert headers[0].startswith("teacher: rsae fit --config configs/relu-teacher.yaml ")
    assert "--model.init_args.sparsity_coefficient=3.0" in headers[0] and "estimated" in headers[0]
    configs = {h.split(":")[0]: yaml.safe_load(b.split("\n", 1)[1]) for h, b in zip(headers, blocks, strict=True)}
    shipped = yaml.safe_load(config_file("relu-teacher").read_text())
    teacher = configs["teacher"]["model"]["init_args"]
    # The recipe comes from the shipped YAML; only the flags and the run's paths are overridden.
    assert teacher["lr"] == shipped["model"]["init_args"]["lr"] and teacher["sparsity_coefficient"] == 3.0
    assert teacher["warmup_steps"] == shipped["model"]["init_args"]["warmup_steps"]
    assert configs["teacher"]["trainer"]["max_steps"] == 10 * 32  # 10 epochs of 8 shards' 127/128 of 40960 tokens
    assert configs["rsae-init"]["model"]["init_args"]["mode"] == "thresholded"
    assert configs["control"]["model"]["init_args"]["init"] == str(tmp_path / "qs" / "teacher" / "sae")
    assert configs["test/rsae"]["model"]["class_path"] == "rsae.train.Evaluation"
    assert not (tmp_path / "qs").exists()  # printing runs nothing


def test_training_curves_put_the_students_after_the_teacher_on_one_axis(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from rsae.cli import quickstart
    from rsae.eval import plots

    def log(stage: str, steps: list[int], mse: bool = True) -> None:
        folder = tmp_path / stage / "logs" / "version_0"
        folder.mkdir(parents=True)
        rows = "".join(f"{s},{'1.0' if mse else ''}\n" for s in steps)
        (folder / "metrics.csv").write_text("step,train/mse\n" + rows)

    log("teacher", [9, 19, 399])
    log("rsae-init", [9], mse=False)  # the calibration logs no MSE, but its steps count
    log("rsae", [9, 159])
    log("control", [9, 159])
    drawn: dict = {}
    monkeypatch.setattr(plots, "plot_curves", lambda panels, path: drawn.update(panels))
    quickstart.plot_training_curves({s: tmp_path / s for s in RUNS}, tmp_path / "curves.png")
    curves = drawn["training MSE (normalised units)"]
    assert curves["teacher"][0] == [9, 19, 399] and "rsae-init" not in curves
    assert curves["control"][0] == [408, 558] and curves["rsae"][0] == [417, 567]
