"""Configuration of every model rsae builds: the baselines (relu, jumprelu, topk) and the RSAE.

One flat dataclass serves all architectures so that `cfg.json` has a single schema and SAEBench's
custom-SAE contract (`cfg.d_in`, `cfg.d_sae`, `cfg.hook_name`, `cfg.hook_layer`, `cfg.model_name`)
holds for every model.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["relu", "jumprelu", "topk"]
InputNormalization = Literal["none", "layer_norm"]
Architecture = Literal["relu", "jumprelu", "topk", "rsae"]
GateMode = Literal["masked", "pure", "thresholded"]
CoefficientSharing = Literal["shared", "group", "feature"]

FAMILIES: tuple[str, ...] = ("relu", "jumprelu", "topk")
ARCHITECTURES: tuple[str, ...] = (*FAMILIES, "rsae")
GATE_MODES: tuple[str, ...] = ("masked", "pure", "thresholded")
COEFFICIENT_SHARINGS: tuple[str, ...] = ("shared", "group", "feature")
DTYPES: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")
INPUT_NORMALIZATIONS: tuple[str, ...] = ("none", "layer_norm")
LM_PROCESSING_OPTIONS: tuple[str, ...] = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
"""HookedTransformer's load-time weight processing, as `cfg.source["lm_processing"]` records it for an imported
teacher (`TransformerBridge.enable_compatibility_mode` reproduces it)."""


@dataclass
class SAEConfig:
    d_in: int
    """Width of the language-model activations the SAE reads."""

    d_sae: int
    """Number of latents (dictionary size)."""

    architecture: Architecture = "relu"
    """Which model class: a baseline family ('relu', 'jumprelu', 'topk') or 'rsae'."""

    family: Family | None = None
    """The sparsity family. For a baseline it equals `architecture`; for an RSAE it is the
    teacher's family, whose support rule the `masked` mode keeps."""

    k: int | None = None
    """Active latents per token (topk family only)."""

    jumprelu_bandwidth: float = 1e-3
    """Width of the rectangle kernel of the JumpReLU straight-through estimator, in activation units."""

    jumprelu_init_threshold: float = 1e-3
    """Initial per-feature threshold of a JumpReLU SAE trained from scratch."""

    degree: tuple[int, int] | None = None
    """(p, q): numerator and denominator degree of the rational gate (rsae only)."""

    mode: GateMode = "masked"
    """How the rational gate makes latents sparse (rsae only): 'masked' keeps the teacher's support
    rule and shapes active magnitudes; 'pure' applies the rational everywhere; 'thresholded' zeroes
    outputs with |phi(h)| <= threshold_eps, with straight-through gradients."""

    coefficient_sharing: CoefficientSharing = "shared"
    """Rational coefficients shared by all latents, by groups of latents, or per latent (rsae only)."""

    n_coefficient_groups: int = 1
    """Number of latent groups when coefficient_sharing == 'group'."""

    threshold_eps: float = 1e-3
    """'thresholded' mode: outputs with |phi(h)| <= threshold_eps become exact zeros."""

    l0_tolerance: float = 1e-6
    """Latents with |z| <= l0_tolerance count as inactive in the tolerance L0 (exact L0 counts z != 0)."""

    hook_name: str = "blocks.0.hook_resid_post"
    """TransformerLens-style hook point the SAE was trained on."""

    hook_layer: int | None = None
    """Layer of the hook point; parsed from `hook_name` ('blocks.L.') when not given."""

    model_name: str = "unknown"
    """Name of the language model the activations come from."""

    dtype: str = "float32"
    """Storage dtype of the parameters."""

    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAELens' flag of the same name; the usual recipe). Gemma
    Scope's JumpReLU SAEs encode the raw input: False."""

    input_normalization: InputNormalization = "none"
    """'layer_norm': every token is centred and divided by its unbiased standard deviation plus 1e-5 before
    encoding, and the reconstruction is scaled back by the std and the mean (OpenAI's TopK SAEs; SAELens'
    `layer_norm`). 'none': no
    per-token normalisation (a constant normalisation factor is folded into the weights instead)."""

    source: dict[str, Any] = field(default_factory=dict)
    """Where the weights came from, for an imported SAE: format, path or Hub repo and revision, file hashes,
    licence, and the LM processing the teacher was trained under (`rsae.zoo.importers` fills it)."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (training run, data, normalisation factor) carried into cfg.json."""

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = self.architecture if self.architecture in FAMILIES else "relu"
        if self.hook_layer is None:
            match = re.match(r"blocks\.(\d+)\.", self.hook_name)
            self.hook_layer = int(match.group(1)) if match else 0
        if self.degree is not None:
            self.degree = (int(self.degree[0]), int(self.degree[1]))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the accepted values."""

        def bad(name: str, value: object, expected: str) -> ValueError:
            return ValueError(f"SAEConfig.{name}={value!r} is invalid: expected {expected}")

        if not (isinstance(self.d_in, int) and self.d_in > 0):
            raise bad("d_in", self.d_in, "a positive int")
        if not (isinstance(self.d_sae, int) and self.d_sae > 0):
            raise bad("d_sae", self.d_sae, "a positive int")
        if self.architecture not in ARCHITECTURES:
            raise bad("architecture", self.architecture, f"one of {ARCHITECTURES}")
        if self.family not in FAMILIES:
            raise bad("family", self.family, f"one of {FAMILIES}")
        if self.architecture in FAMILIES and self.family != self.architecture:
            raise bad("family", self.family, f"{self.architecture!r} (same as architecture) for a baseline")
        if self.family == "topk" and not (isinstance(self.k, int) and 0 < self.k <= self.d_sae):
            raise bad("k", self.k, f"an int in [1, d_sae={self.d_sae}] for the topk family")
        if self.mode not in GATE_MODES:
            raise bad("mode", self.mode, f"one of {GATE_MODES}")
        if self.coefficient_sharing not in COEFFICIENT_SHARINGS:
            raise bad("coefficient_sharing", self.coefficient_sharing, f"one of {COEFFICIENT_SHARINGS}")
        if self.coefficient_sharing == "group" and not (1 <= self.n_coefficient_groups <= self.d_sae):
            raise bad("n_coefficient_groups", self.n_coefficient_groups, f"an int in [1, d_sae={self.d_sae}]")
        if self.architecture == "rsae":
            if self.degree is None or min(self.degree) < 0 or self.degree[0] < 1:
                raise bad("degree", self.degree, "(p, q) with p >= 1 and q >= 0 for an rsae")
        if self.jumprelu_bandwidth <= 0:
            raise bad("jumprelu_bandwidth", self.jumprelu_bandwidth, "a positive float")
        if self.threshold_eps < 0 or self.l0_tolerance < 0:
            raise bad("threshold_eps/l0_tolerance", (self.threshold_eps, self.l0_tolerance), "non-negative floats")
        if self.dtype not in DTYPES:
            raise bad("dtype", self.dtype, f"one of {DTYPES}")
        if self.input_normalization not in INPUT_NORMALIZATIONS:
            raise bad("input_normalization", self.input_normalization, f"one of {INPUT_NORMALIZATIONS}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["degree"] = list(self.degree) if self.degree is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build from a dict (e.g. cfg.json); unknown keys are an error, so typos do not pass silently."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SAEConfig fields {unknown}; known fields are {sorted(names)}")
        data = dict(data)
        if data.get("degree") is not None:
            data["degree"] = tuple(data["degree"])
        return cls(**data)
