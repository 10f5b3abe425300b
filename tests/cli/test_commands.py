"""The argparse commands through `rsae.cli.main`, as a user runs them: output, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsae.cli import main
from rsae.eval.report import make_report, write_report

from helpers import make_sae

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_remez_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["remez", "--target", "jumprelu", "--degree", "5", "4", "--gap", "0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ["target", "degree", "threshold", "gap", "max_error", "fine_max_error", "min_q", "grid_points",
                "seconds", "iterations", "numerator", "denominator"]:
        assert key in out
    assert out["degree"] == [5, 4] and out["gap"] == 0.1 and len(out["numerator"]) == 6


def test_remez_summary_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "fit.png"
    assert main(["remez", "--target", "topk", "--degree", "3", "2", "--threshold", "0.3", "--plot", str(png)]) == 0
    assert "max_error" in capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_errors_are_one_line_with_exit_2_and_traceback_on_debug(capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    bad = ["remez", "--target", "jumprelu", "--degree", "3", "2", "--threshold", "1.5"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsae remez: error: ") and "(0, 1)" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        main([*bad, "--debug"])
    monkeypatch.setenv("RSAE_DEBUG", "1")
    with pytest.raises(ValueError):
        main(bad)
    with pytest.raises(SystemExit):  # argparse's own usage error for an unknown choice
        main(["remez", "--target", "gelu", "--degree", "3", "2"])


def test_cache_error_names_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["cache", "--out", str(tmp_path / "c"), "--model", str(tmp_path / "missing-model"),
                 "--dtype", "float16"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rsae cache: error: cannot load language model")
    assert len(err.strip().splitlines()) == 1


def test_compare_labels_runs_by_their_distinct_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_report("a", make_sae("relu"), {"mse": 1.0, "l0": 10.0}, {})
    b = make_report("b", make_sae("relu"), {"mse": 2.0, "l0": 5.0, "ce_sae": 2.5}, {})
    write_report(a, tmp_path / "a")
    write_report(b, tmp_path / "b")
    plot = tmp_path / "plots" / "mse_vs_l0.png"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b" / "report.json"), "--plot", str(plot),
                 "--metrics", "mse,l0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["metric", "a", "b"] and len(out) == 4
    assert plot.read_bytes().startswith(PNG_MAGIC)
    # Every stage exports a folder named `sae`: the columns are told apart by the rest of their paths.
    same = make_report("sae", make_sae("relu"), {"mse": 1.0}, {})
    for stage in ("teacher", "control"):
        write_report(same, tmp_path / "runs" / stage / "sae")
    assert main(["compare", str(tmp_path / "runs" / "teacher" / "sae"), str(tmp_path / "runs" / "control" / "sae"),
                 str(tmp_path / "runs" / "control" / "sae")]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["metric", "teacher", "control", "control", "(2)"]
    assert main(["compare", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("rsae compare: error: no report")


def test_hooks_lists_every_hook_point(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from rsae.cli import hooks

    from helpers import tiny_lm

    monkeypatch.setattr(hooks, "load_lm", lambda spec, verbose: tiny_lm(n_layers=2))
    assert main(["hooks", "tiny", "--grep", "resid_post"]) == 0
    assert capsys.readouterr().out.split() == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_quiet_lightning_prints_device_lines_once_and_restores_everything() -> None:
    import logging
    import warnings

    from rsae.cli.lightning import quiet_lightning

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    filters = list(warnings.filters)
    try:
        with quiet_lightning():
            for _ in range(3):
                logger.info("GPU available: False, used: False")
            logger.info("💡 Tip: something to buy")
        logger.info("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert records == ["GPU available: False, used: False"] * 2
    assert warnings.filters == filters


def test_import_and_export_commands_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    import rsae

    teacher = make_sae("jumprelu")
    rsae.save(teacher, tmp_path / "teacher")
    assert main(["export", str(tmp_path / "teacher"), str(tmp_path / "saelens"), "--format", "saelens"]) == 0
    assert "SAELens folder" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "saelens").iterdir()} >= {"cfg.json", "sae_weights.safetensors"}
    assert main(["import", str(tmp_path / "saelens"), str(tmp_path / "back")]) == 0
    assert "imported a saelens jumprelu SAE" in capsys.readouterr().out
    x = torch.randn(16, teacher.cfg.d_in)
    torch.testing.assert_close(rsae.load(tmp_path / "back")(x), teacher(x))
    assert main(["import", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("rsae import: error: ")
