"""`prepare`: a corpus in, memory-mapped token files out, cached by what they depend on.

A prepared corpus is one folder ``<cache_dir>/<slug>-<hash>`` holding

- ``train.bin``, ``valid.bin``: token ids (see `infmoe.data.tokens`), uint16 or uint32;
- ``meta.json``: format version, source description, fingerprint, content_sha256 (of the
  tokenizer files and the token ids: what the data is, wherever the corpus lives),
  tokenizer name, vocab_size, dtype, token and document counts;
- the tokenizer: ``tokenizer.json`` (a trained BPE) or ``tiktoken.json`` (GPT-2).

``<hash>`` is the start of the fingerprint, a SHA-256 of the source's identity (for local
files the resolved path, size and mtime of every file; for the embedded corpus the Python
version and a hash of its text; for a Hugging Face dataset its name and config) and the
settings (tokenizer, vocab_size, valid_fraction, encoding_errors). Everything is written
into a temporary sibling folder that is renamed into place only when complete, and a
folder whose meta.json is missing, unreadable or does not match is rebuilt, so an
interrupted run never leaves a cache that a later run trusts.

The corpus streams through: the source gives each split's documents lazily (see
`infmoe.data.sources`), `write_tokens` encodes them a chunk (`infmoe.data.tokens.CHUNK_DOCS`
documents) at a time and appends the ids to the split's file, so memory does not grow
with the corpus. A BPE that must be trained sees the first `BPE_SAMPLE_CHARS` characters
of the training split (whole documents, in corpus order; all of it when it is smaller): a
bound the same for every corpus, so training takes bounded time and memory and its result
depends only on the corpus. The bound is not part of the fingerprint, which it leaves as
it was: a corpus under the bound gets the same tokenizer as before it existed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from infmoe.data.sources import Source, resolve_source
from infmoe.data.text import ENCODING_ERRORS
from infmoe.data.tokenizer import Tokenizer, check_bpe_vocab, load_tokenizer
from infmoe.data.tokens import open_tokens, token_dtype, write_tokens
from infmoe.errors import DataError, choose, invalid, real

FORMAT_VERSION = 1  # bump when the files' layout changes: old caches are then rebuilt
META_FILE = "meta.json"
TOKENIZERS = ("auto", "gpt2", "bpe")
SPLITS = ("train", "valid")
BPE_SAMPLE_CHARS = 2**28  # a trained BPE sees this many characters of training text (~256 MB)


@dataclass
class PreparedData:
    """A prepared corpus. `train` and `valid` are read-only 1-D `np.memmap`s of token ids
    (uint16 when ``vocab_size <= 65536``, else uint32), documents separated by
    ``tokenizer.eot_id``; `valid` is never empty. `meta` is the content of meta.json;
    `cached` says whether this call found the folder ready instead of tokenizing."""

    directory: Path
    train: np.ndarray
    valid: np.ndarray
    tokenizer: Tokenizer
    meta: dict
    cached: bool

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def default_cache_dir() -> Path:
    """``$INFMOE_CACHE`` if set, else ``~/.cache/infmoe/data``."""
    return Path(os.environ.get("INFMOE_CACHE") or Path.home() / ".cache" / "infmoe" / "data").expanduser()


def prepare(
    source: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    tokenizer: str | Tokenizer = "auto",
    vocab_size: int = 4096,
    valid_fraction: float = 0.05,
    encoding_errors: str = "strict",
    progress: bool = True,
) -> PreparedData:
    """Tokenize `source` (see `infmoe.data.sources`) into token files, or reuse them.

    `tokenizer`: ``"gpt2"`` (tiktoken, needs it downloaded once), ``"bpe"`` (a byte-level
    BPE of `vocab_size` ids trained on the training split, or on its first
    `BPE_SAMPLE_CHARS` characters when it is larger), ``"auto"`` (GPT-2 when it loads,
    else BPE), or a `Tokenizer` to use as it is (say, a checkpoint's, to evaluate
    on new text; `vocab_size` is then ignored). `valid_fraction` in (0, 1) is used only when the source has no
    validation split of its own. `encoding_errors`: ``"strict"`` rejects invalid UTF-8,
    ``"replace"`` turns it into U+FFFD. `progress` shows tqdm bars on stderr.
    Raises `DataError` (bad corpus) or `ConfigError` (bad setting), each one line.
    """
    settings = _settings(tokenizer, vocab_size, valid_fraction, encoding_errors)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    src = resolve_source(source, cache_dir)  # before creating anything: a wrong path costs nothing
    _make_dir(cache_dir)
    given = tokenizer if isinstance(tokenizer, Tokenizer) else _gpt2(tokenizer)  # None: train a BPE
    settings = _tokenizer_settings(given, vocab_size) | settings
    fingerprint = _hash({"format": FORMAT_VERSION, "source": src.identity(), "settings": settings})
    directory = cache_dir / f"{src.slug}-{fingerprint[:12]}"
    found = _open_cached(directory, fingerprint)
    if found is not None:
        return found
    _build(src, directory, fingerprint, settings, given, progress)
    found = _open_cached(directory, fingerprint)
    if found is None:  # only if something else keeps deleting or rewriting the folder
        raise DataError(
            f"the prepared data in {directory} vanished or is damaged right after writing; run again"
        )
    found.cached = False
    return found


def _settings(
    tokenizer: str | Tokenizer, vocab_size: int, valid_fraction: float, encoding_errors: str
) -> dict[str, Any]:
    """Check the settings before any work; the tokenizer-independent part of the key."""
    choose("encoding_errors", encoding_errors, ENCODING_ERRORS)
    if real("valid_fraction", valid_fraction, low=0, high=1, open_low=True) >= 1:
        raise invalid("valid_fraction", valid_fraction, "must lie in (0, 1)")
    if not isinstance(tokenizer, Tokenizer):
        if choose("tokenizer", tokenizer, TOKENIZERS) != "gpt2":
            check_bpe_vocab(vocab_size)
    return {"valid_fraction": float(valid_fraction), "encoding_errors": encoding_errors}


def _tokenizer_settings(given: Tokenizer | None, vocab_size: int) -> dict[str, Any]:
    """The tokenizer's part of the key: what decides the ids the corpus gets."""
    if given is None:
        return {"tokenizer": "bpe", "vocab_size": vocab_size}
    if given.is_tiktoken:  # fixed by its name; the same key as tokenizer="gpt2"
        return {"tokenizer": given.name}
    # a given BPE: its saved vocabulary and merges, hashed as the bytes `save` writes
    digest = hashlib.sha256(b"".join(text.encode("utf-8") for _, text in sorted(given.files().items()))).hexdigest()
    return {"tokenizer": given.name, "tokenizer_sha256": digest}


