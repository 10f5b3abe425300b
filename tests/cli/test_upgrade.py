"""`rsae upgrade` end to end, offline: a tiny random GPT-2 saved as a local Hugging Face folder, and a teacher
written in a public format by a writer that follows that format's own layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


def _weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec): a tied, unit-norm dictionary."""
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(D_SAE, D_IN, generator=gen), dim=-1)
    return w_dec.T.contiguous(), torch.full((D_SAE,), -0.05), w_dec, 0.01 * torch.randn(D_IN, generator=gen)


def write_sparsify(folder: Path) -> Path:
    """EleutherAI sparsify: one folder per hookpoint (`layers.1`: block 1's output), cfg.json + sae.safetensors."""
    w_enc, b_enc, w_dec, b_dec = _weights()
    hookpoint = folder / "layers.1"
    hookpoint.mkdir(parents=True)
    save_file({"encoder.weight": w_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": w_dec, "b_dec": b_dec},
              str(hookpoint / "sae.safetensors"))
    (hookpoint / "cfg.json").write_text(json.dumps({"expansion_factor": 2, "normalize_decoder": True,
                                                    "num_latents": D_SAE, "k": 4, "d_in": D_IN}))
    return hookpoint


def write_dictionary_learning(folder: Path) -> Path:
    """dictionary_learning's AutoEncoder: ae.pt (encoder [F, D], decoder [D, F], `bias` = b_dec) + config.json."""
    w_enc, b_enc, w_dec, b_dec = _weights()
    folder.mkdir(parents=True)
    torch.save({"encoder.weight": w_enc.T.contiguous(), "encoder.bias": b_enc, "decoder.weight": w_dec.T.contiguous(),
                "bias": b_dec}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": D_IN,
                                                                "dict_size": D_SAE, "layer": 1,
                                                                "lm_name": "tiny-gpt2"}}))
    return folder


def write_gemma_scope(folder: Path) -> Path:
    """Gemma Scope: params.npz of a JumpReLU SAE (W_enc [d, F], W_dec [F, d], threshold), in layer_N/ folders."""
    w_enc, b_enc, w_dec, b_dec = _weights()
    target = folder / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_8"
    target.mkdir(parents=True)
    np.savez(target / "params.npz", W_enc=w_enc.numpy(), b_enc=b_enc.numpy(), W_dec=w_dec.numpy(),
             b_dec=b_dec.numpy(), threshold=np.full(D_SAE, 0.05, dtype=np.float32))
    return target


def write_openai(folder: Path) -> Path:
    """OpenAI's TopK v5 state dict (.pt): encoder [n, d] without bias, latent_bias, pre_bias, decoder [d, n]."""
    w_enc, b_enc, w_dec, b_dec = _weights()
    folder.mkdir(parents=True)
    path = folder / "v5_32k_layer_1.pt"
    torch.save({"pre_bias": b_dec, "latent_bias": b_enc, "encoder.weight": w_enc.T.contiguous(),
                "decoder.weight": w_dec.T.contiguous(), "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long),
                "activation": "TopK", "activation_state_dict": {"k": 4, "postact_fn": "ReLU"}}, path)
    return path


@pytest.mark.parametrize(("writer", "family", "hook"), [
    (write_sparsify, "topk", "blocks.1.hook_resid_post"),
    (write_dictionary_learning, "relu", "blocks.1.hook_resid_post"),
    (write_gemma_scope, "jumprelu", "blocks.1.hook_resid_post"),
    (write_openai, "topk", "blocks.1.hook_resid_post"),
], ids=["sparsify", "dictionary_learning", "gemma_scope", "openai"])
def test_upgrade_from_every_other_format(writer, family, hook, lm_folder: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "up"
    source = writer(tmp_path / "teacher")
    assert main(["upgrade", str(source), "--model", str(lm_folder), "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "loss_recovered" in printed
    # An imported ReLU / JumpReLU teacher records no coefficient: the fine-tuning starts from its family's.
    assert ("records no trained sparsity coefficient" in printed) == (family != "topk")
    imported = rsae.load(out / "teacher" / "sae")
    assert imported.cfg.family == family and imported.cfg.hook_name == hook
    metrics = {run: json.loads((out / "reports" / run / "report.json").read_text())["metrics"] for run in RUNS}
    assert metrics["rsae-init"]["mse"] == pytest.approx(metrics["teacher"]["mse"], rel=1e-4)
    assert metrics["rsae"]["l0"] > 0


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
