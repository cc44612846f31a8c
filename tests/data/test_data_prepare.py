import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from infmoe import data
from infmoe.data import PreparedData, Tokenizer, pipeline, prepare, unigram_loss
from infmoe.data.pipeline import default_cache_dir
from infmoe.data.text import EOT
from infmoe.errors import ConfigError, DataError

SMALL = {"tokenizer": "bpe", "vocab_size": 300, "progress": False}


@pytest.fixture
def corpus(tmp_path: Path, paragraphs) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(paragraphs(40), encoding="utf-8")
    return path


def forbid_tokenizing(monkeypatch) -> None:
    """Make any BPE training or tokenization fail, to prove a call only reads the cache."""

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache was valid")

    monkeypatch.setattr(Tokenizer, "train_bpe", fail)
    monkeypatch.setattr(pipeline, "write_tokens", fail)


def test_public_api_is_exactly_the_documented_names():
    assert sorted(data.__all__) == [
        "EMBEDDED",
        "PreparedData",
        "Tokenizer",
        "load_tokenizer",
        "prepare",
        "unigram_loss",
    ]
    assert data.EMBEDDED == "embedded"


def test_prepare_a_file(corpus: Path, cache_dir: Path):
    prepared = prepare(corpus, cache_dir=cache_dir, valid_fraction=0.1, **SMALL)
    assert isinstance(prepared, PreparedData) and not prepared.cached
    assert prepared.directory.parent == cache_dir and prepared.directory.name.startswith("corpus-")
    assert {p.name for p in prepared.directory.iterdir()} == {
        "train.bin",
        "valid.bin",
        "meta.json",
        "tokenizer.json",
    }
    for ids in (prepared.train, prepared.valid):
        assert (
            isinstance(ids, np.memmap)
            and ids.ndim == 1
            and ids.dtype == np.uint16
            and not ids.flags.writeable
        )
        assert int(ids.max()) < prepared.vocab_size and ids[-1] == prepared.tokenizer.eot_id
    eot = prepared.tokenizer.eot_id
    assert (prepared.train == eot).sum() == 36 and (
        prepared.valid == eot
    ).sum() == 4  # 40 documents, last 10 %
    valid_text = prepared.tokenizer.decode(prepared.valid.tolist())
    assert valid_text.startswith("doc 36:") and valid_text.endswith(
        f"doc 39:{valid_text.split('doc 39:')[1]}"
    )
    assert "doc 35:" not in valid_text
    meta = prepared.meta
    assert meta == json.loads((prepared.directory / "meta.json").read_text())
    assert meta["source"] == f"file {corpus}" and meta["fingerprint"].startswith(
        prepared.directory.name[-12:]
    )
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == (
        prepared.tokenizer.name,
        prepared.vocab_size,
        "uint16",
    )
    assert (meta["train_tokens"], meta["valid_tokens"]) == (len(prepared.train), len(prepared.valid))
    assert (meta["train_documents"], meta["valid_documents"]) == (36, 4)


def test_the_tokenizer_is_trained_on_the_training_split_only(tmp_path: Path, cache_dir: Path):
    # The validation text is letters the training text never has: trained on it, BPE would
    # merge them; trained on train only, each stays one byte token.
    train = "\n\n".join(f"plain words number {i}" for i in range(30))
    (tmp_path / "train.txt").write_text(train)
    (tmp_path / "valid.txt").write_text("zqxj" * 200)
    prepared = prepare(tmp_path, cache_dir=cache_dir, **SMALL)
    assert len(prepared.valid) == 800 + 1  # 800 bytes, then <|endoftext|>


def test_two_prepares_give_identical_arrays(corpus: Path, tmp_path: Path):
    first = prepare(corpus, cache_dir=tmp_path / "one", **SMALL)
    second = prepare(corpus, cache_dir=tmp_path / "two", **SMALL)
    assert not second.cached and first.directory.name == second.directory.name
    assert np.array_equal(first.train, second.train) and np.array_equal(first.valid, second.valid)


def test_the_second_prepare_reuses_the_cache(corpus: Path, cache_dir: Path, monkeypatch):
    first = prepare(corpus, cache_dir=cache_dir, **SMALL)
    forbid_tokenizing(monkeypatch)
    again = prepare(str(corpus), cache_dir=cache_dir, **SMALL)
    assert again.cached and again.directory == first.directory and again.meta == first.meta
    assert np.array_equal(again.train, first.train) and again.tokenizer.encode(
        "the fox"
    ) == first.tokenizer.encode("the fox")


