"""Downstream cross-entropy: splice an SAE into a language model and see what the LM loses.

At the SAE's hook point the activation `x` is replaced by `sae(x * scale) / scale` (the SAE's
reconstruction, in the units it was trained on) at every non-special position, and, for the floor of
the loss-recovered ratio, by zeros. Positions holding special tokens (BOS, EOS, PAD) keep their
original activation in both runs: BOS activations are ~100x the norm of the rest, SAEs are never
trained on them, and every later position attends to BOS, so splicing it would measure the SAE on
data it never saw. The next-token CE of the clean, SAE and zero-ablated runs is averaged over the
positions `LanguageModel.cross_entropy` keeps (see `rsae.eval.metrics.DownstreamCE` for the ratios).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from rsae.data.lm import LanguageModel, next_token_nll, special_mask

SpliceMode = Literal["sae", "zero", "check"]
HookFn = Callable[[Tensor, Any], Tensor | None]


def splice_hook(sae: nn.Module | None, keep_original: Tensor, mode: SpliceMode, scale: float = 1.0,
                d_in: int | None = None, hook_name: str = "?") -> HookFn:
    """A forward hook for `bridge.run_with_hooks` that rewrites the activation [B, T, ...].

    mode 'sae' replaces it by `sae(act * scale) / scale`, 'zero' by zeros, 'check' leaves it alone
    (it only checks the width); in all modes positions where `keep_original` [B, T] is True keep the
    activation they had, and the SAE sees only the others, as rows [N, d_in]. Hooks with several
    trailing dims (e.g. `attn.hook_z` [B, T, H, d_head]) are flattened, the SAELens convention."""
    if d_in is None:
        d_in = int(sae.cfg.d_in)  # type: ignore[union-attr]

    # TransformerLens calls hook functions as fn(activation, hook=hook_point).
    def splice(act: Tensor, hook: Any = None) -> Tensor | None:
        if act.ndim < 3 or tuple(act.shape[:2]) != tuple(keep_original.shape):
            raise ValueError(
                f"hook {hook_name!r} gives activations of shape {tuple(act.shape)}, not [batch, positions, ...] = "
                f"{tuple(keep_original.shape)} + (...): splice an SAE only into a per-position hook point "
                "(e.g. blocks.L.hook_resid_post)"
            )
        width = math.prod(act.shape[2:])
        if width != d_in:
            raise ValueError(
                f"SAE has d_in={d_in} but hook {hook_name!r} has width {width} (shape {tuple(act.shape)}): "
                "was this SAE trained on another hook or model? Pass the SAE of this hook point."
            )
        if mode == "check":
            return None
        # Only ordinary positions are rewritten; special ones keep their activation (see the module
        # docstring) and never reach the SAE, whose gate may be wild far outside its training range.
        rewrite = ~keep_original.to(act.device)
        flat = act.reshape(*act.shape[:2], width)
        new = flat.clone()
        if mode == "zero":
            new[rewrite] = 0
        else:
            new[rewrite] = _reconstruct(sae, flat[rewrite], scale)  # type: ignore[arg-type]
        return new.reshape(act.shape)

    return splice


def _reconstruct(sae: nn.Module, act: Tensor, scale: float) -> Tensor:
    """`sae(act * scale) / scale` for rows [N, d_in], in the SAE's own dtype (fp32 for a module without
    one) and outside autocast: a bf16 SAE pass would add ~1e-2 errors that are not the SAE's."""
    sae_dtype = getattr(sae, "dtype", None)
    sae_dtype = sae_dtype if isinstance(sae_dtype, torch.dtype) else torch.float32
    first = next(iter(sae.parameters()), None)
    sae_device = first.device if first is not None else act.device
    with torch.autocast(device_type=act.device.type, enabled=False):
        x = (act.float() * scale).to(device=sae_device, dtype=sae_dtype)
        x_hat = sae(x).float() / scale
    return x_hat.to(device=act.device, dtype=act.dtype)


def check_tokens(tokens: Tensor | np.ndarray, lm: LanguageModel) -> Tensor:
    """`tokens` as a long tensor [B, T] on the LM's device, refusing shapes and ids the LM cannot score."""
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(np.ascontiguousarray(tokens))
    if not isinstance(tokens, Tensor):
        raise ValueError(f"tokens must be a Tensor or numpy array of token ids [batch, seq], got {type(tokens)}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(
            f"tokens must be 2-D [batch, seq], got shape {tuple(tokens.shape)}; "
            "use tokens.unsqueeze(0) for one sequence or stack sequences of equal length"
        )
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} hold no next-token prediction: "
            "pass at least one sequence of at least 2 tokens (BOS plus one)"
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= lm.d_vocab:
        raise ValueError(
            f"token ids must lie in [0, d_vocab={lm.d_vocab}) of model {lm.name!r}, got [{low}, {high}]: "
            "were these sequences tokenised for another model?"
        )
    return tokens.to(device=lm.device, dtype=torch.long)


