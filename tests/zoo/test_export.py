"""`export_saelens`: rsae -> SAELens v6 folder -> `import_sae` gives the same model; the folder means to SAELens what
the model computes (checked against a forward pass written from SAELens' code, and against SAELens itself where it
is installed); an RSAE exports as architecture `rsae` and loads in SAELens after `register()`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

import rsae
from rsae.integrations import saelens as integration
from rsae.nn.config import SAEConfig
from rsae.nn.registry import build_model
from rsae.nn.sae import SparseAutoencoder
from rsae.zoo.export import CONFIG_FILE, WEIGHTS_FILE, export_saelens
from rsae.zoo.importers import import_sae

pytestmark = pytest.mark.usefixtures("small_cpu_settings")

D_IN, D_SAE, K = 16, 40, 4
HOOK = "blocks.2.hook_resid_post"


def baseline(family: str, seed: int = 0, **overrides: Any) -> SparseAutoencoder:
    """A baseline whose every parameter matters: random biases, thresholds in the bulk of the pre-activations."""
    torch.manual_seed(seed)
    fields: dict[str, Any] = {"d_in": D_IN, "d_sae": D_SAE, "architecture": family, "hook_name": HOOK,
                              "model_name": "tiny-lm", "k": K if family == "topk" else None}
    fields.update(overrides)
    model = build_model(SAEConfig(**fields))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3)
        model.b_dec.normal_(0, 1.0)
        if family == "jumprelu":
            model.threshold.uniform_(0.05, 0.6)
    return model


def rsae_model(family: str, mode: str = "masked") -> rsae.RSAE:
    model = rsae.RSAE.from_teacher(baseline(family), degree=(3, 2), mode=mode)  # type: ignore[arg-type]
    with torch.no_grad():  # move every gate parameter off its initial value, so the gate shows in the outputs
        for p in model.gate.parameters():
            p.add_(0.05 * torch.randn_like(p)).abs_()
    return model


def activations(n: int = 48, seed: int = 1) -> Tensor:
    return 1.5 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) + 0.3


def saelens_forward(folder: Path, x: Tensor) -> tuple[Tensor, Tensor]:
    """(codes, reconstruction) of the folder as SAELens' standard/jumprelu/topk inference classes compute them."""
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    t = load_file(str(folder / WEIGHTS_FILE))
    ln = None
    if cfg["normalize_activations"] == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)
        x, ln = (x - mu) / (std + 1e-5), (mu, std)
    hidden_pre = (x - t["b_dec"] * cfg["apply_b_dec_to_input"]) @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "jumprelu":
        codes = torch.relu(hidden_pre) * (hidden_pre > t["threshold"])
    elif cfg["architecture"] == "topk":
        values, indices = torch.topk(hidden_pre, k=cfg["k"], dim=-1, sorted=False)
        codes = torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())
    else:
        codes = torch.relu(hidden_pre)
    out = codes @ t["W_dec"] + t["b_dec"]
    return codes, out if ln is None else out * ln[1] + ln[0]