@pytest.mark.parametrize(
    "damage", ["garbage meta", "no meta", "wrong fingerprint", "short train.bin", "no tokenizer"]
)
def test_a_damaged_cache_is_rebuilt(corpus: Path, cache_dir: Path, damage: str):
    first = prepare(corpus, cache_dir=cache_dir, **SMALL)
    train, meta_file = first.train.copy(), first.directory / "meta.json"
    if damage == "garbage meta":
        meta_file.write_text('{"format": 1, "fingerp')
    elif damage == "no meta":
        meta_file.unlink()
    elif damage == "wrong fingerprint":
        meta_file.write_text(json.dumps({**first.meta, "fingerprint": "0" * 64}))
    elif damage == "short train.bin":
        with open(first.directory / "train.bin", "r+b") as f:
            f.truncate(10)
    else:
        (first.directory / "tokenizer.json").unlink()
    del first
    again = prepare(corpus, cache_dir=cache_dir, **SMALL)
    assert not again.cached and np.array_equal(again.train, train)
    assert json.loads(meta_file.read_text())["train_tokens"] == len(train)
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        again.directory.name
    ]  # no stale or temporary folders


def test_a_changed_file_or_setting_gets_its_own_cache(corpus: Path, cache_dir: Path, paragraphs):
    first = prepare(corpus, cache_dir=cache_dir, **SMALL)
    other_vocab = prepare(corpus, cache_dir=cache_dir, **{**SMALL, "vocab_size": 280})
    other_split = prepare(corpus, cache_dir=cache_dir, valid_fraction=0.2, **SMALL)
    corpus.write_text(paragraphs(41))
    os.utime(corpus, ns=(time.time_ns(), time.time_ns() + 10**9))  # a newer mtime even on coarse clocks
    changed = prepare(corpus, cache_dir=cache_dir, **SMALL)
    folders = {first.directory, other_vocab.directory, other_split.directory, changed.directory}
    assert len(folders) == 4 and not changed.cached
    assert other_vocab.vocab_size <= 280 and (changed.train == changed.tokenizer.eot_id).sum() == 39


def test_an_interrupted_prepare_leaves_nothing_behind(corpus: Path, cache_dir: Path, monkeypatch):
    real_write = pipeline.write_tokens

    def crash_on_valid(tokenizer, documents, path, **kwargs):
        if path.name == "valid.bin":
            raise KeyboardInterrupt
        return real_write(tokenizer, documents, path, **kwargs)

    monkeypatch.setattr(pipeline, "write_tokens", crash_on_valid)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, cache_dir=cache_dir, **SMALL)
    assert list(cache_dir.iterdir()) == []
    monkeypatch.setattr(pipeline, "write_tokens", real_write)
    assert not prepare(corpus, cache_dir=cache_dir, **SMALL).cached


def test_auto_falls_back_to_bpe_when_gpt2_cannot_load(corpus: Path, cache_dir: Path, gpt2_offline):
    prepared = prepare(corpus, cache_dir=cache_dir, tokenizer="auto", vocab_size=300, progress=False)
    assert prepared.meta["tokenizer"].startswith("bpe-") and prepared.meta["settings"]["tokenizer"] == "bpe"


def test_gpt2_tokenizer_path(corpus: Path, cache_dir: Path, fake_gpt2, monkeypatch):
    prepared = prepare(corpus, cache_dir=cache_dir, tokenizer="auto", progress=False)
    assert (prepared.meta["tokenizer"], prepared.vocab_size, prepared.train.dtype) == ("gpt2", 257, np.uint16)
    assert (prepared.directory / "tiktoken.json").is_file() and not (
        prepared.directory / "tokenizer.json"
    ).exists()
    assert prepared.tokenizer.decode(prepared.valid.tolist()).count(EOT) == 2
    forbid_tokenizing(monkeypatch)
    assert prepare(corpus, cache_dir=cache_dir, tokenizer="gpt2", vocab_size=1, progress=False).cached


def test_a_given_tokenizer_is_used_as_it_is(corpus: Path, cache_dir: Path, monkeypatch):
    trained = prepare(corpus, cache_dir=cache_dir, **SMALL)
    monkeypatch.setattr(Tokenizer, "train_bpe", lambda *a, **k: pytest.fail("trained although one was given"))
    given = prepare(corpus, cache_dir=cache_dir, tokenizer=trained.tokenizer, progress=False)
    assert not given.cached and given.directory != trained.directory  # keyed by the tokenizer's files
    assert np.array_equal(given.train, trained.train) and np.array_equal(given.valid, trained.valid)
    assert given.meta["settings"]["tokenizer_sha256"] and given.tokenizer.name == trained.tokenizer.name
    assert prepare(corpus, cache_dir=cache_dir, tokenizer=given.tokenizer, progress=False).cached


def test_a_given_gpt2_tokenizer_shares_the_gpt2_cache(corpus: Path, cache_dir: Path, fake_gpt2):
    by_name = prepare(corpus, cache_dir=cache_dir, tokenizer="gpt2", progress=False)
    by_object = prepare(corpus, cache_dir=cache_dir, tokenizer=Tokenizer.gpt2(), progress=False)
    assert by_object.cached and by_object.directory == by_name.directory


