"""`prepare`: a corpus in, memory-mapped token files out, cached by what they depend on.

A prepared corpus is one folder ``<cache_dir>/<slug>-<hash>`` holding

- ``train.bin``, ``valid.bin``: token ids (see `infmoe.data.tokens`), uint16 or uint32;
- ``meta.json``: format version, source description, fingerprint, content_sha256 (of the
  tokenizer files and the token ids: what the data is, wherever the corpus lives),
  stamps (the size and mtime_ns of each of those files when content_sha256 was last
  checked against them), tokenizer name, vocab_size, dtype, token and document counts;
- the tokenizer: ``tokenizer.json`` (a trained BPE) or ``tiktoken.json`` (GPT-2).

``<hash>`` is the start of the fingerprint, a SHA-256 of the source's identity (for local
files the resolved path, size and mtime of every file; for the embedded corpus the Python
version and a hash of its text; for a Hugging Face dataset its name and config) and the
settings (tokenizer, vocab_size, valid_fraction, encoding_errors). Everything is written
into a temporary sibling folder that is renamed into place only when complete, so an
interrupted run never leaves a cache that a later run trusts.

A cache is checked each time it is used (`_open_cached`): meta.json must be readable and
match, the token files must have the sizes it records, and their content must still be
what content_sha256 says, with every id inside the vocabulary. Hashing gigabytes on every
start would be slow, so the files are hashed again only when one's size or mtime differs
from its stamp (see `_verified`). A folder that fails a check is damaged: it is prepared
again from the source, with one line on stderr that says so.

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
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from infmoe.data.sources import Source, resolve_source
from infmoe.data.text import ENCODING_ERRORS, one_line
from infmoe.data.tokenizer import Tokenizer, check_bpe_vocab, load_tokenizer
from infmoe.data.tokens import open_tokens, token_dtype, write_tokens
from infmoe.errors import DataError, choose, invalid, real
from infmoe.io import OutputError, write_text

FORMAT_VERSION = 1  # bump when the files' layout changes: old caches are then rebuilt
META_FILE = "meta.json"
TOKENIZERS = ("auto", "gpt2", "bpe")
SPLITS = ("train", "valid")
BPE_SAMPLE_CHARS = 2**28  # a trained BPE sees this many characters of training text (~256 MB)
HASH_CHUNK = 2**24  # bytes read at a time when checking a cache's content (a multiple of any id size)


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
    A cache folder found damaged (see the module docstring) is prepared again, with a note
    on stderr. Raises `DataError` (bad corpus, or a damaged cache whose corpus cannot be
    read again) or `ConfigError` (bad setting), each one line.
    """
    settings = _settings(tokenizer, vocab_size, valid_fraction, encoding_errors)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    src = resolve_source(source, cache_dir)  # before creating anything: a wrong path costs nothing
    _make_dir(cache_dir)
    given = tokenizer if isinstance(tokenizer, Tokenizer) else _gpt2(tokenizer)  # None: train a BPE
    settings = _tokenizer_settings(given, vocab_size) | settings
    fingerprint = _hash({"format": FORMAT_VERSION, "source": src.identity(), "settings": settings})
    directory = cache_dir / f"{src.slug}-{fingerprint[:12]}"
    damage = None
    try:
        found = _open_cached(directory, fingerprint)
        if found is not None:
            return found
    except _Damaged as e:
        damage = str(e)
        print(f"infmoe: note: the prepared data in {directory} is damaged ({damage}); "
              f"preparing it again from {src.description}", file=sys.stderr)
    try:
        _build(src, directory, fingerprint, settings, given, progress)
    except DataError as e:
        if damage is None:
            raise
        raise DataError(
            f"the prepared data in {directory} is damaged ({damage}) and cannot be prepared again: {e}"
        ) from None
    found = _usable(directory, fingerprint)
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


class _Damaged(Exception):
    """A cache folder exists but cannot be used; the message says why, for a note."""


