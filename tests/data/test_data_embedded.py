import re
from pathlib import Path

import numpy as np

from infmoe.data import embedded, prepare
from infmoe.data.embedded import build_embedded_text, embedded_documents, stdlib_files, stdlib_root
from infmoe.data.text import EOT


def test_embedded_corpus_is_at_least_2_mb_of_english(embedded_cache):
    _, text = embedded_cache
    assert len(text.encode("utf-8")) >= 2_000_000
    words = re.findall(r"[A-Za-z]+", text)
    assert sum(len(w) for w in words) > 0.6 * len(text)  # mostly letters: prose, not tables of numbers
    lower = [w.lower() for w in words[:200_000]]
    assert lower.count("the") > 0.03 * len(lower) and lower.count("return") > 500
    assert 'The "assert" statement' in text  # a language reference topic
    assert "Module json\n\nJSON (JavaScript Object Notation)" in text  # a standard-library docstring


def test_embedded_corpus_is_deterministic(embedded_cache):
    _, text = embedded_cache
    assert build_embedded_text() == text  # built anew, without the cache


def test_embedded_documents_are_separated_by_the_marker(embedded_cache):
    _, text = embedded_cache
    docs = embedded_documents(text)
    assert len(docs) == text.count(f"\n{EOT}\n") + 1 > 400
    assert all(doc and doc == doc.strip() and EOT not in doc for doc in docs)


def test_test_suites_and_idle_are_left_out():
    parts = {part for path in stdlib_files() for part in path.relative_to(stdlib_root()).parts[:-1]}
    assert not parts & {"test", "tests", "idlelib", "site-packages", "encodings"}
    assert {"json", "email"} <= parts


def test_the_cached_text_is_reused(embedded_cache, monkeypatch):
    folder, text = embedded_cache
    monkeypatch.setattr(
        embedded, "build_embedded_text", lambda: (_ for _ in ()).throw(AssertionError("rebuilt"))
    )
    again, path = embedded.embedded_text(folder)
    assert again == text and path.parent == folder and path.read_text(encoding="utf-8") == text


def test_prepare_the_embedded_corpus(embedded_cache, monkeypatch):
    folder, text = embedded_cache
    prepared = prepare(cache_dir=folder, tokenizer="bpe", vocab_size=512, progress=False)
    meta = prepared.meta
    assert meta["source"].startswith("embedded: the Python documentation")
    assert prepared.directory.name.startswith("embedded-") and prepared.vocab_size == 512
    n_docs = len(embedded_documents(text))
    assert (
        meta["valid_documents"] == round(0.05 * n_docs)
        and meta["train_documents"] == n_docs - meta["valid_documents"]
    )
    assert (prepared.train == prepared.tokenizer.eot_id).sum() == meta["train_documents"]
    sample = prepared.tokenizer.decode(prepared.valid[:400].tolist())
    assert sample.startswith("Module ") and " the " in sample
    again = prepare("embedded", cache_dir=folder, tokenizer="bpe", vocab_size=512, progress=False)
    assert (
        again.cached and again.directory == prepared.directory and np.array_equal(again.valid, prepared.valid)
    )


def test_a_python_without_library_sources_gets_a_clear_error(monkeypatch, tmp_path: Path, one_line_error):
    from infmoe.errors import DataError

    monkeypatch.setattr(embedded, "stdlib_root", lambda: tmp_path)
    one_line_error(DataError, build_embedded_text, match=r"needs the Python standard library's \.py sources")
