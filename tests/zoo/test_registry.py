"""The zoo's cards: every shipped card is valid, names resolve (or suggest), recipe entries say how to build."""

from __future__ import annotations

import dataclasses

import pytest

import rsae
from rsae.cli import main
from rsae.zoo.registry import Card, ZooError, card, names


def test_every_shipped_card_is_valid_and_named_as_its_file() -> None:
    shipped = names()
    assert {"gpt2-small/L8/topk", "gpt2-small/L8/relu", "smollm2-135m/L15/topk"} <= set(shipped)
    for name in shipped:
        entry = card(name)
        assert entry.name == name and entry.family in ("relu", "jumprelu", "topk")
        assert entry.lm["hook_name"].startswith("blocks.") and entry.recipe["command"] in ("quickstart", "upgrade")


def test_unknown_names_suggest_close_ones() -> None:
    with pytest.raises(ZooError, match=r"no zoo entry 'gpt2-small/L8/topkk'; did you mean gpt2-small/L8/topk"):
        rsae.zoo.load("gpt2-small/L8/topkk")


def test_a_recipe_entry_says_it_has_no_weights_and_how_to_build_them() -> None:
    with pytest.raises(ZooError, match=r"recipe: its weights are not published.*`rsae zoo build gpt2-small/L8/topk`"):
        rsae.zoo.load("gpt2-small/L8/topk")


def test_cards_that_claim_weights_must_hold_their_hashes() -> None:
    entry = card("gpt2-small/L8/topk")
    with pytest.raises(ZooError, match="published without"):
        dataclasses.replace(entry, status="published").validate()
    with pytest.raises(ZooError, match="a recipe card claims weights"):
        dataclasses.replace(entry, hub={**entry.hub, "files": {"cfg.json": "0" * 64}}).validate()
    with pytest.raises(ZooError, match="LM/LAYER/FAMILY"):
        Card(name="gpt2", status="recipe", lm={}, teacher={}, recipe={}).validate()


def test_zoo_list_and_card_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["name", "family", "L0", "EV", "status"]
    assert any(line.startswith("gpt2-small/L8/topk") and line.rstrip().endswith("recipe") for line in listing)
    assert main(["zoo", "card", "gpt2-small/L8/relu"]) == 0
    assert '"saelens"' in capsys.readouterr().out
    assert main(["zoo", "pull", "gpt2-small/L8/relu"]) == 2
    assert "rsae zoo build gpt2-small/L8/relu" in capsys.readouterr().err
