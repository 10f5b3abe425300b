"""Where an import comes from: local paths, the Hugging Face cache through `huggingface_hub`, SAELens names;
and the framework's refusals (unknown layout, missing files)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from rsae.zoo.importers import SAEImportError, detect_format, import_sae
from rsae.zoo.importers.sources import parse_hf, resolve

D_IN, D_SAE = 8, 16


def write_saelens(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    save_file({"W_enc": torch.randn(D_IN, D_SAE, generator=gen), "b_enc": torch.zeros(D_SAE),
               "W_dec": torch.randn(D_SAE, D_IN, generator=gen), "b_dec": torch.zeros(D_IN)},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"}}))
    return folder


def test_parse_hf_paths() -> None:
    assert parse_hf("owner/name") == ("owner/name", None, None)
    assert parse_hf("owner/name/a/b@v1") == ("owner/name", "a/b", "v1")
    with pytest.raises(SAEImportError, match="hf:OWNER/NAME"):
        parse_hf("justaname")


def test_unknown_layout_lists_what_was_found_and_the_known_formats(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SAEImportError, match=r"found: notes\.txt, weights\.bin.*known formats: saelens, sparsify"):
        detect_format(tmp_path)
    with pytest.raises(SAEImportError, match="does not exist"):
        import_sae(tmp_path / "nowhere")
    with pytest.raises(SAEImportError, match="unknown SAE format 'safetensors'"):
        import_sae(write_saelens(tmp_path / "sae"), format="safetensors")


def test_hf_source_reads_the_standard_hf_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hf:` goes through huggingface_hub's snapshot_download: offline, a cached snapshot is used as is; an
    empty cache gives a clear error (the Hub itself is tested against a local server with the zoo)."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--saes"
    commit = "a" * 40
    write_saelens(repo / "snapshots" / commit / "blocks.3.hook_resid_pre")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder, where = resolve("hf:someone/saes/blocks.3.hook_resid_pre")
    assert folder == repo / "snapshots" / commit / "blocks.3.hook_resid_pre" and where.startswith("hf:someone/saes")
    model = import_sae("hf:someone/saes/blocks.3.hook_resid_pre")
    assert model.cfg.source["location"] == "hf:someone/saes/blocks.3.hook_resid_pre@main"
    assert set(model.cfg.source["files"]) >= {"cfg.json", "sae_weights.safetensors"}
    with pytest.raises(SAEImportError, match="not in the local Hugging Face cache"):
        import_sae("hf:someone/other")


def test_saelens_source_without_sae_lens_says_what_to_do() -> None:
    try:
        import sae_lens  # noqa: F401
    except ImportError:
        with pytest.raises(SAEImportError, match="pip install sae-lens.*hf:OWNER/NAME/PATH"):
            import_sae("saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre")
    with pytest.raises(SAEImportError, match="saelens:RELEASE/SAE_ID"):
        import_sae("saelens:only-a-release")
