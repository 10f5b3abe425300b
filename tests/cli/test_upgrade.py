"""`rsae upgrade` end to end, offline: a tiny random GPT-2 saved as a local Hugging Face folder, and a teacher
written in a public format by a writer that follows that format's own layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import rsae
from rsae.cli import main

from helpers import tiny_hf_lm

D_IN, D_SAE = 32, 64
HOOK = "blocks.1.hook_resid_pre"
SMALL = ["--n-tokens", "6400", "--finetune-epochs", "1", "--batch-size", "512", "--ce-sequences", "4",
         "--precision", "32-true"]
RUNS = ("teacher", "rsae-init", "rsae", "control")

pytestmark = pytest.mark.usefixtures("small_cpu_settings")


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf_lm(tmp_path_factory.mktemp("lm") / "tiny-gpt2")


def write_saelens(folder: Path, center_writing_weights: bool) -> Path:
    """A SAELens v6 standard (ReLU) SAE folder: cfg.json and sae_weights.safetensors, SAELens' own names."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    w_dec = torch.nn.functional.normalize(torch.randn(D_SAE, D_IN, generator=gen), dim=-1)
    save_file({"W_enc": w_dec.T.contiguous(), "b_enc": torch.full((D_SAE,), -0.1), "W_dec": w_dec,
               "b_dec": 0.01 * torch.randn(D_IN, generator=gen)}, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "tiny-gpt2", "hook_name": HOOK,
                        "model_from_pretrained_kwargs": {"center_writing_weights": center_writing_weights}}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_upgrade_imports_caches_as_trained_and_runs_every_stage(lm_folder: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    teacher = write_saelens(tmp_path / "saelens-sae", center_writing_weights=True)
    out = tmp_path / "up"
    assert main(["upgrade", str(teacher), "--model", str(lm_folder), "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    for text in ("metric", "loss_recovered", *RUNS):
        assert text in printed
    imported = rsae.load(out / "teacher" / "sae")
    assert imported.cfg.source["format"] == "saelens" and imported.cfg.hook_name == HOOK
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    # The stream the SAE was trained on: HookedTransformer's processing, reproduced through the bridge.
    assert manifest["lm_processing"]["center_writing_weights"] is True
    assert manifest["hooks"] == [HOOK]
    metrics = {run: json.loads((out / "reports" / run / "report.json").read_text())["metrics"] for run in RUNS}
    assert metrics["rsae-init"]["mse"] == pytest.approx(metrics["teacher"]["mse"], rel=1e-4)  # masked: the teacher
    assert all(m["ce_sae"] is not None for m in metrics.values())

    assert main(["upgrade", str(teacher), "--model", str(lm_folder), "--out", str(out), *SMALL]) == 0
    again = capsys.readouterr().out  # resumable: nothing is recomputed
    assert "imported already" in again and "nothing to do" in again
    assert all(f"[{run}] done already" in again for run in ("rsae-init", "rsae", "control"))


def test_upgrade_needs_a_model_when_the_files_name_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = write_saelens(tmp_path / "sae", center_writing_weights=False)
    cfg = json.loads((teacher / "cfg.json").read_text())
    cfg["metadata"]["model_name"] = "unknown"
    (teacher / "cfg.json").write_text(json.dumps(cfg))
    assert main(["upgrade", str(teacher), "--out", str(tmp_path / "up")]) == 2
    assert "pass --model" in capsys.readouterr().err
