"""`rsae zoo build` end to end against a local Hub-compatible server, with stand-ins served over HTTP: a tiny
GPT-2-architecture LM and an OpenAI-format TopK teacher. Fetch both, cache, upgrade, evaluate, push; then the
built card loads the pushed entry bit for bit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import LocalHub, online
from huggingface_hub import HfApi

import rsae
from rsae.cli import main
from rsae.cli.zoo import check_figures
from rsae.data.lm import load_lm
from rsae.data.text import corpus_sequences, lm_encoder
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


@pytest.mark.parametrize("family", ["topk", "relu"])
def test_zoo_build_of_a_recipe_trained_entry_ships_bf16_weights_that_load_offline(
        family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A card whose teacher is "trained by the recipe" builds through `rsae quickstart`'s stages (no Hub needed),
    is evaluated on another corpus, and `--ship` stores it in bf16 in the package's zoo: it then loads with no
    network and no HF cache, and reproduces its card's held-out check."""
    cards = tmp_path / "cards"
    name = f"tiny-gpt2/L1/{family}"
    entry = registry.Card(name=name, status="recipe",
                          lm={"name": "tiny-gpt2", "hook_name": "blocks.1.hook_resid_post"},
                          teacher={"source": "recipe", "license": "Apache-2.0"},
                          recipe={"command": "quickstart", "dtype": "bfloat16", "args": {
                              "family": family, "layer": 1, "d_sae": 64, "k": 4, "target_l0": 4, "teacher_epochs": 2,
                              "finetune_epochs": 1, "batch_size": 512, "ce_sequences": 4, "precision": "32-true",
                              "eval_corpus": "django-docs", "eval_tokens": 3200}},
                          hub={"repo_id": "rsae-test/zoo", "path_in_repo": f"L1/{family}", "revision": "main"})
    registry.write_card(entry, cards)
    monkeypatch.setattr(registry, "cards_root", lambda: cards)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    out = tmp_path / "build"
    lm = tiny_hf_lm(tmp_path / "lm")
    assert main(["zoo", "build", name, "--model", str(lm), "--n-tokens", "6400", "--out", str(out), "--ship"]) == 0
    assert "[teacher] TeacherTraining" in capsys.readouterr().out
    built = registry.card(name)  # --ship wrote the published card into the zoo
    assert built.status == "published" and built.shipped == f"shipped/{name}"
    table = built.evaluation["table"]
    assert list(table) == ["teacher", "rsae-init", "rsae", "control", "shipped"]
    assert table["teacher"]["comparable_l0"] == "yes" and all("comparable_l0" in row for row in table.values())
    if family == "topk":
        assert table["teacher"]["l0"] == 4.0
    assert built.evaluation["data"]["evaluation"]["corpus"] == "django-docs"
    assert set(built.hub["files"]) >= {"cfg.json", "weights.safetensors", "report.json", "README.md"}
    # bf16 storage costs little against the fp32 model it was cast from
    assert abs(table["shipped"]["mse"] / table["rsae"]["mse"] - 1) < 0.02

    model = rsae.zoo.load(name)  # HF_HUB_OFFLINE is set and the HF cache is empty: the shipped copy
    assert model.dtype == torch.bfloat16 and rsae.zoo.load(name, dtype="float32").dtype == torch.float32
    assert torch.equal(model.W_dec, rsae.load(out / "entry").W_dec)
    check = built.evaluation["check"]
    language_model = load_lm(str(lm), verbose=False)
    encode, eos = lm_encoder(language_model)
    first = check["first_sequence"]
    tokens = torch.from_numpy(np.stack(list(corpus_sequences(
        check["corpus"], encode, check["seq_len"], language_model.bos_token_id, eos,
        max_sequences=first + check["sequences"], start=first)))).long()
    assert hashlib.sha256(tokens.numpy().tobytes()).hexdigest() == check["tokens_sha256"]
    figures = check_figures(model, language_model, tokens)
    assert figures["mse"] == pytest.approx(check["mse"], rel=1e-4) and figures["l0"] == pytest.approx(check["l0"])

    # A shipped copy that does not match its card is refused, not used.
    weights = cards / built.shipped / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    with pytest.raises(registry.ZooError, match="does not match the sha256"):
        rsae.zoo.load(name)
