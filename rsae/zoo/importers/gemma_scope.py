"""Google DeepMind's Gemma Scope: JumpReLU SAEs on Gemma 2, one `params.npz` per SAE.

`params.npz` holds `W_enc [d, F]`, `b_enc [F]`, `threshold [F]`, `W_dec [F, d]` and `b_dec [d]`, in rsae's layout
already (some copies spell the matrices `w_enc`, `w_dec`). The encoder reads the raw activation,
`h = x @ W_enc + b_enc` with no b_dec subtracted (`apply_b_dec_to_input=False`), and keeps `ReLU(h)` where
`h > threshold`: rsae's jumprelu, which keeps h where `h > max(threshold, 0)`. The file is read with
`np.load(allow_pickle=False)`, so an npz of object arrays (pickles) is refused, never unpickled.

The file says nothing about where it was trained; the Hub layout does, and is read from the path (the HF cache
keeps it: `models--google--gemma-scope-2b-pt-res/snapshots/<rev>/layer_12/width_16k/average_l0_82/params.npz`):
the repo `gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att}[-canonical]` names the LM (`google/gemma-2-2b`, `-it` for
the instruction-tuned one) and the site, `layer_L` the layer: `res` is `blocks.L.hook_resid_post`, `mlp`
`blocks.L.hook_mlp_out`, `att` `blocks.L.attn.hook_z` with the heads concatenated (SAELens'
`reshape_activations="hook_z"`). What the path does not say stays unknown (`model_name` "unknown", the hook in
`cfg.source["hook_unknown"]`). The embedding SAEs (`embedding/...` in a `-res` repo) were trained on the token
embeddings before Gemma's sqrt(d_model) scaling, while TransformerLens' `hook_embed` holds them after it, so they
read `hook_embed` with `input_scale` 1/sqrt(d) (SAELens' loader divides `W_enc` by sqrt(d) for the same reason);
`set_input_scale(1.0)` folds it in. Transcoders (`-transcoders` repos) predict the MLP's output from its input, which
no SAE teacher does, and are refused. Gemma Scope read the model's own activations (`lm_processing` None).
"""

from __future__ import annotations

import math
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsae.nn.config import SAEConfig
from rsae.zoo.importers.base import Imported, SAEImportError, require

NAME = "gemma_scope"
PARAMS_FILE = "params.npz"
KEYS = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")
_ALIASES = {"w_enc": "W_enc", "w_dec": "W_dec"}
_REPO = re.compile(r"gemma-scope-(?P<size>2b|9b|27b)-(?P<variant>pt|it)-(?P<site>res|mlp|att|transcoders)")
_HOOKS = {"res": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out",
          "att": "blocks.{layer}.attn.hook_z"}


def detect(path: Path) -> bool:
    return (path / PARAMS_FILE).is_file() if path.is_dir() else path.suffix == ".npz"


def load(path: Path) -> Imported:
    file = path / PARAMS_FILE if path.is_dir() else path
    if not file.is_file():
        raise SAEImportError(f"{path} holds no {PARAMS_FILE}; a Gemma Scope SAE folder holds {PARAMS_FILE}")
    arrays = _read_npz(file)
    require(arrays, KEYS, file)
    unexpected = sorted(set(arrays) - set(KEYS))
    if unexpected:
        raise SAEImportError(f"{file}: unexpected arrays {', '.join(unexpected)}; a Gemma Scope {PARAMS_FILE} holds "
                             f"exactly {', '.join(KEYS)}")
    for key, array in arrays.items():
        if array.dtype.kind != "f":
            raise SAEImportError(f"{file}: {key} has dtype {array.dtype}, expected floating point")
    if arrays["W_enc"].ndim != 2:
        raise SAEImportError(f"{file}: W_enc has shape {arrays['W_enc'].shape}, expected [d_in, d_sae]")
    d_in, d_sae = arrays["W_enc"].shape
    state = {key: torch.from_numpy(np.ascontiguousarray(array)) for key, array in arrays.items()}
    fields, source = _site(file, int(d_in))
    try:
        cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), architecture="jumprelu", apply_b_dec_to_input=False,
                        dtype=str(state["W_dec"].dtype).removeprefix("torch."), source=source, **fields)
    except ValueError as err:
        raise SAEImportError(f"{file}: {err}") from err
    return Imported(cfg, state, [file])


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    try:
        data = np.load(file, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                return {_ALIASES.get(key, key): data[key] for key in data.files}
    except ValueError as err:
        # Raised for object arrays and plain pickles alike, which allow_pickle=False leaves unread.
        raise SAEImportError(f"{file}: np.load(allow_pickle=False) refuses it ({err}); a Gemma Scope "
                             f"{PARAMS_FILE} holds plain float arrays, and rsae never unpickles") from err
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise SAEImportError(f"{file} is not a readable npz archive ({err}); it is truncated or corrupt: "
                             "download it again") from err
    raise SAEImportError(f"{file} holds a single array, not an npz archive of named arrays ({', '.join(KEYS)})")


def _site(file: Path, d_in: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(SAEConfig fields, `cfg.source`) from what the Hub layout in the path says."""
    fields: dict[str, Any] = {}
    source: dict[str, Any] = {"lm_processing": None}
    repos = list(_REPO.finditer(file.as_posix()))
    repo = repos[-1] if repos else None
    parts = file.parent.parts
    start = next((i for i in range(len(parts) - 1, -1, -1)
                  if parts[i] == "embedding" or re.fullmatch(r"layer_\d+", parts[i])), None)
    if repo is not None:
        if repo["site"] == "transcoders":
            raise SAEImportError(f"{file} is a Gemma Scope transcoder ({repo[0]}): it predicts the MLP's output from "
                                 "its input, and rsae imports SAEs, which reconstruct their input")
        fields["model_name"] = f"google/gemma-2-{repo['size']}" + ("-it" if repo["variant"] == "it" else "")
        source["repo"] = repo[0]
    if start is not None:
        source["sae_id"] = "/".join(parts[start:])
    site = repo["site"] if repo is not None else None
    if start is not None and parts[start] == "embedding" and site == "res":
        fields["hook_name"] = "hook_embed"
        fields["extra"] = {"input_scale": 1 / math.sqrt(d_in)}
    elif start is not None and parts[start] != "embedding" and site in _HOOKS:
        fields["hook_name"] = _HOOKS[site].format(layer=int(parts[start].removeprefix("layer_")))
        if site == "att":
            source["reshape_activations"] = "hook_z"
    else:
        source["hook_unknown"] = (f"{file} names no Gemma Scope repo (gemma-scope-SIZE-pt|it-res|mlp|att) and "
                                  "layer_L/embedding folder")
    return fields, source
