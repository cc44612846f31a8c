import json
from pathlib import Path

import pytest

from infmoe.data import Tokenizer, load_tokenizer
from infmoe.data.text import EOT
from infmoe.errors import ConfigError, DataError

UNSEEN = [
    "Plain English, unseen words: zymurgy quixotic.",
    "  leading spaces,\ttabs,\r\nCRLF and trailing spaces   ",
    "naïve café, Ærøskøbing, Straße, ﬁ ligature, e\u0301 combining",
    "東京は日本の首都です。 Привет, мир! مرحبا 🙂👍🏽",
    "",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    docs = [
        f"paragraph {i}: the cat sat on the mat, and the dog ran {i} times — café au lait."
        for i in range(200)
    ]
    return Tokenizer.train_bpe(docs, 300, progress=False)


@pytest.mark.parametrize("text", UNSEEN)
def test_bpe_round_trips_any_text(bpe: Tokenizer, text: str):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_learned_merges_and_reports_its_size(bpe: Tokenizer):
    assert bpe.name == f"bpe-{bpe.vocab_size}" and 257 < bpe.vocab_size <= 300
    assert len(bpe.encode("the cat sat on the mat")) < len("the cat sat on the mat") / 2  # merges compress


def test_the_endoftext_marker_is_one_token(bpe: Tokenizer):
    ids = bpe.encode(f"end{EOT}start")
    assert ids.count(bpe.eot_id) == 1 and bpe.decode(ids) == f"end{EOT}start"


def test_encode_batch_equals_encode(bpe: Tokenizer):
    assert bpe.encode_batch(UNSEEN) == [bpe.encode(t) for t in UNSEEN]


def test_bpe_save_load_round_trip(bpe: Tokenizer, tmp_path: Path):
    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.name, loaded.vocab_size, loaded.eot_id) == (bpe.name, bpe.vocab_size, bpe.eot_id)
    assert loaded.encode_batch(UNSEEN) == bpe.encode_batch(UNSEEN)


def test_tiktoken_path_encodes_saves_a_marker_and_loads(fake_gpt2, tmp_path: Path, bpe: Tokenizer):
    gpt2 = Tokenizer.gpt2()
    assert (gpt2.name, gpt2.vocab_size, gpt2.eot_id) == ("gpt2", 257, 256)
    text = f"héllo{EOT}wörld"
    assert gpt2.encode(text).count(256) == 1 and gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.encode_batch(UNSEEN) == [gpt2.encode(t) for t in UNSEEN]
    bpe.save(tmp_path)
    gpt2.save(tmp_path)  # replaces the BPE: one tokenizer per folder
    assert json.loads((tmp_path / "tiktoken.json").read_text())["encoding"] == "gpt2"
    assert not (tmp_path / "tokenizer.json").exists()
    assert load_tokenizer(tmp_path).encode(text) == gpt2.encode(text)


def test_gpt2_unavailable_is_one_line_with_the_fix(gpt2_offline, one_line_error):
    one_line_error(
        DataError, Tokenizer.gpt2, match=r"cannot load the GPT-2 tokenizer .*Max retries.*tokenizer 'bpe'"
    )


def test_load_tokenizer_from_an_empty_folder(tmp_path: Path, one_line_error):
    one_line_error(
        DataError,
        load_tokenizer,
        tmp_path,
        match=r"no tokenizer in .*tokenizer\.json.*prepare the data again",
    )


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("tokenizer.json", '{"model": '),
        ("tiktoken.json", '{"encoding": "p50k"}'),
        ("tiktoken.json", "not json"),
    ],
)
def test_load_tokenizer_from_a_corrupt_file(tmp_path: Path, one_line_error, name: str, content: str):
    (tmp_path / name).write_text(content)
    one_line_error(
        DataError,
        load_tokenizer,
        tmp_path,
        match=rf"{name} is corrupt \(.*\); delete .* prepare the data again",
    )


@pytest.mark.parametrize("vocab_size", [256, 0, 3.5, "4096", True])
def test_bpe_vocab_size_must_hold_the_bytes(vocab_size, one_line_error):
    one_line_error(
        ConfigError, Tokenizer.train_bpe, ["some text"], vocab_size, match=r"vocab_size=.* is invalid"
    )
