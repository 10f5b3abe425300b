"""dictionary_learning importer: trainer folders written from known weights in the library's own layout
(`ae.pt` + `config.json`, as `trainSAE` saves them), compared with a reference forward pass that follows the
library's classes (`dictionary_learning/dictionary.py`, `trainers/top_k.py`, `trainers/batch_top_k.py`,
`trainers/matryoshka_batch_top_k.py`), never rsae's loader."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from rsae.nn.sae import SparseAutoencoder
from rsae.zoo.checkpoint import load, save
from rsae.zoo.importers import SAEImportError, import_sae

D_IN, D_SAE, K = 12, 40, 5
LAYER, LM = 3, "EleutherAI/pythia-70m-deduped"
CLASSES = ("AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
           "BatchTopKSAE", "MatryoshkaBatchTopKSAE")
TOPK_CLASSES = ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE")
BATCH_THRESHOLD = 0.4

pytestmark = pytest.mark.usefixtures("small_cpu_settings")


# --- the format, written from its own description ---------------------------------------------------------------


def random_state(dict_class: str, d_in: int = D_IN, d_sae: int = D_SAE, seed: int = 0) -> dict[str, Tensor]:
    """Weights of `dict_class` in its own names and layouts (nn.Linear weights are [out, in]), chosen so that every
    rule matters: a large b_dec, decoder columns far from unit norm, thresholds inside the pre-activations' range."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return scale * torch.randn(*shape, generator=gen)

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=gen)

    linear_enc = randn(d_sae, d_in, scale=1 / math.sqrt(d_in))
    linear_dec = randn(d_in, d_sae) * uniform(0.3, 3.0, d_sae)  # columns of norm ~ sqrt(d_in) * [0.3, 3]
    b_dec = randn(d_in, scale=2.0)
    if dict_class == "AutoEncoder":
        return {"bias": b_dec, "encoder.weight": linear_enc, "encoder.bias": randn(d_sae, scale=0.3),
                "decoder.weight": linear_dec}
    if dict_class == "AutoEncoderNew":
        return {"encoder.weight": linear_enc, "encoder.bias": randn(d_sae, scale=0.3), "decoder.weight": linear_dec,
                "decoder.bias": b_dec}
    if dict_class == "GatedAutoEncoder":
        return {"decoder_bias": b_dec, "encoder.weight": linear_enc, "r_mag": randn(d_sae, scale=0.5),
                "gate_bias": randn(d_sae, scale=0.5), "mag_bias": randn(d_sae, scale=0.5), "decoder.weight": linear_dec}
    if dict_class == "JumpReluAutoEncoder":
        return {"W_enc": linear_enc.T.contiguous(), "b_enc": randn(d_sae, scale=0.3),
                "W_dec": linear_dec.T.contiguous(), "b_dec": b_dec, "threshold": uniform(-0.3, 1.0, d_sae)}
    buffers = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(BATCH_THRESHOLD)}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {**buffers, "decoder.weight": linear_dec, "encoder.weight": linear_enc,
                "encoder.bias": randn(d_sae, scale=0.3), "b_dec": b_dec}
    assert dict_class == "MatryoshkaBatchTopKSAE"
    return {**buffers, "group_sizes": torch.tensor([d_sae // 4, d_sae - d_sae // 4]),
            "W_enc": linear_enc.T.contiguous(), "b_enc": randn(d_sae, scale=0.3), "W_dec": linear_dec.T.contiguous(),
            "b_dec": b_dec}


def trainer_config(dict_class: str, **overrides: Any) -> dict[str, Any]:
    """config.json as trainSAE writes it: the trainer's `config` property and the buffer's."""
    trainer: dict[str, Any] = {"dict_class": dict_class, "trainer_class": "Trainer", "activation_dim": D_IN,
                               "dict_size": D_SAE, "lr": 1e-4, "steps": 1000, "seed": 0, "device": "cuda",
                               "layer": LAYER, "lm_name": LM, "wandb_name": dict_class,
                               "submodule_name": f"resid_post_layer_{LAYER}"}
    if dict_class in TOPK_CLASSES:
        trainer["k"] = K
    trainer.update(overrides)
    return {"trainer": trainer, "buffer": {"d_submodule": D_IN, "io": "out", "n_ctxs": 3000, "ctx_len": 128,
                                           "refresh_batch_size": 32, "out_batch_size": 8192, "device": "cuda"}}


def write_trainer(folder: Path, state: dict[str, Any], config: dict[str, Any] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ae.pt")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=4))
    return folder


# --- the library's forward pass ------------------------------------------------------------------------------------


class Reference(NamedTuple):
    encode: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor], Tensor]

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def reference(dict_class: str, sd: dict[str, Tensor]) -> Reference:
    """The class's `encode` / `decode` as the library writes them, after its `from_pretrained`."""
    if dict_class == "AutoEncoder":
        # from_pretrained(normalize_decoder=True): unit decoder columns, the encoder rows and bias scaled up.
        norms = sd["decoder.weight"].norm(dim=0)
        enc_w, enc_b = sd["encoder.weight"] * norms[:, None], sd["encoder.bias"] * norms
        dec_w = sd["decoder.weight"] / norms
        return Reference(lambda x: F.relu(F.linear(x - sd["bias"], enc_w, enc_b)),
                         lambda f: F.linear(f, dec_w) + sd["bias"])
    if dict_class == "AutoEncoderNew":
        return Reference(lambda x: F.relu(F.linear(x, sd["encoder.weight"], sd["encoder.bias"])),
                         lambda f: F.linear(f, sd["decoder.weight"], sd["decoder.bias"]))
    if dict_class == "GatedAutoEncoder":
        def gated(x: Tensor) -> Tensor:
            x_enc = F.linear(x - sd["decoder_bias"], sd["encoder.weight"])
            f_gate = (x_enc + sd["gate_bias"] > 0).float()
            return f_gate * F.relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])
        return Reference(gated, lambda f: F.linear(f, sd["decoder.weight"]) + sd["decoder_bias"])
    if dict_class == "JumpReluAutoEncoder":
        def jump(x: Tensor) -> Tensor:  # apply_b_dec_to_input is False after from_pretrained
            pre_jump = x @ sd["W_enc"] + sd["b_enc"]
            return F.relu(pre_jump * (pre_jump > sd["threshold"]))
        return Reference(jump, lambda f: f @ sd["W_dec"] + sd["b_dec"])
    if dict_class == "AutoEncoderTopK":
        def topk(x: Tensor) -> Tensor:  # encode(use_threshold=False), the default
            post_relu = F.relu(F.linear(x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
            top = post_relu.topk(int(sd["k"]), sorted=False, dim=-1)
            return torch.zeros_like(post_relu).scatter_(-1, top.indices, top.values)
        return Reference(topk, lambda f: F.linear(f, sd["decoder.weight"]) + sd["b_dec"])
    if dict_class == "BatchTopKSAE":
        def batch(x: Tensor) -> Tensor:  # encode(use_threshold=True), the default
            post_relu = F.relu(F.linear(x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
            return post_relu * (post_relu > sd["threshold"])
        return Reference(batch, lambda f: F.linear(f, sd["decoder.weight"]) + sd["b_dec"])
    assert dict_class == "MatryoshkaBatchTopKSAE"

    def matryoshka(x: Tensor) -> Tensor:
        post_relu = F.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
        encoded = post_relu * (post_relu > sd["threshold"])
        encoded[:, int(sd["group_sizes"].sum()):] = 0  # every group active once loaded: a no-op
        return encoded
    return Reference(matryoshka, lambda f: f @ sd["W_dec"] + sd["b_dec"])


def activations(n: int = 64, d_in: int = D_IN, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, d_in, generator=gen) + 3 * torch.randn(d_in, generator=gen)


def assert_matches(model: SparseAutoencoder, ref: Reference, x: Tensor) -> None:
    z = ref.encode(x)
    assert 0 < (z > 0).float().mean() < 1  # not vacuous: some latents fire, some do not
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(z), ref.decode(z), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), ref.forward(x), atol=1e-5, rtol=1e-5)


# --- the importer against the library -----------------------------------------------------------------------------


EXPECTED = {  # dict_class -> (architecture, apply_b_dec_to_input)
    "AutoEncoder": ("relu", True), "AutoEncoderNew": ("relu", False), "GatedAutoEncoder": ("jumprelu", True),
    "JumpReluAutoEncoder": ("jumprelu", False), "AutoEncoderTopK": ("topk", True),
    "BatchTopKSAE": ("jumprelu", True), "MatryoshkaBatchTopKSAE": ("jumprelu", True),
}


@pytest.mark.parametrize("dims", [(D_IN, D_SAE), (16, 16)], ids=["rect", "square"])
@pytest.mark.parametrize("dict_class", CLASSES)
def test_matches_the_library(tmp_path: Path, dict_class: str, dims: tuple[int, int]) -> None:
    """Square shapes too: a swapped transpose would still fit them, and only the outputs catch it."""
    d_in, d_sae = dims
    sd = random_state(dict_class, d_in, d_sae)
    config = trainer_config(dict_class, activation_dim=d_in, dict_size=d_sae)
    folder = write_trainer(tmp_path / "trainer_0", sd, config)
    x, ref = activations(d_in=d_in), reference(dict_class, sd)
    for model in (import_sae(folder), import_sae(folder, format="dictionary_learning")):
        assert (model.cfg.architecture, model.cfg.apply_b_dec_to_input) == EXPECTED[dict_class]
        assert (model.cfg.d_in, model.cfg.d_sae) == (d_in, d_sae)
        assert model.cfg.source["format"] == "dictionary_learning"
        assert model.cfg.source["dict_class"] == dict_class
        assert_matches(model, ref, x)


def unnormalised(model: SparseAutoencoder, sd: dict[str, Tensor]) -> None:
    """The AutoEncoder's weights as stored, without from_pretrained's unit-norm decoder: the same forward."""
    model.W_enc.data, model.b_enc.data = sd["encoder.weight"].T.clone(), sd["encoder.bias"].clone()
    model.W_dec.data = sd["decoder.weight"].T.clone()


WRONG: dict[str, Callable[[SparseAutoencoder, dict[str, Tensor]], None]] = {
    "b_dec rule flipped": lambda m, sd: setattr(m.cfg, "apply_b_dec_to_input", not m.cfg.apply_b_dec_to_input),
    "encoder transposed": lambda m, sd: setattr(m.W_enc, "data", m.W_enc.data.T.clone()),
    "decoder transposed": lambda m, sd: setattr(m.W_dec, "data", m.W_dec.data.T.clone()),
    "threshold ignored": lambda m, sd: m.threshold.data.zero_(),
    "decoder not normalised": unnormalised,
}
BITES = [("AutoEncoder", "b_dec rule flipped"), ("AutoEncoderNew", "b_dec rule flipped"),
         ("JumpReluAutoEncoder", "b_dec rule flipped"), ("BatchTopKSAE", "b_dec rule flipped"),
         ("AutoEncoder", "encoder transposed"), ("JumpReluAutoEncoder", "decoder transposed"),
         ("JumpReluAutoEncoder", "threshold ignored"), ("GatedAutoEncoder", "threshold ignored"),
         ("BatchTopKSAE", "threshold ignored"), ("AutoEncoder", "decoder not normalised")]


@pytest.mark.parametrize(("dict_class", "mistake"), BITES)
def test_the_comparison_catches_each_mistake(tmp_path: Path, dict_class: str, mistake: str) -> None:
    """The data of `test_matches_the_library` tell the right rule from the wrong one: an importer that got this one
    thing wrong fails the comparison."""
    sd = random_state(dict_class, 16, 16)
    folder = write_trainer(tmp_path / "t", sd, trainer_config(dict_class, activation_dim=16, dict_size=16))
    model = import_sae(folder, format="dictionary_learning")
    wrong = copy.deepcopy(model)
    WRONG[mistake](wrong, sd)
    x, ref = activations(d_in=16), reference(dict_class, sd)
    with torch.no_grad():
        assert_matches(model, ref, x)
        codes_differ = not torch.allclose(wrong.encode(x), ref.encode(x), atol=1e-3)
        assert codes_differ or not torch.allclose(wrong(x), ref.forward(x), atol=1e-3)


def test_batch_topk_threshold_is_a_constant_jumprelu_threshold(tmp_path: Path) -> None:
    sd = random_state("BatchTopKSAE")
    model = import_sae(write_trainer(tmp_path / "t", sd, trainer_config("BatchTopKSAE")))
    torch.testing.assert_close(model.threshold.data, torch.full((D_SAE,), BATCH_THRESHOLD))
    assert model.cfg.source["inference"] == "global threshold"
    assert model.cfg.source["k"] == K
    l0 = (reference("BatchTopKSAE", sd).encode(activations()) > 0).sum(-1)
    assert l0.min() != l0.max()  # a threshold, not k per token


def test_topk_keeps_k_per_token_and_records_its_inference_threshold(tmp_path: Path) -> None:
    sd = random_state("AutoEncoderTopK")
    model = import_sae(write_trainer(tmp_path / "t", sd, trainer_config("AutoEncoderTopK")))
    assert model.cfg.k == K
    assert model.cfg.source["inference_threshold"] == pytest.approx(BATCH_THRESHOLD)
    assert bool(((model.encode(activations()) > 0).sum(-1) == K).all())


@pytest.mark.parametrize("dict_class", ["BatchTopKSAE", "MatryoshkaBatchTopKSAE"])
def test_threshold_never_set_is_refused(tmp_path: Path, dict_class: str) -> None:
    sd = {**random_state(dict_class), "threshold": torch.tensor(-1.0)}
    folder = write_trainer(tmp_path / "t", sd, trainer_config(dict_class))
    with pytest.raises(SAEImportError, match="threshold_start_step") as err:
        import_sae(folder)
    assert str(folder / "ae.pt") in str(err.value)


def test_batch_topk_from_before_the_threshold_is_per_token_topk(tmp_path: Path) -> None:
    """Before December 2024 the file had no threshold buffer (and AutoEncoderTopK no k buffer either)."""
    sd = {key: value for key, value in random_state("BatchTopKSAE").items() if key not in ("threshold", "k")}
    model = import_sae(write_trainer(tmp_path / "t", sd, trainer_config("BatchTopKSAE")))
    assert model.cfg.architecture == "topk" and model.cfg.k == K
    assert "per-token top-k" in model.cfg.source["inference"]
    reference_topk = reference("AutoEncoderTopK", {**sd, "k": torch.tensor(K)})
    torch.testing.assert_close(model.encode(activations()), reference_topk.encode(activations()))


def test_k_of_the_file_and_of_config_must_agree(tmp_path: Path) -> None:
    folder = write_trainer(tmp_path / "t", random_state("AutoEncoderTopK"), trainer_config("AutoEncoderTopK", k=7))
    with pytest.raises(SAEImportError, match="trainer.k=7"):
        import_sae(folder)


def test_topk_without_any_k_is_refused(tmp_path: Path) -> None:
    sd = {key: value for key, value in random_state("AutoEncoderTopK").items() if key != "k"}
    config = trainer_config("AutoEncoderTopK")
    del config["trainer"]["k"]
    with pytest.raises(SAEImportError, match="no k buffer"):
        import_sae(write_trainer(tmp_path / "t", sd, config))


def test_provenance_from_config_json(tmp_path: Path) -> None:
    config = trainer_config("AutoEncoder")
    folder = write_trainer(tmp_path / "trainer_0", random_state("AutoEncoder"), config)
    cfg = import_sae(folder).cfg
    assert (cfg.hook_name, cfg.hook_layer, cfg.model_name, cfg.dtype) == (
        f"blocks.{LAYER}.hook_resid_post", LAYER, LM, "float32")
    assert cfg.source["original_cfg"] == config
    assert cfg.source["lm_processing"] is None and cfg.source["decoder_normalized"] is True
    assert set(cfg.source["files"]) == {"ae.pt", "config.json"}
    assert cfg.source["location"] == str(folder.resolve())
    assert "hook_unknown" not in cfg.source


@pytest.mark.parametrize("overrides", [{"submodule_name": "mlp_out_layer_3"}, {"layer": None}])
def test_a_hook_it_cannot_name_stays_unknown(tmp_path: Path, overrides: dict[str, Any]) -> None:
    config = trainer_config("AutoEncoder", **overrides)
    cfg = import_sae(write_trainer(tmp_path / "t", random_state("AutoEncoder"), config)).cfg
    assert cfg.hook_name == "blocks.0.hook_resid_post"  # SAEConfig's default
    assert "name no residual-stream output" in cfg.source["hook_unknown"]


def test_the_import_saves_as_an_rsae_checkpoint(tmp_path: Path) -> None:
    model = import_sae(write_trainer(tmp_path / "t", random_state("BatchTopKSAE"), trainer_config("BatchTopKSAE")))
    loaded = load(save(model, tmp_path / "ckpt"))
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded(activations()), model(activations()))


def test_bfloat16_weights_keep_their_dtype(tmp_path: Path) -> None:
    sd = {key: value.to(torch.bfloat16) for key, value in random_state("JumpReluAutoEncoder").items()}
    model = import_sae(write_trainer(tmp_path / "t", sd, trainer_config("JumpReluAutoEncoder")))
    assert model.cfg.dtype == "bfloat16" and model.W_enc.dtype == torch.bfloat16


def test_without_config_json_the_keys_name_the_class(tmp_path: Path) -> None:
    sd = random_state("JumpReluAutoEncoder")
    model = import_sae(write_trainer(tmp_path / "t", sd, None) / "ae.pt")
    assert model.cfg.source["dict_class"] == "JumpReluAutoEncoder" and "original_cfg" not in model.cfg.source
    assert set(model.cfg.source["files"]) == {"ae.pt"}
    assert_matches(model, reference("JumpReluAutoEncoder", sd), activations())


def test_without_config_json_topk_and_batch_topk_cannot_be_told_apart(tmp_path: Path) -> None:
    folder = write_trainer(tmp_path / "t", random_state("BatchTopKSAE"), None)
    with pytest.raises(SAEImportError, match="trainer.dict_class"):
        import_sae(folder)


def test_a_checkpoint_file_finds_its_trainer_config(tmp_path: Path) -> None:
    folder = tmp_path / "trainer_0"
    write_trainer(folder, random_state("AutoEncoderTopK"), trainer_config("AutoEncoderTopK"))
    (folder / "checkpoints").mkdir()
    torch.save(random_state("AutoEncoderTopK", seed=5), folder / "checkpoints" / "ae_100.pt")
    model = import_sae(folder / "checkpoints" / "ae_100.pt")
    assert model.cfg.source["format"] == "dictionary_learning"
    assert set(model.cfg.source["files"]) == {"ae_100.pt", "config.json"}
    assert model.cfg.hook_name == f"blocks.{LAYER}.hook_resid_post"
    assert_matches(model, reference("AutoEncoderTopK", random_state("AutoEncoderTopK", seed=5)), activations())


# --- bad input -------------------------------------------------------------------------------------------------------


class CustomObject:
    """A class of the test's own: weights_only has no business unpickling it."""


class Payload:
    """Unpickling this (a full unpickle) would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["custom class", "code on load"])
def test_a_pickle_weights_only_refuses_is_refused(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "unpickled"
    extra = CustomObject() if kind == "custom class" else Payload(marker)
    folder = write_trainer(tmp_path / "t", {**random_state("AutoEncoder"), "extra": extra},
                           trainer_config("AutoEncoder"))
    with pytest.raises(SAEImportError, match="weights_only=True") as err:
        import_sae(folder)
    assert str(folder / "ae.pt") in str(err.value) and "never runs a full unpickle" in str(err.value)
    assert ("CustomObject" if kind == "custom class" else "open") in str(err.value)
    assert not marker.exists()


def test_missing_key(tmp_path: Path) -> None:
    sd = {key: value for key, value in random_state("AutoEncoder").items() if key != "bias"}
    folder = write_trainer(tmp_path / "t", sd, trainer_config("AutoEncoder"))
    with pytest.raises(SAEImportError, match=r"lacks bias") as err:
        import_sae(folder)
    assert str(folder / "ae.pt") in str(err.value)


def test_unexpected_key(tmp_path: Path) -> None:
    sd = {**random_state("AutoEncoder"), "b_dec": torch.zeros(D_IN)}
    with pytest.raises(SAEImportError, match="unexpected keys b_dec"):
        import_sae(write_trainer(tmp_path / "t", sd, trainer_config("AutoEncoder")))


def test_wrong_shape(tmp_path: Path) -> None:
    sd = {**random_state("JumpReluAutoEncoder"), "threshold": torch.zeros(D_SAE + 1)}
    folder = write_trainer(tmp_path / "t", sd, trainer_config("JumpReluAutoEncoder"))
    with pytest.raises(SAEImportError, match=r"threshold has shape \(41,\), expected \(40,\)") as err:
        import_sae(folder)
    assert str(folder.resolve()) in str(err.value)


def test_a_vector_where_a_matrix_belongs(tmp_path: Path) -> None:
    sd = {**random_state("AutoEncoder"), "encoder.weight": torch.zeros(D_SAE)}
    with pytest.raises(SAEImportError, match="encoder.weight has shape .* expected a matrix"):
        import_sae(write_trainer(tmp_path / "t", sd, trainer_config("AutoEncoder")))


def test_nan_weights(tmp_path: Path) -> None:
    sd = random_state("AutoEncoderNew")
    sd["decoder.bias"][3] = float("nan")
    folder = write_trainer(tmp_path / "t", sd, trainer_config("AutoEncoderNew"))
    with pytest.raises(SAEImportError, match="b_dec holds NaN/Inf") as err:
        import_sae(folder)
    assert str(folder.resolve()) in str(err.value)


def test_mid_training_backup_is_refused(tmp_path: Path) -> None:
    backup = {"step": 500, "ae": random_state("AutoEncoder"), "optimizer": {"state": {}, "param_groups": []},
              "config": trainer_config("AutoEncoder")["trainer"], "norm_factor": 12.5}
    with pytest.raises(SAEImportError, match="mid-training backup"):
        import_sae(write_trainer(tmp_path / "t", backup, trainer_config("AutoEncoder")))


def test_truncated_file(tmp_path: Path) -> None:
    folder = write_trainer(tmp_path / "t", random_state("AutoEncoder"), trainer_config("AutoEncoder"))
    data = (folder / "ae.pt").read_bytes()
    (folder / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEImportError, match="truncated or corrupt") as err:
        import_sae(folder)
    assert str(folder / "ae.pt") in str(err.value)


def test_unknown_dict_class(tmp_path: Path) -> None:
    folder = write_trainer(tmp_path / "t", random_state("AutoEncoder"), trainer_config("CrossCoder"))
    with pytest.raises(SAEImportError, match="trainer.dict_class 'CrossCoder' is not one rsae imports") as err:
        import_sae(folder)
    assert str(folder / "config.json") in str(err.value)


def test_corrupt_config_json(tmp_path: Path) -> None:
    folder = write_trainer(tmp_path / "t", random_state("AutoEncoder"), None)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(SAEImportError, match="config.json"):
        import_sae(folder)
