"""Token files: flat arrays of little-endian token ids on disk, read back as memory maps,
and the count baselines on them (unigram, bigram) that any language model must beat.

A split's file is every document's ids followed by ``<|endoftext|>``, in document order:
``doc0 EOT doc1 EOT ...``; it has no header (its dtype and length are in meta.json).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from infmoe.data.tokenizer import Tokenizer
from infmoe.errors import DataError

CHUNK_DOCS = 512  # documents per encode_batch call: big enough to keep the Rust threads busy


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned little-endian dtype holding ids ``0 .. vocab_size - 1``:
    uint16 up to 65,536 ids (GPT-2's 50,257 fit), else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def write_tokens(
    tokenizer: Tokenizer,
    documents: Iterable[str],
    path: Path,
    *,
    progress: bool = True,
    desc: str = "tokenize",
    digest: Any = None,
) -> int:
    """Encode `documents` in chunks of `CHUNK_DOCS` and append each chunk to `path` as
    ``doc EOT doc EOT ...`` ids of dtype `token_dtype(tokenizer.vocab_size)`, so only a
    chunk of documents and their ids is in memory at a time; `documents` may be any
    iterable (a list, a lazy `infmoe.data.sources.Documents`, a generator), read once.
    `digest` (a hashlib object), if given, is fed the bytes written. Returns the number of tokens."""
    dtype = token_dtype(tokenizer.vocab_size)
    eot = [tokenizer.eot_id]
    count = 0
    docs = iter(documents)
    with (
        open(path, "wb") as f,
        tqdm(
            total=operator.length_hint(documents) or None, desc=desc, unit="doc", disable=not progress
        ) as bar,
    ):
        while chunk := list(itertools.islice(docs, CHUNK_DOCS)):
            ids = np.fromiter(
                itertools.chain.from_iterable(
                    itertools.chain(doc, eot) for doc in tokenizer.encode_batch(chunk)
                ),
                dtype=dtype,
            )
            data = ids.tobytes()
            f.write(data)
            if digest is not None:
                digest.update(data)
            count += len(ids)
            bar.update(len(chunk))
    return count


def open_tokens(path: Path, dtype: np.dtype | str, count: int) -> np.memmap:
    """The token file `path` as a read-only 1-D memmap of `count` ids of `dtype`."""
    return np.memmap(path, dtype=np.dtype(dtype), mode="r", shape=(count,))


def damaged_data_fix(ids: np.ndarray) -> str:
    """The fix for token ids that do not fit their tokenizer: delete the prepared folder of
    the file `ids` maps (`prepare` checks a cache by its files' size and mtime, so it can
    miss a change) and run again, which prepares the data anew."""
    filename = getattr(ids, "filename", None)  # np.memmap's (and its slices'); absent from a plain array
    folder = Path(filename).parent if filename else "the prepared data's folder"
    return f"delete {folder} and run again (the data is then prepared anew)"


def unigram_loss(train: np.ndarray, valid: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy in nats/token of `valid` under the add-one-smoothed unigram
    distribution counted on `train`: p(t) = (count_train(t) + 1) / (len(train) + vocab_size).

    A baseline any language model must beat (log(vocab_size) is the uniform one).
    `train` and `valid` are 1-D integer arrays with ids in ``[0, vocab_size)``.
    """
    for name, ids in (("train", train), ("valid", valid)):
        if len(ids) and int(ids.max()) >= vocab_size:
            raise DataError(
                f"{name} holds token id {int(ids.max())} >= vocab_size={vocab_size}: the tokens and the "
                f"tokenizer do not match; {damaged_data_fix(ids)}"
            )
    if len(valid) == 0:
        raise DataError("the validation split is empty; give more text")
    log_p = np.log(np.bincount(train, minlength=vocab_size) + 1.0) - np.log(len(train) + vocab_size)
    valid_counts = np.bincount(valid, minlength=vocab_size)
    return float(-(valid_counts * log_p).sum() / len(valid))


def bigram_loss(train: np.ndarray, valid: np.ndarray, vocab_size: int, alpha: float = 0.1) -> float:
    """Cross-entropy (nats/token) on `valid` of an add-alpha bigram model counted on
    `train`, interpolated with nothing: P(b | a) = (c(a, b) + alpha) / (c(a) + alpha · V)."""
    train = np.asarray(train, dtype=np.int64)
    valid = np.asarray(valid, dtype=np.int64)
    pairs, counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    first = np.bincount(train[:-1], minlength=vocab_size)
    query = valid[:-1] * vocab_size + valid[1:]
    position = np.clip(np.searchsorted(pairs, query), 0, len(pairs) - 1)
    pair_counts = np.where(pairs[position] == query, counts[position], 0)
    probs = (pair_counts + alpha) / (first[valid[:-1]] + alpha * vocab_size)
    return float(-np.log(probs).mean())