def _gpt2(choice: str) -> Tokenizer | None:
    """The GPT-2 tokenizer when `choice` asks for it (and, for "auto", when it loads)."""
    if choice == "bpe":
        return None
    try:
        return Tokenizer.gpt2()
    except DataError:
        if choice == "gpt2":
            raise
        return None


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _make_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the cache folder {path}: {e.strerror or e}; "
            f"pass a writable cache_dir (or set INFMOE_CACHE)"
        ) from None
    return path


def _open_cached(directory: Path, fingerprint: str) -> PreparedData | None:
    """The prepared data in `directory` if it is complete and matches `fingerprint`, else None."""
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        if meta["format"] != FORMAT_VERSION or meta["fingerprint"] != fingerprint:
            return None
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        counts = {split: int(meta[f"{split}_tokens"]) for split in SPLITS}
        if any(
            counts[s] < 1 or (directory / f"{s}.bin").stat().st_size != counts[s] * dtype.itemsize
            for s in SPLITS
        ):
            return None
        tokenizer = load_tokenizer(directory)
        if tokenizer.vocab_size != meta["vocab_size"] or token_dtype(tokenizer.vocab_size) != dtype:
            return None
    except (OSError, ValueError, KeyError, TypeError, DataError):  # missing, truncated, foreign: rebuild
        return None
    train, valid = (open_tokens(directory / f"{s}.bin", dtype, counts[s]) for s in SPLITS)
    return PreparedData(directory, train, valid, tokenizer, meta, cached=True)


def _build(
    src: Source,
    directory: Path,
    fingerprint: str,
    settings: dict[str, Any],
    given: Tokenizer | None,
    progress: bool,
) -> None:
    """Read, split, (train a tokenizer unless `given`,) tokenize into a temporary folder;
    rename it to `directory`."""
    try:
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    except OSError as e:
        raise _write_error(directory, e) from None
    try:
        splits = src.stream(settings["valid_fraction"], settings["encoding_errors"], progress=progress)
        tokenizer = given or Tokenizer.train_bpe(
            bpe_sample(splits.train), settings["vocab_size"], progress=progress
        )
        tokenizer.save(tmp)
        # What the tokens are, independent of where the corpus lives and its files' mtimes
        # (a copied corpus is the same data): `--resume` compares this.
        content = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(tmp.iterdir())))
        documents = {"train": splits.train, "valid": splits.valid}
        counts = {
            s: write_tokens(
                tokenizer, documents[s], tmp / f"{s}.bin", progress=progress, desc=f"tokenize {s}",
                digest=content,
            )
            for s in SPLITS
        }
        meta = {
            "format": FORMAT_VERSION,
            "source": src.description,
            "fingerprint": fingerprint,
            "content_sha256": content.hexdigest(),
            "identity": src.identity(),
            "settings": settings,
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "dtype": token_dtype(tokenizer.vocab_size).name,
            **{f"{s}_tokens": counts[s] for s in SPLITS},
            **{f"{s}_documents": documents[s].count for s in SPLITS},  # counted as they were written
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _install(tmp, directory, fingerprint)
    except OSError as e:
        raise _write_error(directory, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def bpe_sample(documents: Iterable[str]) -> Iterator[str]:
    """The documents a BPE is trained on: `documents` in order, up to and including the one
    that brings their length to `BPE_SAMPLE_CHARS` characters (documents are never cut)."""
    total = 0
    for doc in documents:
        yield doc
        total += len(doc)
        if total >= BPE_SAMPLE_CHARS:
            return


def _write_error(directory: Path, e: OSError) -> DataError:
    return DataError(
        f"cannot write the prepared data under {directory.parent}: {e.strerror or e}; "
        f"free some space or pass a writable cache_dir (or set INFMOE_CACHE)"
    )


def _install(tmp: Path, directory: Path, fingerprint: str) -> None:
    """Rename the finished `tmp` folder to `directory`, moving a stale one out of the way.
    A complete one for the same fingerprint is kept: a concurrent prepare (two runs of a grid
    starting together) finished first, and its runs may already be reading it."""
    if _open_cached(directory, fingerprint) is not None:
        return
    if directory.exists():
        stale = directory.with_name(f".{directory.name}.stale-{uuid.uuid4().hex[:8]}")
        os.rename(directory, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, directory)
    except OSError:
        if not directory.exists():  # not a concurrent prepare that finished first
            raise
