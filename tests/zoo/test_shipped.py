"""The entries that ship with the source tree: their copies match their cards, they load with no network and no
HF cache, and (with the real LM) reproduce their card's held-out check."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import rsae
from rsae.zoo.registry import card, cards_root, names

SHIPPED = [name for name in names() if card(name).shipped]
TEACHER_L0 = (16, 64)
TEACHER_MIN_EXPLAINED_VARIANCE = 0.7


def test_every_smollm2_entry_ships_or_its_card_says_why_not() -> None:
    """Built entries whose RSAE is not one to publish keep their measured table and say why (relu, today)."""
    assert {"smollm2-135m/L15/topk", "smollm2-135m/L15/jumprelu"} <= set(SHIPPED)
    for family in ("relu", "jumprelu", "topk"):
        entry = card(f"smollm2-135m/L15/{family}")
        assert entry.shipped or ("not published" in entry.notes and entry.evaluation["table"]["rsae"])


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_copy_matches_its_card_and_is_small(name: str) -> None:
    entry = card(name)
    folder = cards_root() / entry.shipped
    assert entry.status == "published"
    for file in ("cfg.json", "weights.safetensors"):
        assert hashlib.sha256((folder / file).read_bytes()).hexdigest() == entry.hub["files"][file]
    assert (folder / "weights.safetensors").stat().st_size <= 12 * 2**20


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_teacher_is_one_a_researcher_would_use(name: str) -> None:
    """L0 16-64 and explained variance >= 0.7 on held-out text of another source; the table puts the RSAE's and
    the control's L0 next to their MSE, and both stay comparable to the teacher's."""
    entry = card(name)
    table = entry.evaluation["table"]
    assert entry.evaluation["data"]["evaluation"]["corpus"] != entry.evaluation["data"]["train"]["corpus"]
    assert TEACHER_L0[0] <= table["teacher"]["l0"] <= TEACHER_L0[1]
    assert table["teacher"]["explained_variance"] >= TEACHER_MIN_EXPLAINED_VARIANCE
    for run in ("rsae", "control", "shipped"):
        assert {"mse", "l0", "comparable_l0"} <= set(table[run])  # the L0 next to the MSE, and whether comparable


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_entry_loads_with_no_network_and_no_hf_cache(name: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    model = rsae.zoo.load(name)
    assert model.cfg.hook_name == card(name).lm["hook_name"] and model.cfg.model_name == "smollm2-135m"
    assert model.dtype == torch.bfloat16


@pytest.mark.real_model
def test_shipped_entries_reproduce_their_held_out_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fresh machine: the SmolLM2 activations of the card's held-out sequences (re-tokenised from the pinned
    corpus) give the card's MSE and L0."""
    from rsae.cli.zoo import check_figures
    from rsae.data.lm import load_lm
    from rsae.data.text import corpus_sequences, lm_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    lm = load_lm("smollm2-135m", verbose=False)
    encode, eos = lm_encoder(lm)
    for name in SHIPPED:
        check = card(name).evaluation["check"]
        first = check["first_sequence"]
        tokens = torch.from_numpy(np.stack(list(corpus_sequences(
            check["corpus"], encode, check["seq_len"], lm.bos_token_id, eos,
            max_sequences=first + check["sequences"], start=first)))).long()
        assert hashlib.sha256(tokens.numpy().tobytes()).hexdigest() == check["tokens_sha256"], name
        figures = check_figures(rsae.zoo.load(name), lm, tokens)
        assert figures["mse"] == pytest.approx(check["mse"], rel=2e-3), name
        assert figures["l0"] == pytest.approx(check["l0"], rel=2e-3), name
