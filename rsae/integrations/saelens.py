"""SAELens integration: `register()` teaches SAELens the `rsae` architecture that `rsae.zoo.export.export_saelens`
writes, so that `sae_lens.SAE.load_from_disk(folder)` of an exported RSAE returns it as a SAELens SAE.

The SAELens class wraps the rsae model itself (`sae.model`) and runs rsae's own code, so its `encode`, `decode`
and `forward` give what the rsae model gives. SAELens' hook points see what they see in SAELens' own SAEs
(`hook_sae_input`, `hook_sae_acts_pre`, `hook_sae_acts_post`, `hook_sae_recons`, `hook_sae_output`), and
`sae.save_model` writes the folder `export_saelens` wrote. A layer-norm RSAE keeps the token statistics of its last
`encode` for the next `decode`, as SAELens' `layer_norm` does; rsae's own `decode` stays in the normalised space.

sae_lens is imported only when `register()` runs: rsae never needs it, and its transformer-lens pin can keep it
out of rsae's environment.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from rsae.nn.config import SAEConfig
from rsae.nn.registry import build_model
from rsae.nn.sae import SparseAutoencoder, TokenNormalization
from rsae.zoo.export import ARCHITECTURES

ARCHITECTURE = ARCHITECTURES["rsae"]
_PREFIX = "model."
"""The wrapped model's parameters are `model.*` in the SAELens module and bare rsae names in the files."""


def register() -> type:
    """Register the `rsae` architecture with SAELens (once; again is a no-op) and return its SAE class."""
    _require_sae_lens()
    from sae_lens import register_sae_class
    from sae_lens.registry import SAE_CLASS_REGISTRY

    sae_class, config_class = saelens_classes()
    registered = SAE_CLASS_REGISTRY.get(ARCHITECTURE)
    if registered is None:
        register_sae_class(ARCHITECTURE, sae_class, config_class)
    elif registered[0] is not sae_class:
        raise RuntimeError(f"SAELens already has a class for architecture {ARCHITECTURE!r} ({registered[0]!r}); "
                           "rsae.integrations.saelens.register() cannot replace it")
    return sae_class


def _require_sae_lens() -> None:
    try:
        import sae_lens  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "rsae.integrations.saelens needs SAELens, which is not installed: pip install sae-lens (in an environment "
            "of its own if its transformer-lens pin conflicts with rsae's); rsae.zoo.export.export_saelens writes "
            "SAELens folders without it") from err


@functools.cache
def saelens_classes() -> tuple[type, type]:
    """(SAE class, config class) of the `rsae` architecture. They subclass SAELens' own classes, so they are built
    on first use, with sae_lens imported."""
    _require_sae_lens()
    from sae_lens import SAE
    from sae_lens import SAEConfig as SAELensConfig

    @dataclass
    class RSAESAEConfig(SAELensConfig):
        rsae_cfg: dict[str, Any] = field(default_factory=dict)
        """The wrapped model's rsae config (`SAEConfig.to_dict()`)."""

        @classmethod
        def architecture(cls) -> str:
            return ARCHITECTURE

    class RSAESAE(SAE[RSAESAEConfig]):  # type: ignore[misc, valid-type]
        """A SAELens SAE running the rsae model it wraps."""

        model: SparseAutoencoder

        def __init__(self, cfg: RSAESAEConfig, use_error_term: bool = False) -> None:
            super().__init__(cfg, use_error_term)
            self._normalization: TokenNormalization | None = None

        def initialize_weights(self) -> None:
            # SAELens' __init__ asks for the weights; the rsae model owns every one (the loader assigns the file's).
            self.model = build_model(SAEConfig.from_dict(self.cfg.rsae_cfg))

        @property
        def W_enc(self) -> nn.Parameter:  # type: ignore[override]
            return self.model.W_enc

        @property
        def b_enc(self) -> nn.Parameter:
            return self.model.b_enc

        @property
        def W_dec(self) -> nn.Parameter:  # type: ignore[override]
            return self.model.W_dec

        @property
        def b_dec(self) -> nn.Parameter:  # type: ignore[override]
            return self.model.b_dec

        def encode(self, x: Tensor) -> Tensor:
            sae_in = self.hook_sae_input(self.reshape_fn_in(x.to(self.model.dtype)))
            lead, d_sae = sae_in.shape[:-1], self.cfg.d_sae
            x_in, self._normalization = self.model.prepare(sae_in)
            pre_acts = self.model.centered(x_in) @ self.model.W_enc + self.model.b_enc
            pre_acts = self.hook_sae_acts_pre(pre_acts.reshape(*lead, d_sae)).reshape(-1, d_sae)
            codes = self.model.activate(pre_acts).dense(d_sae)
            return self.hook_sae_acts_post(codes.reshape(*lead, d_sae))

        def decode(self, feature_acts: Tensor) -> Tensor:
            x_hat = self.hook_sae_recons(self.model.decode(feature_acts))
            if self._normalization is not None:
                flat = x_hat.reshape(-1, self.cfg.d_in)
                x_hat = self.model.restore(flat, self._normalization).reshape(x_hat.shape)
                self._normalization = None
            return self.reshape_fn_out(x_hat, self.d_head)

        def fold_W_dec_norm(self) -> None:
            # SAELens rescales W_enc, b_enc and W_dec per latent; the rational gate and a TopK selection are not
            # invariant under that, so the result would not be the same SAE.
            raise NotImplementedError("an RSAE cannot fold its decoder norms into the encoder: its gate would change")

        def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
            for key in list(state_dict):
                state_dict[_PREFIX + key] = state_dict.pop(key)

        def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
            for key in list(state_dict):
                if key.startswith(_PREFIX):
                    state_dict[key[len(_PREFIX):]] = state_dict.pop(key)

    return RSAESAE, RSAESAEConfig
