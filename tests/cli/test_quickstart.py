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