def _open_cached(directory: Path, fingerprint: str) -> PreparedData | None:
    """The prepared data in `directory` if it is complete, matches `fingerprint` and its
    content checks out (`_verified`); None when there is no such folder. Raises `_Damaged`
    when the folder is there but unusable: meta.json missing, unreadable, of another format
    or fingerprint, a token file of the wrong size, the tokenizer unreadable or not the
    one meta.json names, or the content changed."""
    if not directory.is_dir():
        return None
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        if meta["format"] != FORMAT_VERSION or meta["fingerprint"] != fingerprint:
            raise _Damaged(f"{META_FILE} is of another format or other data")
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        counts = {split: int(meta[f"{split}_tokens"]) for split in SPLITS}
        for s in SPLITS:
            size = (directory / f"{s}.bin").stat().st_size
            if counts[s] < 1 or size != counts[s] * dtype.itemsize:
                raise _Damaged(f"{s}.bin holds {size} bytes, not the {counts[s]} ids of {dtype.itemsize} bytes "
                               f"that {META_FILE} records")
        tokenizer = load_tokenizer(directory)
        if tokenizer.vocab_size != meta["vocab_size"] or token_dtype(tokenizer.vocab_size) != dtype:
            raise _Damaged(f"its tokenizer is not the one {META_FILE} records")
        meta = _verified(directory, meta, tokenizer, dtype)
    except DataError:  # load_tokenizer's
        raise _Damaged("its tokenizer is missing or unreadable") from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # missing, truncated, foreign
        raise _Damaged(f"a file is missing or unreadable: {one_line(e, 120)}") from None
    train, valid = (open_tokens(directory / f"{s}.bin", dtype, counts[s]) for s in SPLITS)
    return PreparedData(directory, train, valid, tokenizer, meta, cached=True)


def _usable(directory: Path, fingerprint: str) -> PreparedData | None:
    """`_open_cached`'s data, or None when there is none or it is damaged."""
    try:
        return _open_cached(directory, fingerprint)
    except _Damaged:
        return None


def _content_files(tokenizer: Tokenizer) -> list[str]:
    """The files content_sha256 covers, in the order they are hashed: the tokenizer's, then
    each split's token ids."""
    return [*sorted(tokenizer.files()), *(f"{s}.bin" for s in SPLITS)]


def _stamps(directory: Path, names: list[str]) -> dict[str, dict[str, int]]:
    """{name: {"size", "mtime_ns"}} of the files `names` in `directory`."""
    return {
        name: {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        for name in names
        for st in [(directory / name).stat()]
    }


def _verified(directory: Path, meta: dict, tokenizer: Tokenizer, dtype: np.dtype) -> dict:
    """`meta` with content_sha256 checked against the files (`_content_files`) in `directory`.

    The files are hashed only when a file's size or mtime differs from the stamp `meta`
    records for it, or `meta` records no stamps or no hash (a cache written before they
    existed): a cache of gigabytes is read once, not on every start. When the hash and the
    ids' range check out, the new stamps (and a hash `meta` lacked) are written to
    meta.json atomically; a read-only cache is checked again next time. Raises `_Damaged`
    when the content is not the recorded one or holds ids outside the vocabulary.

    By design the stamps guard against accidents (a stray write, a truncation, a copy over
    the file), not against someone hiding a change: a token file rewritten with its size
    kept and its mtime set back (``os.utime``) is not hashed again, so not noticed here.
    Ids beyond the vocabulary are still refused where they are used (`unigram_loss`,
    `infmoe.evaluation.validation_batches`).
    """
    names = _content_files(tokenizer)
    stamps = _stamps(directory, names)  # before reading: a write during the hash changes them
    if meta.get("stamps") == stamps and "content_sha256" in meta:
        return meta
    digest, top = _content_digest(directory, names, dtype)
    if top >= tokenizer.vocab_size:
        raise _Damaged(f"it holds token id {top}, beyond the vocabulary of {tokenizer.vocab_size}")
    if meta.get("content_sha256", digest) != digest:
        raise _Damaged(f"its files no longer have the SHA-256 that {META_FILE} records")
    meta = {**meta, "content_sha256": digest, "stamps": stamps}
    try:
        write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")
    except OutputError:  # a read-only (shared) cache: usable, only checked again next time
        pass
    return meta


def _content_digest(directory: Path, names: list[str], dtype: np.dtype) -> tuple[str, int]:
    """The SHA-256 (hex) of the files `names` in `directory`, read in this order, and the
    largest token id in those of them that are token files (``*.bin``, ids of `dtype`)."""
    digest, top = hashlib.sha256(), 0
    for name in names:
        with open(directory / name, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
                if name.endswith(".bin"):
                    top = max(top, int(np.frombuffer(chunk, dtype).max()))
    return digest.hexdigest(), top


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
        # (a copied corpus is the same data): `--resume` compares this. Fed the files of
        # `_content_files` in its order, as `_verified` reads them back.
        content = hashlib.sha256(b"".join((tmp / name).read_bytes() for name in sorted(tokenizer.files())))
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
            "stamps": _stamps(tmp, _content_files(tokenizer)),
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
    if _usable(directory, fingerprint) is not None:
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
