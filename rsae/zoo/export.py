"""rsae models in other libraries' formats: `export_saelens` writes a SAELens v6 SAE folder.

A baseline becomes the SAELens SAE of its family (`standard`, `jumprelu`, `topk`), which plain SAELens loads with
`SAE.load_from_disk` and runs as rsae does. An RSAE becomes architecture `rsae`: SAELens' common fields, the
whole rsae config under `rsae_cfg`, and the rsae state dict (gate parameters included); SAELens loads it once
`rsae.integrations.saelens.register()` has taught it the architecture.

What carries over and why:
- Weights are exported for raw activations: a model that reads scaled inputs (`input_scale` != 1) is refolded
  first, so the folder says `normalize_activations: "none"` and means it.
- `input_normalization="layer_norm"` is SAELens' `layer_norm`. SAELens scales its reconstruction back by `std`
  where rsae uses `std + 1e-5`, so the two differ by a relative 1e-5 / std in `forward`; codes are the same.
- A JumpReLU threshold is exported raw: SAELens' `relu(h) * (h > theta)` equals rsae's `h * (h > max(theta, 0))`.
- `metadata.model_from_pretrained_kwargs` holds the LM processing the model was trained under
  (`cfg.source["lm_processing"]`, every option spelled out): SAELens loads the LM with
  `from_pretrained_no_processing(**kwargs)`, so an rsae model without recorded processing writes `{}`.
"""

from __future__ import annotations

import copy
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from rsae._io import atomic_folder
from rsae.nn.sae import SparseAutoencoder

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES: dict[str, str] = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk", "rsae": "rsae"}
"""rsae architecture -> SAELens architecture."""

SAELENS_SCHEMA_VERSION = "6.0.0"
"""Written as `metadata.sae_lens_version`: SAELens reads a config whose version is missing or below 6 as a pre-6 one
and rebuilds its metadata from top-level keys, losing the hook and model names written here."""


def export_saelens(model: SparseAutoencoder, out_folder: str | os.PathLike[str]) -> Path:
    """Write `model` as a SAELens SAE folder (`cfg.json`, `sae_weights.safetensors`) atomically; return the folder.

    An existing SAELens folder at `out_folder` is replaced; any other non-empty folder is refused."""
    folder = Path(out_folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / CONFIG_FILE).is_file():
        raise FileExistsError(f"{folder} exists and is not a SAELens SAE folder (no {CONFIG_FILE}); refusing to "
                              "overwrite it. Choose an empty or new folder.")
    if model.input_scale != 1.0:
        model = copy.deepcopy(model)
        model.set_input_scale(1.0)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    with atomic_folder(folder) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(saelens_config(model), indent=2) + "\n")
    return folder


def saelens_config(model: SparseAutoencoder) -> dict[str, Any]:
    """The SAELens v6 `cfg.json` of `model` (read for raw activations: `input_scale` must be 1)."""
    cfg = model.cfg
    is_rsae = cfg.architecture == "rsae"
    out: dict[str, Any] = {
        "architecture": ARCHITECTURES[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        # The wrapped rsae model of an RSAE normalises its own input; SAELens must not do it again.
        "normalize_activations": "layer_norm" if cfg.input_normalization == "layer_norm" and not is_rsae else "none",
        # SAELens flattens [..., n_heads, d_head] for hook_z SAEs, as rsae's splicing does for every hook.
        "reshape_activations": "hook_z" if cfg.hook_name.endswith("hook_z") else "none",
        "metadata": {
            "sae_lens_version": SAELENS_SCHEMA_VERSION,
            "sae_lens_training_version": None,
            "exported_by": f"rsae {metadata.version('rsae')}",
            "model_name": cfg.model_name,
            "hook_name": cfg.hook_name,
            "hook_head_index": None,
            "model_class_name": "HookedTransformer",
            "model_from_pretrained_kwargs": dict(cfg.source.get("lm_processing") or {}),
        },
    }
    if cfg.architecture == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    if is_rsae:
        out["rsae_cfg"] = cfg.to_dict()
    return out
