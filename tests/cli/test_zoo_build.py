"""`rsae zoo build` end to end against a local Hub-compatible server, with stand-ins served over HTTP: a tiny
GPT-2-architecture LM and an OpenAI-format TopK teacher. Fetch both, cache, upgrade, evaluate, push; then the
built card loads the pushed entry bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_server import LocalHub, online
from huggingface_hub import HfApi

import rsae
from rsae.cli import main
from rsae.zoo import registry

from helpers import tiny_hf_lm

TOKEN = "hf_test_token"
D_IN, D_SAE = 32, 64

pytestmark = pytest.mark.usefixtures("small_cpu_settings")


def openai_teacher(folder: Path) -> Path:
    """OpenAI's TopK v5 state dict, as `sparse_autoencoder.Autoencoder.state_dict()` writes it."""
    gen = torch.Generator().manual_seed(0)
    w_dec = torch.nn.functional.normalize(torch.randn(D_SAE, D_IN, generator=gen), dim=-1)
    folder.mkdir(parents=True)
    torch.save({"pre_bias": torch.zeros(D_IN), "latent_bias": torch.zeros(D_SAE), "encoder.weight": w_dec.clone(),
                "decoder.weight": w_dec.T.contiguous(), "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long),
                "activation": "TopK", "activation_state_dict": {"k": 4, "postact_fn": "ReLU"}},
               folder / "v5_32k_layer_1.pt")
    return folder


def test_zoo_build_fetches_upgrades_evaluates_and_pushes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with LocalHub(token=TOKEN) as hub:
        online(monkeypatch, hub, tmp_path / "hf-home")
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        for repo, folder in (("stand-in/tiny-gpt2", tiny_hf_lm(tmp_path / "lm")),
                             ("stand-in/saes", openai_teacher(tmp_path / "teacher"))):
            api.create_repo(repo)
            api.upload_folder(repo_id=repo, folder_path=str(folder))
        out = tmp_path / "build"
        assert main(["zoo", "build", "gpt2-small/L8/topk", "--model", "stand-in/tiny-gpt2",
                     "--source", "hf:stand-in/saes/v5_32k_layer_1.pt", "--n-tokens", "6400", "--out", str(out),
                     "--push", "stand-in/zoo", "--endpoint", hub.endpoint, "--token", TOKEN]) == 0
        printed = capsys.readouterr().out
        assert "loss_recovered" in printed and "pushed gpt2-small/L8/topk to stand-in/zoo/L8/topk" in printed
        entry = out / "entry"
        assert {"cfg.json", "weights.safetensors", "report.json", "gate_shapes.png", "README.md"} <= {
            p.name for p in entry.iterdir()}
        readme = (entry / "README.md").read_text()
        assert readme.startswith("---\nlibrary_name: rsae\n") and "sparse-autoencoder" in readme
        assert "rsae zoo build gpt2-small/L8/topk" in readme and "MIT" in readme
        card = json.loads((out / "card" / "gpt2-small" / "L8" / "topk.json").read_text())
        assert card["status"] == "published" and set(card["evaluation"]["table"]) == {
            "teacher", "rsae-init", "rsae", "control"}
        assert set(card["hub"]["files"]) >= {"cfg.json", "weights.safetensors", "README.md"}
        assert not hub.errors

        # The built card is what a user then loads: from the Hub into the HF cache, verified, bit for bit.
        monkeypatch.setattr(registry, "cards_root", lambda: out / "card")
        model = rsae.zoo.load("gpt2-small/L8/topk", endpoint=hub.endpoint)
        built = rsae.load(entry)
        x = torch.randn(8, D_IN)
        assert torch.equal(model(x), built(x)) and model.cfg.hook_name == "blocks.1.hook_resid_post"


def test_zoo_build_of_a_recipe_trained_entry_runs_the_quickstart_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A card whose teacher is "trained by the recipe" builds through `rsae quickstart`'s stages, no Hub needed."""
    cards = tmp_path / "cards"
    entry = registry.Card(name="tiny-gpt2/L1/topk", status="recipe",
                          lm={"name": "tiny-gpt2", "hook_name": "blocks.1.hook_resid_post"},
                          teacher={"source": "recipe", "license": "Apache-2.0"},
                          recipe={"command": "quickstart", "args": {"family": "topk", "layer": 1, "d_sae": 64, "k": 4,
                                                                    "teacher_epochs": 2, "finetune_epochs": 1,
                                                                    "batch_size": 512, "ce_sequences": 4,
                                                                    "precision": "32-true"}},
                          hub={"repo_id": "rsae-test/zoo", "path_in_repo": "L1/topk", "revision": "main"})
    registry.write_card(entry, cards)
    monkeypatch.setattr(registry, "cards_root", lambda: cards)
    out = tmp_path / "build"
    lm = tiny_hf_lm(tmp_path / "lm")
    assert main(["zoo", "build", "tiny-gpt2/L1/topk", "--model", str(lm), "--n-tokens", "6400", "--out", str(out)]) == 0
    assert "[teacher] TeacherTraining" in capsys.readouterr().out
    built = json.loads((out / "card" / "tiny-gpt2" / "L1" / "topk.json").read_text())
    assert built["status"] == "recipe" and built["evaluation"]["table"]["teacher"]["l0"] == 4.0
    assert rsae.load(out / "entry").cfg.hook_name == "blocks.1.hook_resid_post"