def test_gpt2_required_but_unavailable(corpus: Path, cache_dir: Path, gpt2_offline, one_line_error):
    one_line_error(
        DataError,
        prepare,
        corpus,
        cache_dir=cache_dir,
        tokenizer="gpt2",
        progress=False,
        match=r"cannot load the GPT-2 tokenizer",
    )


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        (
            {"tokenizer": "wordpiece"},
            r"tokenizer='wordpiece' is invalid: choose one of 'auto', 'gpt2', 'bpe'",
        ),
        ({"valid_fraction": 0.0}, r"valid_fraction=0.0 is invalid"),
        ({"valid_fraction": 1.0}, r"valid_fraction=1.0 is invalid: must lie in \(0, 1\)"),
        ({"encoding_errors": "ignore"}, r"encoding_errors='ignore' is invalid"),
        ({"vocab_size": 100}, r"vocab_size=100 is invalid"),
    ],
)
def test_bad_settings_fail_before_any_work(corpus: Path, cache_dir: Path, one_line_error, setting, match):
    one_line_error(ConfigError, prepare, corpus, cache_dir=cache_dir, **{**SMALL, **setting}, match=match)
    assert not cache_dir.exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"holds no text \(it is empty or only whitespace\)"),
        (b" \n\t\n\n", r"holds no text"),
        (
            b"one single document without blank lines",
            r"has 1 documents, too few to split off a validation set",
        ),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"looks binary"),
        (
            b"caf\xe9\n\nbar\n",
            r"is not valid UTF-8 \(byte 0xe9 at byte offset 3\).*--encoding-errors replace",
        ),
    ],
)
def test_bad_files(tmp_path: Path, cache_dir: Path, one_line_error, content: bytes, match: str):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    message = one_line_error(DataError, prepare, path, cache_dir=cache_dir, **SMALL, match=match)
    assert str(path) in message
    assert [p.name for p in cache_dir.iterdir()] == []  # nothing half-written


def test_non_utf8_with_replace_works(tmp_path: Path, cache_dir: Path, paragraphs):
    path = tmp_path / "latin1.txt"
    path.write_bytes(paragraphs(10).encode() + b"\n\ncaf\xe9 au lait\n")
    prepared = prepare(path, cache_dir=cache_dir, encoding_errors="replace", **SMALL)
    assert prepared.tokenizer.decode(prepared.valid.tolist()) == f"caf\ufffd au lait{EOT}"


def test_missing_source_and_unusable_cache_dir(tmp_path: Path, corpus: Path, one_line_error):
    one_line_error(
        DataError,
        prepare,
        tmp_path / "nope.txt",
        cache_dir=tmp_path / "c",
        match=r"^no such file or folder: ",
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line_error(
        DataError,
        prepare,
        corpus,
        cache_dir=blocker,
        **SMALL,
        match=r"cannot create the cache folder .*a-file",
    )


def test_default_cache_dir_follows_infmoe_cache(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("INFMOE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("INFMOE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "infmoe" / "data"


def test_wikitext2_end_to_end(shared_data: Path, cache_dir: Path):
    prepared = prepare(
        shared_data / "wikitext-2", cache_dir=cache_dir, tokenizer="bpe", vocab_size=512, progress=False
    )
    meta = prepared.meta
    assert meta["source"] == f"folder {shared_data / 'wikitext-2'} (train.txt, valid.txt)"
    assert (meta["train_documents"], meta["valid_documents"]) == (11669, 1160)  # non-blank lines of each file
    assert prepared.vocab_size == 512 and prepared.train.dtype == np.uint16
    assert len(prepared.train) > 5 * len(prepared.valid) > 500_000
    assert prepared.tokenizer.decode(prepared.valid[:6].tolist()).startswith("= Homarus")
    assert 3.0 < unigram_loss(prepared.train, prepared.valid, prepared.vocab_size) < np.log(512)


def test_a_concurrent_prepare_finishing_second_keeps_the_first_ones_folder(corpus: Path, cache_dir: Path):
    """Two runs of a grid that start together both build the same data. The one that
    finishes second must not move the folder away from the first, which is reading it."""
    first = prepare(corpus, cache_dir=cache_dir, **SMALL)
    inode, created, train = first.directory.stat().st_ino, first.meta["created"], first.train.copy()
    src = pipeline.resolve_source(str(corpus), cache_dir)
    # the second build, run to its end as a racing worker would (the cache check came first)
    pipeline._build(src, first.directory, first.meta["fingerprint"], first.meta["settings"], None, progress=False)
    assert first.directory.stat().st_ino == inode
    assert json.loads((first.directory / "meta.json").read_text())["created"] == created
    assert sorted(p.name for p in cache_dir.iterdir()) == [first.directory.name]  # its temporary is gone
    assert np.array_equal(prepare(corpus, cache_dir=cache_dir, **SMALL).train, train)
