"""OpenAI's sparse_autoencoder (github.com/openai/sparse_autoencoder): SAEs on GPT-2 small, one torch state dict
each (`gpt2-small/{location}_{version}/autoencoders/{layer}.pt` in OpenAI's bucket), and SAELens' mirror of the v5
SAEs (`jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs` and its siblings: folders `v5_32k_layer_L.pt/` or
`v5_32k_layer_L/` holding SAELens' `cfg.json` and `sae_weights.safetensors`, the same weights in rsae's layout).

The state dict is `Autoencoder.state_dict()`: `encoder.weight [n, d]` (no bias), `latent_bias [n]`, `pre_bias [d]`,
`decoder.weight [d, n]`, statistics buffers (`stats_last_nonzero`, ...; ignored), `activation` (the class name,
"TopK" or "ReLU"; absent means ReLU) and `activation_state_dict` (`{"k": int, "postact_fn": "ReLU"}` for TopK).
`encode` is `activation((x - pre_bias) @ encoder.weight.T + latent_bias)` and `decode` `z @ decoder.weight.T +
pre_bias`: W_enc = encoder.weight.T, b_enc = latent_bias, W_dec = decoder.weight.T, b_dec = pre_bias. TopK keeps the
k largest pre-activations and then ReLUs them: rsae's topk. `from_state_dict` normalises exactly when the activation
is TopK: `LN` centres each token and divides it by its unbiased std + 1e-5 before encoding, which is rsae's
`input_normalization="layer_norm"`. Scaling back differs: OpenAI (and SAELens' mirror) multiply the reconstruction
by the std, rsae by std + 1e-5, so rsae's reconstructions differ from OpenAI's by 1e-5 times the normalised
reconstruction (codes not at all). The ReLU SAEs (v1, v4) have no normalisation: rsae's relu. The file is a pickle,
read with `torch.load(weights_only=True)` only.

Every one is on GPT-2 small (`model_name` "gpt2"), read as the model computes it (`lm_processing` None: OpenAI's
README reads it through HookedTransformer with `center_writing_weights=False`, and its other default processing
leaves these hook points unchanged). The hook comes from the path, by the README's table: `{location}` in a folder
name (`resid_post_mlp` is `blocks.L.hook_resid_post`, ...) and L from `{L}.pt` or `layer_L`. A TopK file whose path
gives the layer but no location is taken as `blocks.L.hook_resid_post`, as SAELens' v5 resid-post mirror names its
files, and `cfg.source["hook_assumed"]` says so; without a layer the hook is unknown (`cfg.source["hook_unknown"]`).
A mirror folder's `cfg.json` names its hook itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor

from rsae.nn.config import SAEConfig
from rsae.zoo.importers.base import (
    Imported,
    SAEImportError,
    read_json,
    read_safetensors,
    require,
    torch_state_dict,
)

NAME = "openai"
MODEL_NAME = "gpt2"
MIRROR_CONFIG, MIRROR_WEIGHTS = "cfg.json", "sae_weights.safetensors"
KEYS = ("encoder.weight", "latent_bias", "pre_bias", "decoder.weight")
OPTIONAL = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square", "activation",
            "activation_state_dict")
LOCATIONS = {
    "mlp_post_act": "blocks.{layer}.mlp.hook_post",
    "resid_delta_attn": "blocks.{layer}.hook_attn_out",
    "resid_post_attn": "blocks.{layer}.hook_resid_mid",
    "resid_delta_mlp": "blocks.{layer}.hook_mlp_out",
    "resid_post_mlp": "blocks.{layer}.hook_resid_post",
}
"""OpenAI's activation locations and their TransformerLens hooks (the README's table)."""
_MIRROR_NAME = re.compile(r"v5_(32k|128k)_layer_\d+(\.pt)?")


def detect(path: Path) -> bool:
    if path.is_dir():
        return (_is_mirror(path) and _MIRROR_NAME.fullmatch(path.name) is not None) or len(_state_dicts(path)) == 1
    return path.suffix == ".pt"


def load(path: Path) -> Imported:
    if path.is_dir():
        if _is_mirror(path):
            return _load_mirror(path)
        files = _state_dicts(path)
        if len(files) != 1:
            raise SAEImportError(f"{path} holds {len(files)} .pt files and no {MIRROR_CONFIG} + {MIRROR_WEIGHTS}; "
                                 "name the state dict file itself")
        path = files[0]
    return _load_state_dict(path)


def _is_mirror(folder: Path) -> bool:
    return (folder / MIRROR_CONFIG).is_file() and (folder / MIRROR_WEIGHTS).is_file()


def _state_dicts(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.pt") if p.is_file())


def _load_state_dict(file: Path) -> Imported:
    sd = torch_state_dict(file)
    require(sd, KEYS, file)
    unexpected = sorted(set(sd) - set(KEYS) - set(OPTIONAL))
    if unexpected:
        raise SAEImportError(f"{file}: unexpected keys {', '.join(map(str, unexpected))}; an OpenAI Autoencoder "
                             f"state dict holds {', '.join(KEYS + OPTIONAL)}")
    for key in KEYS:
        if not isinstance(sd[key], Tensor):
            raise SAEImportError(f"{file}: {key} is a {type(sd[key]).__name__}, expected a tensor")
    if sd["encoder.weight"].ndim != 2 or sd["decoder.weight"].ndim != 2:
        raise SAEImportError(f"{file}: encoder.weight {tuple(sd['encoder.weight'].shape)} and decoder.weight "
                             f"{tuple(sd['decoder.weight'].shape)} must be matrices ([n, d] and [d, n])")
    activation = sd.get("activation", "ReLU")
    if activation == "TopK":
        fields: dict[str, Any] = {"architecture": "topk", "k": _topk_k(sd.get("activation_state_dict"), file),
                                  "input_normalization": "layer_norm"}
    elif activation == "ReLU":
        fields = {"architecture": "relu"}
    else:
        raise SAEImportError(f"{file}: activation {activation!r} is not one rsae imports (TopK or ReLU)")
    state = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["latent_bias"], "W_dec": sd["decoder.weight"].T,
             "b_dec": sd["pre_bias"]}
    hook, notes = _hook_from_path(file, topk=activation == "TopK")
    return _imported(file, state, {**fields, **hook}, {"activation": activation, **notes}, [file])


def _topk_k(activation_state: Any, file: Path) -> int:
    """k of a TopK activation's state dict, whose post-activation must be ReLU (rsae's TopK applies one)."""
    if not isinstance(activation_state, dict):
        raise SAEImportError(f"{file}: a TopK activation needs activation_state_dict with k and postact_fn, found "
                             f"{type(activation_state).__name__}")
    require({f"activation_state_dict.{key}": value for key, value in activation_state.items()},
            ("activation_state_dict.k", "activation_state_dict.postact_fn"), file)
    if activation_state["postact_fn"] != "ReLU":
        raise SAEImportError(f"{file}: activation_state_dict.postact_fn is {activation_state['postact_fn']!r}; rsae's "
                             "TopK applies a ReLU to the kept values, so it imports postact_fn 'ReLU' only")
    k = activation_state["k"]
    if isinstance(k, Tensor) and k.numel() == 1 and not k.is_floating_point():
        k = int(k)
    if not isinstance(k, int) or isinstance(k, bool):
        raise SAEImportError(f"{file}: activation_state_dict.k is {k!r}, expected an integer")
    return k


def _load_mirror(folder: Path) -> Imported:
    """SAELens' copy: OpenAI's weights converted to SAELens' layout (W_enc [d, n], ...), which is rsae's."""
    cfg_path, weights_path = folder / MIRROR_CONFIG, folder / MIRROR_WEIGHTS
    config, state = read_json(cfg_path), read_safetensors(weights_path)
    require(state, ("W_enc", "b_enc", "W_dec", "b_dec"), weights_path)
    unexpected = sorted(set(state) - {"W_enc", "b_enc", "W_dec", "b_dec"})
    if unexpected:
        raise SAEImportError(f"{weights_path}: unexpected tensors {', '.join(unexpected)}; the mirror of an OpenAI "
                             "SAE holds W_enc, b_enc, W_dec and b_dec")
    metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else {}
    activation = config.get("activation_fn_str") or config.get("activation_fn") or config.get("architecture")
    kwargs = config.get("activation_fn_kwargs") if isinstance(config.get("activation_fn_kwargs"), dict) else {}
    k = config.get("k", kwargs.get("k"))
    normalize, b_dec_first = config.get("normalize_activations"), config.get("apply_b_dec_to_input", True)
    if activation != "topk" or normalize != "layer_norm" or b_dec_first is not True:
        raise SAEImportError(f"{cfg_path}: activation {activation!r}, normalize_activations {normalize!r}, "
                             f"apply_b_dec_to_input {b_dec_first!r} is no OpenAI TopK SAE (topk, layer_norm, true); "
                             "import it with --format saelens")
    if state["W_enc"].ndim != 2:
        raise SAEImportError(f"{weights_path}: W_enc has shape {tuple(state['W_enc'].shape)}, expected [d_in, d_sae]")
    fields: dict[str, Any] = {"architecture": "topk", "k": k, "input_normalization": "layer_norm"}
    hook_name = config.get("hook_name") or config.get("hook_point") or metadata.get("hook_name")
    if isinstance(hook_name, str):
        fields["hook_name"], notes = hook_name, {}
    else:
        hook, notes = _hook_from_path(folder, topk=True)
        fields.update(hook)
    return _imported(cfg_path, state, fields, {"original_cfg": config, **notes}, [cfg_path, weights_path])


def _imported(where: Path, state: dict[str, Tensor], fields: dict[str, Any], notes: dict[str, Any],
              files: list[Path]) -> Imported:
    d_in, d_sae = state["W_enc"].shape
    try:
        cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), model_name=MODEL_NAME,
                        dtype=str(state["W_dec"].dtype).removeprefix("torch."),
                        source={"lm_processing": None, **notes}, **fields)
    except ValueError as err:
        raise SAEImportError(f"{where}: {err}") from err
    return Imported(cfg, state, files)


def _hook_from_path(path: Path, topk: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """({"hook_name": ...} or {}, notes for `cfg.source`) from OpenAI's location and layer in `path`."""
    locations = re.findall("|".join(LOCATIONS), path.as_posix())
    found = re.fullmatch(r"(\d+)", path.stem) or re.search(r"layer_?(\d+)", path.name)
    if found is None:
        return {}, {"hook_unknown": f"{path.name} names no layer ({{L}}.pt or layer_L)"}
    layer = int(found.group(1))
    if locations:
        return {"hook_name": LOCATIONS[locations[-1]].format(layer=layer)}, {}
    if topk:
        return {"hook_name": f"blocks.{layer}.hook_resid_post"}, {
            "hook_assumed": f"{path} names no location ({', '.join(LOCATIONS)}); taken as resid_post_mlp, as "
                            "SAELens' mirror of OpenAI's v5 resid-post SAEs names its files"}
    return {}, {"hook_unknown": f"{path} names no location ({', '.join(LOCATIONS)})"}