@pytest.mark.parametrize("family,architecture", [("relu", "standard"), ("jumprelu", "jumprelu"), ("topk", "topk")])
@pytest.mark.parametrize("variant", ["default", "no_b_dec", "layer_norm"])
def test_round_trip_through_saelens_folder(tmp_path: Path, family: str, architecture: str, variant: str) -> None:
    overrides = {"no_b_dec": {"apply_b_dec_to_input": False}, "layer_norm": {"input_normalization": "layer_norm"},
                 "default": {}}[variant]
    model = baseline(family, **overrides)
    folder = export_saelens(model, tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    assert cfg["architecture"] == architecture and (cfg["d_in"], cfg["d_sae"]) == (D_IN, D_SAE)
    assert cfg["apply_b_dec_to_input"] is (variant != "no_b_dec")
    assert cfg["normalize_activations"] == ("layer_norm" if variant == "layer_norm" else "none")
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == "tiny-lm"
    assert cfg["metadata"]["sae_lens_version"].split(".")[0] == "6"
    assert cfg.get("k") == (K if family == "topk" else None)

    imported = import_sae(folder)
    assert imported.cfg.architecture == family and imported.cfg.hook_name == HOOK
    assert imported.cfg.input_normalization == model.cfg.input_normalization
    assert imported.cfg.apply_b_dec_to_input == model.cfg.apply_b_dec_to_input
    for key, value in model.state_dict().items():
        assert torch.equal(imported.state_dict()[key], value), key
    x, z = activations(), torch.relu(torch.randn(8, D_SAE))
    assert torch.equal(imported.encode(x), model.encode(x))
    assert torch.equal(imported.decode(z), model.decode(z))
    assert torch.equal(imported(x), model(x))

    # What SAELens makes of the folder is what the model computes.
    codes, out = saelens_forward(folder, x)
    assert bool((codes > 0).any()) and bool((codes == 0).any())
    torch.testing.assert_close(model.encode(x), codes, rtol=1e-5, atol=1e-5)
    # layer_norm: SAELens scales back by std, rsae by std + 1e-5.
    tolerance = 1e-4 if variant == "layer_norm" else 1e-5
    torch.testing.assert_close(model(x), out, rtol=tolerance, atol=tolerance)


def test_a_scaled_model_is_exported_for_raw_activations(tmp_path: Path) -> None:
    model = baseline("jumprelu")
    model.set_input_scale(0.4)  # now reads activations * 0.4 and reconstructs at that scale
    imported = import_sae(export_saelens(model, tmp_path / "out"))
    assert imported.input_scale == 1.0 and model.input_scale == 0.4
    x = activations()
    torch.testing.assert_close(imported.encode(x), model.encode(0.4 * x))
    torch.testing.assert_close(imported(x), model(0.4 * x) / 0.4)


def test_lm_processing_becomes_model_from_pretrained_kwargs(tmp_path: Path) -> None:
    processing = {"fold_ln": True, "center_writing_weights": True, "center_unembed": False,
                  "fold_value_biases": False}
    model = baseline("relu", source={"format": "saelens", "lm_processing": processing})
    cfg = json.loads((export_saelens(model, tmp_path / "a") / CONFIG_FILE).read_text())
    assert cfg["metadata"]["model_from_pretrained_kwargs"] == processing
    assert import_sae(tmp_path / "a").cfg.source["lm_processing"] == processing
    cfg = json.loads((export_saelens(baseline("relu"), tmp_path / "b") / CONFIG_FILE).read_text())
    assert cfg["metadata"]["model_from_pretrained_kwargs"] == {}  # SAELens: from_pretrained_no_processing()


def test_export_is_atomic_and_refuses_foreign_folders(tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_saelens(baseline("relu", seed=0), out)
    export_saelens(baseline("relu", seed=1), out)  # replaces an export
    assert torch.equal(import_sae(out).W_dec, baseline("relu", seed=1).W_dec)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a SAELens SAE folder"):
        export_saelens(baseline("relu"), tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("family", ["relu", "jumprelu", "topk"])
def test_rsae_exports_architecture_rsae_with_its_gate(tmp_path: Path, family: str) -> None:
    model = rsae_model(family)
    folder = export_saelens(model, tmp_path / "out")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    assert cfg["architecture"] == "rsae" and cfg["normalize_activations"] == "none"
    assert cfg["rsae_cfg"] == json.loads(json.dumps(model.cfg.to_dict()))
    assert cfg["rsae_cfg"]["degree"] == [3, 2] and cfg["rsae_cfg"]["mode"] == "masked"
    assert cfg["rsae_cfg"]["family"] == family and cfg["rsae_cfg"]["coefficient_sharing"] == "shared"
    tensors = load_file(str(folder / WEIGHTS_FILE))
    assert {"gate.numerator", "gate.denominator_raw", "gate.scale_in", "gate.shift", "gate.scale_out"} <= set(tensors)
    assert ("threshold" in tensors) == (family == "jumprelu")
    for key, value in model.state_dict().items():
        assert torch.equal(tensors[key], value), key
    with pytest.raises(ValueError, match="architecture 'rsae' is not importable.*rsae.integrations.saelens"):
        import_sae(folder)


def test_register_without_sae_lens_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # `import sae_lens` now raises ImportError
    with pytest.raises(ImportError, match="needs SAELens, which is not installed: pip install sae-lens"):
        integration.register()


# --- SAELens itself, where it is installed (it cannot share rsae's environment) -------------------


@pytest.mark.parametrize("family", ["relu", "jumprelu", "topk"])
def test_saelens_loads_exported_baselines(tmp_path: Path, family: str) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    model = baseline(family, apply_b_dec_to_input=family != "jumprelu")
    sae = sae_lens.SAE.load_from_disk(export_saelens(model, tmp_path / "out"))
    x, z = activations(), torch.relu(torch.randn(8, D_SAE))
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), model.encode(x))
        torch.testing.assert_close(sae.decode(z), model.decode(z))
        torch.testing.assert_close(sae(x), model(x))


@pytest.mark.parametrize("family,mode", [("relu", "masked"), ("jumprelu", "masked"), ("topk", "masked"),
                                         ("relu", "pure")])
@pytest.mark.parametrize("normalization", ["none", "layer_norm"])
def test_saelens_loads_an_exported_rsae_after_register(tmp_path: Path, family: str, mode: str,
                                                       normalization: str) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    integration.register()
    integration.register()  # a second call is a no-op
    model = rsae_model(family, mode)
    model.cfg.input_normalization = normalization  # type: ignore[assignment]
    sae = sae_lens.SAE.load_from_disk(export_saelens(model, tmp_path / "out"))
    assert isinstance(sae, integration.saelens_classes()[0])
    x, z = activations(), torch.relu(torch.randn(8, D_SAE))
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), model.encode(x))
        torch.testing.assert_close(sae(x), model(x))
        torch.testing.assert_close(sae(x.reshape(4, 12, D_IN)), model(x).reshape(4, 12, D_IN))
        if normalization == "none":
            torch.testing.assert_close(sae.decode(z), model.decode(z))
        # SAELens' own save writes the folder back as rsae exported it.
        sae.save_model(tmp_path / "again")
    again = load_file(str(tmp_path / "again" / WEIGHTS_FILE))
    assert set(again) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(again[key], value), key