def resolve_hook(lm: LanguageModel, sae: nn.Module, hook_name: str | None) -> str:
    """The hook point to splice into: `hook_name`, else the SAE's own, checked against the LM and the SAE."""
    cfg = getattr(sae, "cfg", None)
    trained_hook = getattr(cfg, "hook_name", None)
    if getattr(cfg, "d_in", None) is None:
        raise ValueError("the SAE needs a `cfg` with `d_in` and `hook_name` (the rsae / SAEBench SAE contract)")
    if hook_name is None:
        if trained_hook is None:
            raise ValueError("the SAE's cfg names no hook_name: pass hook_name= to say where to splice it")
        hook_name = str(trained_hook)
    lm.check_hooks(hook_name)
    if trained_hook is not None and hook_name != trained_hook:
        # An explicit hook is a deliberate choice (e.g. probing transfer to a neighbouring layer); say so anyway.
        warnings.warn(
            f"splicing an SAE trained on hook {trained_hook!r} into {hook_name!r}, as requested", stacklevel=3
        )
    model_name = getattr(cfg, "model_name", None)
    if model_name not in (None, "", "unknown") and model_name != lm.name:
        warnings.warn(
            f"the SAE was trained on model {model_name!r}, not {lm.name!r}: its downstream CE here may mean little",
            stacklevel=3,
        )
    return hook_name


def check_scale(scale: float) -> float:
    """`scale` as a float, refusing 0, negatives and non-finite values (they would divide by zero or flip signs)."""
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r} must be a positive finite number (the activation normalisation factor)")
    return float(scale)


def splice_nll(lm: LanguageModel, sae: nn.Module, tokens: Tensor | np.ndarray, hook_name: str | None = None,
               scale: float = 1.0, autocast_bf16: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Next-token NLL (nats) of `tokens` [B, T] with the hook clean, spliced with the SAE, and zero-ablated.

    Returns three 1-D fp32 tensors of equal length, one entry per retained prediction (targets and
    source positions that are not special tokens, the mask of `LanguageModel.cross_entropy`), in
    row-major order. `scale` is the data's normalisation factor: the SAE sees `act * scale`."""
    hook_name = resolve_hook(lm, sae, hook_name)
    return _splice_nll(lm, sae, check_tokens(tokens, lm), hook_name, check_scale(scale), autocast_bf16)


@torch.no_grad()
def _splice_nll(lm: LanguageModel, sae: nn.Module, tokens: Tensor, hook_name: str, scale: float,
                autocast_bf16: bool) -> tuple[Tensor, Tensor, Tensor]:
    """`splice_nll` on checked arguments."""
    special = special_mask(tokens, lm.special_token_ids)
    d_in = int(sae.cfg.d_in)  # type: ignore[union-attr]

    def run(mode: SpliceMode) -> Tensor:
        hook = splice_hook(sae, special, mode, scale=scale, d_in=d_in, hook_name=hook_name)
        with torch.autocast(device_type=tokens.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            logits = lm.bridge.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)], return_type="logits")
        # NLL at once, so that only one batch of logits is alive at a time.
        return next_token_nll(logits, tokens, lm.special_token_ids)

    # The clean run goes first and checks the hook's width, so a wrong SAE fails before it is called.
    return run("check"), run("sae"), run("zero")


def downstream_cross_entropy(lm: LanguageModel, sae: nn.Module, tokens: Tensor | np.ndarray,
                             hook_name: str | None = None, scale: float = 1.0, batch_size: int = 8,
                             autocast_bf16: bool = False, progress: bool = False) -> dict[str, float]:
    """CE clean / with the SAE spliced in / zero-ablated over `tokens` [N, T], with CE degradation and
    loss recovered (ratio of means, reference section 1); `n_tokens` is the number of retained predictions."""
    from rsae.eval.metrics import DownstreamCE

    if isinstance(batch_size, bool) or not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    hook_name = resolve_hook(lm, sae, hook_name)
    tokens = check_tokens(tokens, lm)
    scale = check_scale(scale)
    metric = DownstreamCE().to(tokens.device)
    starts: Any = range(0, tokens.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"downstream CE @ {hook_name}", unit="batch")
    n_tokens = 0
    for start in starts:
        nlls = _splice_nll(lm, sae, tokens[start:start + batch_size], hook_name, scale, autocast_bf16)
        metric.update(*nlls)
        n_tokens += nlls[0].numel()
    if n_tokens == 0:
        raise ValueError("every prediction in tokens is to or from a special token: nothing to score")
    result = {name: float(value) for name, value in metric.compute().items()}
    result["n_tokens"] = float(n_tokens)
    return result
