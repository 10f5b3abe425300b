"""The zoo against a Hub-compatible server on 127.0.0.1, with the real `huggingface_hub` client: push -> list ->
pull -> load round trips bit for bit; every failure is a clear error and nothing bad is used."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hub_server import LocalHub, online

import rsae
from rsae.zoo import hub as zoo_hub
from rsae.zoo import registry
from rsae.zoo.registry import Card, ZooError

from helpers import make_sae

TOKEN = "hf_test_token"
REPO = "rsae-test/zoo"
NAME = "tiny/L3/topk"


@pytest.fixture
def server():  # type: ignore[no-untyped-def]
    with LocalHub(token=TOKEN) as hub:
        yield hub
        assert not hub.errors


@pytest.fixture
def cards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty card folder in place of the shipped one."""
    root = tmp_path / "cards"
    root.mkdir()
    monkeypatch.setattr(registry, "cards_root", lambda: root)
    return root


def entry_folder(path: Path) -> Path:
    model = rsae.RSAE.from_teacher(make_sae("topk"))
    rsae.save(model, path)
    (path / "report.json").write_text(json.dumps({"metrics": {"l0": 4.0}}))
    return path


def publish(folder: Path, server: LocalHub, cards: Path, name: str = NAME, shipped: str | None = None) -> Card:
    result = rsae.zoo.push(folder, REPO, "L3/topk", endpoint=server.endpoint, token=TOKEN)
    card = Card(name=name, status="published", lm={"name": "tiny", "hook_name": "blocks.3.hook_resid_post"},
                teacher={"source": "recipe"}, recipe={"command": "quickstart", "args": {}},
                hub={"repo_id": REPO, "path_in_repo": "L3/topk", "revision": result["revision"],
                     "files": result["files"]},
                evaluation={"table": {"rsae": {"l0": 4.0, "explained_variance": 0.9}}}, shipped=shipped)
    registry.write_card(card, cards)
    return card


def test_push_list_pull_load_round_trip_bit_exact(server: LocalHub, cards: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    online(monkeypatch, server, tmp_path / "hf-home")
    folder = entry_folder(tmp_path / "entry")
    publish(folder, server, cards)
    assert rsae.zoo.list() == [{"name": NAME, "family": "topk", "l0": 4.0, "explained_variance": 0.9,
                                "status": "published"}]
    pulled = rsae.zoo.pull(NAME, endpoint=server.endpoint)
    assert sorted(p.name for p in pulled.iterdir()) == ["cfg.json", "report.json", "weights.safetensors"]
    assert str(pulled).startswith(str(tmp_path / "hf-home" / "hub"))  # the standard HF cache
    model = rsae.zoo.load(NAME, endpoint=server.endpoint)
    original = rsae.load(folder)
    assert model.cfg.hook_name == "blocks.3.hook_resid_post" and model.cfg.architecture == "rsae"
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    x = torch.randn(16, model.cfg.d_in)
    assert torch.equal(model(x), original(x))

    # Re-pushing the unchanged folder makes no commit; offline, the cache serves it with no request at all.
    again = rsae.zoo.push(folder, REPO, "L3/topk", endpoint=server.endpoint, token=TOKEN)
    assert again["commit"] is None
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    before = len(server.requests)
    assert torch.equal(rsae.zoo.load(NAME, endpoint=server.endpoint)(x), original(x))
    assert len(server.requests) == before


def test_a_file_that_does_not_match_its_hash_is_removed_and_refused(server: LocalHub, cards: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    online(monkeypatch, server, tmp_path / "hf-home")
    card = publish(entry_folder(tmp_path / "entry"), server, cards)
    bad = dataclasses.replace(card, hub={**card.hub, "files": {**card.hub["files"], "weights.safetensors": "0" * 64}})
    registry.write_card(bad, cards)
    with pytest.raises(ZooError, match="weights.safetensors does not match the sha256 in its card.*removed"):
        rsae.zoo.load(NAME, endpoint=server.endpoint)
    cached = list((tmp_path / "hf-home" / "hub").rglob("weights.safetensors"))
    assert cached == []  # neither the snapshot link nor the blob is left to be used


def test_server_down_offline_empty_cache_missing_revision_and_no_token(server: LocalHub, cards: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    online(monkeypatch, server, tmp_path / "hf-home")
    folder = entry_folder(tmp_path / "entry")
    publish(folder, server, cards)
    with pytest.raises(ZooError, match="no such revision"):
        rsae.zoo.load(NAME, revision="v9", endpoint=server.endpoint)
    server.fail_next(20, status=503)
    with pytest.raises(ZooError, match="neither in the HF cache nor reachable on the Hub.*server down"):
        rsae.zoo.load(NAME, endpoint=server.endpoint)  # bounded retries, then the message
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ZooError, match="not in the HF cache, and the Hub is not reachable"):
        rsae.zoo.load(NAME, endpoint=server.endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ZooError, match="pushing needs a Hub token"):
        zoo_hub.push(folder, REPO, "L3/topk", endpoint=server.endpoint)


def test_a_shipped_copy_loads_with_no_network_and_is_verified(server: LocalHub, cards: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    online(monkeypatch, server, tmp_path / "hf-home")
    folder = entry_folder(cards / "shipped" / "tiny-L3-topk")
    card = publish(folder, server, cards, shipped="shipped/tiny-L3-topk")
    server.stop()  # no Hub at all, and nothing in the HF cache: the shipped copy serves
    model = rsae.zoo.load(NAME, endpoint=server.endpoint)
    x = torch.randn(4, model.cfg.d_in)
    assert torch.equal(model(x), rsae.load(folder)(x))
    registry.write_card(dataclasses.replace(card, hub={**card.hub, "files": {**card.hub["files"],
                                                                            "cfg.json": "f" * 64}}), cards)
    with pytest.raises(ZooError, match="cfg.json does not match the sha256"):
        rsae.zoo.load(NAME, endpoint=server.endpoint)
    assert (folder / "cfg.json").is_file()  # a shipped file is refused, never deleted
