"""`rsae study` on a tiny GPT-2-architecture LM: the grid's cells, shared caches and teachers, the results and
their frontier verdicts, resume, and bad configs refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rsae.cli import main
from rsae.cli.study import Cell, cells, read_config

from helpers import tiny_hf_lm

pytestmark = pytest.mark.usefixtures("small_cpu_settings")


def study_config(tmp_path: Path, **changes: object) -> Path:
    config = {"out": str(tmp_path / "study"),
              "pipeline": {"model": str(tiny_hf_lm(tmp_path / "lm")), "layer": 1, "n_tokens": 6400, "d_sae": 64,
                           "teacher_epochs": 2, "finetune_epochs": 1, "batch_size": 512, "ce_sequences": 4,
                           "precision": "32-true"},
              "grid": {"topk": [2, 4]}, "modes": ["masked", "thresholded"], "seeds": {"masked": [0]},
              "budgets": [{"family": "topk", "sparsity": 4, "budgets": [1, 2]}], **changes}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_grid_has_every_family_sparsity_mode_seed_and_budget_cell() -> None:
    config = {"grid": {"topk": [16, 32], "relu": [32]}, "modes": ["masked", "pure"], "seeds": {"masked": [0, 1]},
              "budgets": [{"family": "relu", "sparsity": 32, "budgets": [1, 4]}]}
    grid = cells(config)
    assert len(grid) == (2 + 1) * (2 + 1) + 2  # (sparsities) x (masked seeds + pure's one), + the 4x teachers
    assert Cell("relu", 32, "masked", 1, 4.0) in grid
    assert Cell("topk", 16, "pure", 0).teacher == Cell("topk", 16, "masked", 0).teacher == "topk-k16-s0"
    assert Cell("relu", 32, "masked", 1, 4.0).name == "relu-l0-32-s1-x4-masked"


def test_a_study_runs_its_cells_shares_teachers_and_resumes(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = study_config(tmp_path)
    assert main(["study", str(config)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "study"
    names = sorted(p.name for p in (out / "cells").iterdir())
    assert names == ["topk-k2-s0-masked", "topk-k2-s0-thresholded", "topk-k4-s0-masked", "topk-k4-s0-thresholded",
                     "topk-k4-s0-x2-masked"]
    assert sorted(p.name for p in (out / "teachers").iterdir()) == ["topk-k2-s0", "topk-k4-s0", "topk-k4-s0-x2"]
    assert printed.count("[teacher] done already") == 2  # the thresholded cells reuse the masked cells' teachers
    assert (out / "cells" / "topk-k2-s0-masked" / "cache").resolve() == (out / "cache").resolve()

    results = json.loads((out / "results.json").read_text())
    rows = {row["cell"]: row for row in results["cells"]}
    assert set(rows) == set(names)
    assert rows["topk-k4-s0-masked"]["teacher_l0"] == 4 and rows["topk-k2-s0-masked"]["control_l0"] == 2
    assert abs(rows["topk-k2-s0-masked"]["rsae_init_mse_vs_teacher"]) < 1e-3  # masked starts as its teacher
    frontier = {(v["family"], v["mode"], v["rsae_l0"]) for v in results["frontiers"]}
    assert ("topk", "masked", 2) in frontier and ("topk", "masked", 4) in frontier
    table = (out / "results.md").read_text()
    assert "RSAE MSE vs control" in table and "topk-k4-s0-x2-masked" in table

    assert main(["study", str(config)]) == 0
    assert capsys.readouterr().out.count("done already") >= len(names)


def test_bad_study_configs_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for changes, message in (({"grid": {"gated": [1]}}, "grid family 'gated'"),
                             ({"modes": ["dense"]}, "mode 'dense'"),
                             ({"pipeline": {"epochs": 3}}, "pipeline key 'epochs' is not a quickstart flag"),
                             ({"colour": "red"}, "unknown keys ['colour']")):
        config = study_config(tmp_path, **changes)
        capsys.readouterr()  # what writing the tiny LM printed
        assert main(["study", str(config)]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1
    with pytest.raises(ValueError, match="no study config"):
        read_config(tmp_path / "missing.yaml")
