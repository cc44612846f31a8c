import math
from pathlib import Path

import numpy as np
import pytest

from infmoe.data import Tokenizer, unigram_loss
from infmoe.data.tokens import open_tokens, token_dtype, write_tokens
from infmoe.errors import DataError


@pytest.mark.parametrize(
    ("vocab_size", "dtype"), [(257, "<u2"), (50257, "<u2"), (65536, "<u2"), (65537, "<u4"), (200_000, "<u4")]
)
def test_token_dtype_is_the_smallest_that_holds_every_id(vocab_size: int, dtype: str):
    assert token_dtype(vocab_size) == np.dtype(dtype)
    assert np.iinfo(token_dtype(vocab_size)).max >= vocab_size - 1


def test_unigram_loss_by_hand():
    # counts on train: id0 2, id1 1, id2 0 -> add-one: 3, 2, 1 over 6 -> p = 1/2, 1/3, 1/6
    train, valid = np.array([0, 0, 1], dtype=np.uint16), np.array([0, 2], dtype=np.uint16)
    assert unigram_loss(train, valid, 3) == pytest.approx((math.log(2) + math.log(6)) / 2)


def test_unigram_loss_of_unseen_ids_is_the_uniform_entropy_limit():
    assert unigram_loss(np.zeros(0, np.uint16), np.array([1, 2, 3], np.uint16), 8) == pytest.approx(
        math.log(8)
    )


def test_unigram_loss_refuses_ids_beyond_the_vocabulary(one_line_error):
    one_line_error(
        DataError,
        unigram_loss,
        np.array([0, 5]),
        np.array([1]),
        4,
        match=r"train holds token id 5 >= vocab_size=4",
    )


def test_write_tokens_puts_eot_after_every_document_and_reads_back(tmp_path: Path):
    tokenizer = Tokenizer.train_bpe(["alpha beta", "gamma delta"] * 20, 270, progress=False)
    docs = ["alpha beta", "gamma", "délta ✓"] * 300  # more than one chunk
    path = tmp_path / "t.bin"
    count = write_tokens(tokenizer, docs, path, progress=False)
    ids = open_tokens(path, "<u2", count)
    assert path.stat().st_size == 2 * count and not ids.flags.writeable
    expected = [i for doc in docs for i in [*tokenizer.encode(doc), tokenizer.eot_id]]
    assert ids.tolist() == expected


def test_write_tokens_takes_any_iterable_and_reads_it_once(tmp_path: Path):
    tokenizer = Tokenizer.train_bpe(["alpha beta", "gamma delta"] * 20, 270, progress=False)
    docs = [f"alpha {i} gamma" for i in range(1100)]  # three chunks
    from_list = write_tokens(tokenizer, docs, tmp_path / "list.bin", progress=False)
    from_generator = write_tokens(tokenizer, (d for d in docs), tmp_path / "gen.bin", progress=False)
    assert from_list == from_generator
    assert (tmp_path / "list.bin").read_bytes() == (tmp_path / "gen.bin").read_bytes()
