"""Training stages on a tiny cache: learning, export, calibration, fine-tuning, resume equality, CLI and DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml

import rsae
from rsae.cli import main
from rsae.data.datamodule import ActivationDataModule
from rsae.eval.test_run import EvalConfig
from rsae.train.modules import TRAINED_SPARSITY, Evaluation, FineTuning, GateCalibration, TeacherTraining
from rsae.train.remez_init import RemezInit

from helpers import D_IN, HOOK, dictionary_cache

NO_CE = EvalConfig(ce_sequences=0)
TESTS = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("small_cpu_settings")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(dictionary_cache(tmp_path_factory.mktemp("training") / "cache"))


def datamodule(cache: str, normalize: bool = True, batch_size: int = 256) -> ActivationDataModule:
    return ActivationDataModule(cache, batch_size=batch_size, val_shards=1, test_shards=1, normalize=normalize,
                                verify="header")


def linked(dm: ActivationDataModule) -> dict[str, Any]:
    return {"d_in": dm.d_in, "hook_name": dm.hook_name, "model_name": dm.model_name}


def fit(module: pl.LightningModule, dm: ActivationDataModule, root: Path, steps: int, **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=steps, default_root_dir=str(root), logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, **kwargs)
    trainer.fit(module, datamodule=dm)
    return trainer


def held_out_metrics(module: pl.LightningModule, dm: ActivationDataModule, root: Path) -> dict[str, float]:
    trainer = pl.Trainer(default_root_dir=str(root), logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    return {k.removeprefix("test/"): v for k, v in trainer.test(module, datamodule=dm, verbose=False)[0].items()}


@pytest.fixture(scope="module")
def teacher(cache: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TopK teacher trained on normalised activations and exported for raw ones."""
    root = tmp_path_factory.mktemp("teacher")
    dm = datamodule(cache)
    module = TeacherTraining(family="topk", d_sae=128, k=4, lr=3e-3, warmup_steps=5, export_dir=str(root / "sae"),
                             evaluation=NO_CE, **linked(dm))
    fit(module, dm, root, 80)
    return root / "sae"


def test_teacher_learns_and_exports_for_raw_activations(cache: str, teacher: Path, tmp_path: Path) -> None:
    dm = datamodule(cache)
    exported = rsae.load(teacher)
    assert exported.input_scale == 1.0 and exported.cfg.hook_name == HOOK and exported.cfg.d_in == D_IN
    metrics = held_out_metrics(Evaluation(checkpoint=str(teacher), evaluation=NO_CE, **linked(dm)), dm, tmp_path)
    assert metrics["explained_variance"] > 0.8 and metrics["l0"] == 4.0
    # The exported (raw-scale) SAE and the same weights refolded to the data's scale agree.
    x = next(iter(datamodule(cache, normalize=False).test_dataloader()))
    refolded = rsae.load(teacher)
    refolded.set_input_scale(dm.norm_factor)
    torch.testing.assert_close(refolded(x * dm.norm_factor) / dm.norm_factor, exported(x), rtol=1e-4, atol=1e-4)
    # A stage's export folder is named `sae`: the run is named after the stage's folder.
    report = json.loads((tmp_path / "reports" / teacher.parent.name / "report.json").read_text())
    assert report["name"] == teacher.parent.name
    assert report["metrics"]["l0"] == 4.0 and report["data"]["hook_name"] == HOOK


def test_b_dec_starts_at_the_data_mean(cache: str, tmp_path: Path) -> None:
    dm = datamodule(cache, normalize=False, batch_size=1024)
    module = TeacherTraining(family="relu", d_sae=64, lr=1e-12, warmup_steps=1, evaluation=NO_CE, **linked(dm))
    first = next(iter(dm.train_dataloader()))  # epoch 0's first batch, as the fit will read it
    fit(module, dm, tmp_path, 1)
    torch.testing.assert_close(module.sae.b_dec.detach(), first.mean(0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["relu", "jumprelu"])
def test_decoder_handling_per_family(cache: str, tmp_path: Path, family: str) -> None:
    dm = datamodule(cache)
    module = TeacherTraining(family=family, d_sae=64, lr=3e-3, sparsity_coefficient=1e-2, jumprelu_bandwidth=0.05,
                             jumprelu_init_threshold=0.05, evaluation=NO_CE, **linked(dm))
    trainer = fit(module, dm, tmp_path, 20)
    norms = module.sae.W_dec.detach().norm(dim=-1)
    if family == "jumprelu":  # unit-norm rows
        torch.testing.assert_close(norms, torch.ones_like(norms))
    else:  # the norm-weighted L1 leaves norms free
        assert (norms - 1).abs().max() > 1e-3
    assert "train/sparsity" in trainer.callback_metrics


def test_calibration_stage_adds_remez_init_and_reproduces_the_teacher(cache: str, teacher: Path, tmp_path: Path
                                                                     ) -> None:
    dm = datamodule(cache)
    module = GateCalibration(teacher=str(teacher), mode="masked", export_dir=str(tmp_path / "init"),
                             calibration_tokens=1024, evaluation=NO_CE, **linked(dm))
    trainer = fit(module, dm, tmp_path, 3)
    remez = [c for c in trainer.callbacks if isinstance(c, RemezInit)]
    assert len(remez) == 1 and remez[0].report is not None and not remez[0].skipped
    _, gate = module.trainable_parameters()
    assert gate and all(not p.requires_grad for n, p in module.sae.named_parameters() if not n.startswith("gate."))
    init = held_out_metrics(Evaluation(checkpoint=str(tmp_path / "init"), evaluation=NO_CE, **linked(dm)), dm, tmp_path)
    base = held_out_metrics(Evaluation(checkpoint=str(teacher), evaluation=NO_CE, **linked(dm)), dm, tmp_path)
    # masked: the gate starts exact, and calibration must not move it (rounding noise is not a signal)
    assert init["mse"] == pytest.approx(base["mse"], rel=1e-6) and init["l0"] == base["l0"]


def test_pure_calibration_lowers_the_gate_loss(cache: str, teacher: Path, tmp_path: Path) -> None:
    dm = datamodule(cache)
    module = GateCalibration(teacher=str(teacher), mode="pure", calibration_tokens=1024, lr=1e-3, evaluation=NO_CE,
                             **linked(dm))
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            losses.append(float(trainer.callback_metrics["train/loss"]))

    fit(module, dm, tmp_path, 30, callbacks=[Record()])
    assert losses[-1] < losses[0]


def test_pure_calibration_of_a_jumprelu_teacher(cache: str, tmp_path: Path) -> None:
    dm = datamodule(cache)
    module = TeacherTraining(family="jumprelu", d_sae=64, lr=3e-3, sparsity_coefficient=1e-3,
                             jumprelu_bandwidth=0.05, jumprelu_init_threshold=0.05, export_dir=str(tmp_path / "t"),
                             evaluation=NO_CE, **linked(dm))
    fit(module, dm, tmp_path, 10)
    calibration = GateCalibration(teacher=str(tmp_path / "t"), mode="pure", calibration_tokens=512, evaluation=NO_CE,
                                  export_dir=str(tmp_path / "pure"), **linked(dm))
    fit(calibration, dm, tmp_path, 2)  # the pure RSAE has no threshold parameter, unlike a masked JumpReLU one
    assert rsae.load(tmp_path / "pure").cfg.mode == "pure" and not hasattr(calibration.sae, "threshold")


def test_finetuning_has_a_gate_learning_rate_and_the_control_is_the_teacher(cache: str, teacher: Path,
                                                                            tmp_path: Path) -> None:
    dm = datamodule(cache)
    rsae_init = rsae.RSAE.from_teacher(rsae.load(teacher))
    rsae.save(rsae_init, tmp_path / "init")
    tuned = FineTuning(init=str(tmp_path / "init"), lr=1e-4, gate_lr=1e-2, export_dir=str(tmp_path / "rsae"),
                       evaluation=NO_CE, **linked(dm))
    control = FineTuning(init=str(teacher), lr=1e-4, gate_lr=1e-2, export_dir=str(tmp_path / "control"),
                         evaluation=NO_CE, **linked(dm))
    for module in (tuned, control):
        trainer = fit(module, dm, tmp_path, 15)
        groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
        assert groups["weights"]["initial_lr"] == 1e-4
    assert groups.keys() == {"weights"} and control.run_name() == "topk-control"
    assert {g["name"]: g["initial_lr"] for g in tuned.trainer.optimizers[0].param_groups} == {"weights": 1e-4,
                                                                                            "gate": 1e-2}
    assert not torch.equal(rsae.load(tmp_path / "rsae").gate.scale_out, rsae_init.gate.scale_out)


def test_mismatched_data_is_refused(cache: str, teacher: Path) -> None:
    with pytest.raises(ValueError, match="d_in=16"):
        FineTuning(init=str(teacher), d_in=16, hook_name=HOOK)
    with pytest.raises(FileNotFoundError, match="rsae fit"):
        FineTuning(init="/nonexistent/sae")


# --- the CLI -------------------------------------------------------------------------------------


def write_config(path: Path, cache: str, run: Path, model: dict[str, Any], steps: int = 24,
                 callbacks: list[dict[str, Any]] | None = None) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": steps, "default_root_dir": str(run), "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "accelerator": "cpu",
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True,
                                                 "every_n_train_steps": 5}}, *(callbacks or [])]},
        "model": model,
        "data": {"cache": cache, "batch_size": 256, "val_shards": 1, "test_shards": 1, "verify": "header"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def teacher_model(run: Path) -> dict[str, Any]:
    return {"class_path": "rsae.train.modules.TeacherTraining",
            "init_args": {"family": "topk", "d_sae": 64, "k": 4, "lr": 3e-3, "warmup_steps": 3,
                          "export_dir": str(run / "sae"), "evaluation": {"ce_sequences": 0}}}


def test_cli_fit_test_validate_and_print_config(cache: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "fit.yaml", cache, run, teacher_model(run))
    assert main(["fit", "--config", str(config)]) == 0
    assert rsae.load(run / "sae").cfg.d_in == D_IN  # linked from the data, not typed in the config
    evaluate = {"class_path": "rsae.train.modules.Evaluation",
                "init_args": {"checkpoint": str(run / "sae"), "name": "cli",
                              "evaluation": {"ce_sequences": 0, "report_dir": str(tmp_path / "report")}}}
    evaluate_config = str(write_config(tmp_path / "test.yaml", cache, run, evaluate))
    assert main(["test", "--config", evaluate_config]) == 0
    assert main(["validate", "--config", evaluate_config]) == 0
    assert json.loads((tmp_path / "report" / "report.json").read_text())["name"] == "cli"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    assert "TeacherTraining" in capsys.readouterr().out


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "RSAE_COMPILE": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rsae.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_killed_fit_resumed_with_ckpt_path_last_ends_with_the_same_weights(cache: str, tmp_path: Path) -> None:
    # 24 steps cross the epoch boundary (12 batches of 256 rows per epoch); the kill lands mid-epoch 1.
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_cli("fit", "--config", str(write_config(tmp_path / "a.yaml", cache, straight, teacher_model(straight))))
    assert done.returncode == 0, done.stderr[-3000:]
    kill = [{"class_path": "helpers.KillAt", "init_args": {"step": 17}}]
    config = write_config(tmp_path / "b.yaml", cache, killed, teacher_model(killed), callbacks=kill)
    first = run_cli("fit", "--config", str(config))
    assert first.returncode == 3 and not (killed / "sae").exists()
    resume = write_config(tmp_path / "c.yaml", cache, killed, teacher_model(killed))
    second = run_cli("fit", "--config", str(resume), "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = rsae.load(straight / "sae").state_dict(), rsae.load(killed / "sae").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_ranks_read_disjoint_data_and_end_with_identical_weights(tmp_path: Path) -> None:
    cache = str(dictionary_cache(tmp_path / "cache", rows_per_shard=256, row_ids=True))
    run = tmp_path / "ddp"
    record = [{"class_path": "helpers.RecordRows", "init_args": {"out": str(run / "record")}}]
    model = teacher_model(run)
    config = write_config(tmp_path / "ddp.yaml", cache, run, model, steps=8, callbacks=record)
    done = run_cli("fit", "--config", str(config), "--trainer.strategy", "ddp", "--trainer.devices", "2",
                   "--data.batch_size", "64")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((run / "record" / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    rows = [set(r["rows"]) for r in ranks]
    assert len(ranks[0]["rows"]) == len(rows[0]) == 8 * 64 and not rows[0] & rows[1]


def test_evaluation_refuses_non_finite_activations_naming_the_batch(teacher: Path) -> None:
    module = Evaluation(checkpoint=str(teacher), evaluation=NO_CE)
    x = torch.randn(64, D_IN)
    x[5, 3] = float("nan")
    x[9, 0] = float("inf")
    with pytest.raises(ValueError, match=r"test batch 7 holds NaN/Inf activations in 2 of 64 rows"):
        module.test_step(x, 7)
    with pytest.raises(ValueError, match=r"validation batch 0 holds NaN/Inf"):
        module.validation_step((x, torch.zeros(64)), 0)


def test_fit_errors_are_one_line_with_exit_2(cache: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "fit.yaml", str(tmp_path / "no-cache"), run, teacher_model(run))
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rsae fit: error: ") and "no activation cache" in err and "rsae cache" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(Exception, match="no activation cache"):
        main(["fit", "--config", str(config), "--debug"])


def test_step_progress_bar_shows_the_step_budget() -> None:
    from types import SimpleNamespace

    from rsae.train.progress import StepProgressBar

    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=2000, global_step=1200, max_epochs=None)
    assert bar._get_train_description(2) == "Epoch 2 · step 1200/2000"
    bar._trainer = SimpleNamespace(max_steps=-1, global_step=5, max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def test_l0_controller_holds_the_starting_l0_where_the_fixed_coefficient_drifts(cache: str, tmp_path: Path) -> None:
    """Fine-tuning a ReLU teacher with another sparsity coefficient than it was trained with moves L0 far from
    where it started; with target_l0='initial' the controller scales the coefficient until L0 stays there."""
    dm = datamodule(cache)
    teacher = TeacherTraining(family="relu", d_sae=128, lr=3e-3, warmup_steps=5, sparsity_coefficient=10.0,
                              export_dir=str(tmp_path / "teacher" / "sae"), evaluation=NO_CE, **linked(dm))
    fit(teacher, dm, tmp_path / "teacher", 60)
    runs = {}
    for name, target in (("free", None), ("held", "initial")):
        module = FineTuning(init=str(tmp_path / "teacher" / "sae"), lr=3e-3, warmup_steps=1, sparsity_coefficient=0.5,
                            target_l0=target, l0_controller_gain=0.5, evaluation=NO_CE, **linked(dm))
        fit(module, dm, tmp_path / name, 120)
        runs[name] = module
    start = float(runs["held"].l0_target_value)
    held = held_out_metrics(runs["held"], dm, tmp_path / "held-test")["l0"]
    free = held_out_metrics(runs["free"], dm, tmp_path / "free-test")["l0"]
    assert abs(free - start) > 0.3 * start  # the drift the controller exists for
    assert abs(held - start) < 0.1 * start and float(runs["held"].sparsity_log_multiplier) != 0
    with pytest.raises(ValueError, match="target_l0"):
        FineTuning(init=str(tmp_path / "teacher" / "sae"), target_l0=-3, **linked(dm))


def test_a_teacher_held_at_a_target_l0_records_the_coefficient_its_fine_tuning_continues_with(
        cache: str, tmp_path: Path) -> None:
    """From scratch a ReLU SAE fires on about half its latents; the controller (after the sparsity warm-up) brings
    L0 to the target, and the export records the coefficient it arrived at for the fine-tuning stages."""
    dm = datamodule(cache)
    teacher = TeacherTraining(family="relu", d_sae=128, lr=3e-3, warmup_steps=5, sparsity_coefficient=0.5,
                              sparsity_warmup_steps=10, target_l0=8,
                              export_dir=str(tmp_path / "teacher" / "sae"), evaluation=NO_CE, **linked(dm))
    fit(teacher, dm, tmp_path / "teacher", 300)
    assert held_out_metrics(teacher, dm, tmp_path / "test")["l0"] == pytest.approx(8, rel=0.3)
    trained = teacher.trained_sparsity_coefficient()
    assert trained > 2 * 0.5  # the controller raised it
    recorded = rsae.load(tmp_path / "teacher" / "sae").cfg.extra[TRAINED_SPARSITY]
    assert recorded == pytest.approx(trained)
    assert FineTuning(init=str(tmp_path / "teacher" / "sae"), **linked(dm)).sparsity_coefficient == recorded
    assert FineTuning(init=str(tmp_path / "teacher" / "sae"), sparsity_coefficient=0.5,
                      **linked(dm)).sparsity_coefficient == 0.5
    imported = rsae.save(rsae.load(tmp_path / "teacher" / "sae"), tmp_path / "imported")
    cfg = json.loads((imported / "cfg.json").read_text())
    del cfg["extra"][TRAINED_SPARSITY]
    (imported / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="records no trained sparsity coefficient.*sparsity_coefficient"):
        FineTuning(init=str(imported), **linked(dm))


def test_jumprelu_thresholds_have_their_own_learning_rate(cache: str, tmp_path: Path) -> None:
    dm = datamodule(cache)
    moved = {}
    for threshold_lr in (0.0, 0.05):
        module = TeacherTraining(family="jumprelu", d_sae=64, lr=1e-3, threshold_lr=threshold_lr,
                                 sparsity_coefficient=1e-2, warmup_steps=1, evaluation=NO_CE, **linked(dm))
        start = module.sae.threshold.detach().clone()
        fit(module, dm, tmp_path / str(threshold_lr), 5)
        moved[threshold_lr] = float((module.sae.threshold.detach() - start).abs().max())
    assert moved[0.0] == 0.0 and moved[0.05] > 0.05  # Adam moves about lr per step
