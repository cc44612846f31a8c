"""Where a corpus comes from: the embedded default, a local file or folder, or a Hugging Face
dataset, each turned into the documents of a training and a validation split.

How a source string is read (`resolve_source`):

- ``None`` or ``"embedded"``: the embedded corpus (`infmoe.data.embedded`).
- an existing file: its documents (see `infmoe.data.text`); the last `valid_fraction` of
  them (at least one) are the validation split.
- an existing folder: if it holds a train file (a name with the word ``train``, such as
  ``train.txt`` or ``wiki.train.tokens``), that file is the training split and a valid
  file (``valid``, ``validation``, ``val`` or ``dev``) the validation split, or, if there
  is none, the last `valid_fraction` of the train file's documents; ``test`` files are
  ignored. Otherwise every ``*.txt`` file below it (hidden ones skipped) in sorted path
  order, the last `valid_fraction` of the files (at least one) being the validation split,
  or of the documents when only one file has text.
- ``"hf:NAME"`` or ``"hf:NAME:CONFIG"``, or a bare name that is not an existing path
  (``wikitext``, ``roneneldan/TinyStories``: at most one ``/``, no file suffix): a Hugging
  Face dataset, column ``text``, one document per row; splits ``train`` and
  ``validation`` (or ``valid``, else ``test``), else the last `valid_fraction` of train.
- anything else that looks like a path (a suffix such as ``.txt``, a leading ``/``,
  ``.`` or ``~``, several ``/``) and does not exist: a `DataError`.

`Source.stream` gives each split as `Documents`, read lazily each time they are iterated,
so that a corpus far larger than memory can be tokenized:

- a Hugging Face dataset is loaded with ``streaming=False`` (the default): `datasets`
  downloads it once into its cache as Arrow files, which are memory-mapped, and its rows
  are read `HF_BATCH_ROWS` at a time. When it has no held-out split, one counting pass
  over the train split (a batch in memory at a time) finds how many documents it has and
  the row where the last `valid_fraction` of them begins; the splits are then two row
  ranges. (``streaming=True`` would download the corpus again on every pass, could not
  use the offline cache, and cannot tell how many rows there are.)
- a folder of ``*.txt`` files is read one file at a time; a first pass over the files
  checks them and finds the ones with text (which decides the split).
- the embedded corpus and single files, small or cut into documents by a rule that needs
  the whole text, are read into lists.

`Source.load` reads both splits into lists (for small corpora and tests).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tqdm.auto import tqdm

from infmoe.data.embedded import embedded_documents, embedded_text
from infmoe.data.text import one_line, read_text, split_documents, split_tail, tail_count
from infmoe.errors import DataError

EMBEDDED = "embedded"
TEXT_SUFFIXES = (".txt", ".text", ".tokens", ".raw")  # split files: WikiText ships .tokens and .raw
_SPLIT_WORDS = {
    "train": "train",
    "valid": "valid",
    "validation": "valid",
    "val": "valid",
    "dev": "valid",
    "test": "test",
}
_HF_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_PROBE_SECONDS = 3.0  # how long to wait for the Hub before calling the network absent
HF_BATCH_ROWS = 1024  # dataset rows read at a time: ~5 MB for web pages (OpenWebText's average)


@dataclass
class Splits:
    """The documents of each split, in corpus order (both lists non-empty)."""

    train: list[str]
    valid: list[str]


class Documents:
    """One split's documents in corpus order, read lazily: each iteration reads them again
    from where they live (a list, the files, a dataset's memory-mapped Arrow cache), so a
    corpus is never held in memory whole. `count` is how many there are: set up front when
    the source has counted them, else None until an iteration has run to the end."""

    def __init__(self, read: Callable[[], Iterator[str]], count: int | None = None):
        self._read, self.count = read, count

    @classmethod
    def of(cls, documents: list[str]) -> Documents:
        return cls(lambda: iter(documents), len(documents))

    def __iter__(self) -> Iterator[str]:
        n = 0
        for doc in self._read():
            n += 1
            yield doc
        self.count = n

    def __length_hint__(self) -> int:  # operator.length_hint: for progress bars
        return NotImplemented if self.count is None else self.count


@dataclass
class Streams:
    """The `Documents` of each split (both non-empty)."""

    train: Documents
    valid: Documents

    @classmethod
    def of(cls, train: list[str], valid: list[str]) -> Streams:
        return cls(Documents.of(train), Documents.of(valid))


class Source(ABC):
    """A corpus. `identity` is cheap (no reading of the text) and changes whenever the
    text may have changed; `stream` checks and splits it, ready to be read split by split.
    Bad text raises a `DataError` from `stream`, not later while its documents are read
    (unless the files change in between)."""

    description: str  # for people: "file /data/x.txt", "Hugging Face dataset wikitext:wikitext-2-raw-v1"
    slug: str  # for the cache folder's name

    @abstractmethod
    def identity(self) -> dict[str, Any]: ...

    @abstractmethod
    def stream(self, valid_fraction: float, encoding_errors: str, *, progress: bool = False) -> Streams:
        """The splits' `Documents`; `progress` shows tqdm bars for passes over the text."""

    def load(self, valid_fraction: float, encoding_errors: str) -> Splits:
        """`stream`'s splits read into lists."""
        streams = self.stream(valid_fraction, encoding_errors)
        return Splits(list(streams.train), list(streams.valid))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")[:40] or "corpus"


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _no_text(where: str) -> DataError:
    return DataError(f"{where} holds no text (it is empty or only whitespace); give a corpus with text")


def _require_text(documents: list[str], where: str) -> list[str]:
    if not documents:
        raise _no_text(where)
    return documents


def _file_documents(path: Path, encoding_errors: str) -> list[str]:
    return split_documents(read_text(path, encoding_errors))


class EmbeddedSource(Source):
    """The embedded corpus (cached as text under `cache_dir`)."""

    def __init__(self, cache_dir: Path):
        self.text, self.text_path = embedded_text(cache_dir)
        self.description = "embedded: the Python documentation (pydoc topics and standard-library docstrings)"
        self.slug = EMBEDDED

    def identity(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.text.encode("utf-8")).hexdigest()
        return {"kind": EMBEDDED, "python": sys.version, "text_sha256": digest}

    def stream(self, valid_fraction: float, encoding_errors: str, *, progress: bool = False) -> Streams:
        return Streams.of(
            *split_tail(embedded_documents(self.text), valid_fraction, "documents", "the embedded corpus")
        )


class FileSource(Source):
    """One local text file."""

    def __init__(self, path: Path):
        self.path = path
        self.description = f"file {path}"
        self.slug = _slug(path.stem)

    def identity(self) -> dict[str, Any]:
        return {"kind": "file", "files": [_stat(self.path)]}

    def stream(self, valid_fraction: float, encoding_errors: str, *, progress: bool = False) -> Streams:
        docs = _require_text(_file_documents(self.path, encoding_errors), str(self.path))
        return Streams.of(*split_tail(docs, valid_fraction, "documents", str(self.path)))


class FolderSource(Source):
    """A local folder: train/valid files, else all ``*.txt`` files below it."""

    def __init__(self, path: Path):
        self.path = path
        self.train_file, self.valid_file = _split_files(path)
        if self.train_file:
            self.files = [f for f in (self.train_file, self.valid_file) if f]
        else:
            self.files = sorted(
                (p for p in path.rglob("*.txt") if p.is_file() and not _hidden(p, path)),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            if not self.files:
                raise DataError(
                    f"folder {path} has no train file and no .txt files; "
                    f"put train.txt (and valid.txt) or .txt files in it"
                )
        names = ", ".join(p.relative_to(path).as_posix() for p in self.files[:3])
        more = f" and {len(self.files) - 3} more" if len(self.files) > 3 else ""
        self.description = f"folder {path} ({names}{more})"
        self.slug = _slug(path.name)

    def identity(self) -> dict[str, Any]:
        roles = {"train": self.train_file, "valid": self.valid_file}
        return {
            "kind": "folder",
            "path": str(self.path),
            "files": [_stat(p) for p in self.files],
            "roles": {k: str(v) for k, v in roles.items() if v},
        }

    def stream(self, valid_fraction: float, encoding_errors: str, *, progress: bool = False) -> Streams:
        if self.train_file:
            train = _require_text(_file_documents(self.train_file, encoding_errors), str(self.train_file))
            if self.valid_file is None:
                return Streams.of(*split_tail(train, valid_fraction, "documents", str(self.train_file)))
            return Streams.of(
                train, _require_text(_file_documents(self.valid_file, encoding_errors), str(self.valid_file))
            )
        # A first pass, a file in memory at a time, checks every file and counts its documents.
        files = tqdm(self.files, desc="scan files", unit="file", disable=not progress)
        counts = {p: n for p in files if (n := len(_file_documents(p, encoding_errors)))}
        if not counts:
            raise _no_text(f"the .txt files of {self.path}")
        if len(counts) == 1:
            (only,) = counts
            return Streams.of(
                *split_tail(
                    _file_documents(only, encoding_errors), valid_fraction, "documents", str(self.path)
                )
            )
        train_files, valid_files = split_tail(list(counts), valid_fraction, "files", str(self.path))
        return Streams(
            *(_files_documents(part, counts, encoding_errors) for part in (train_files, valid_files))
        )


def _files_documents(files: list[Path], counts: dict[Path, int], encoding_errors: str) -> Documents:
    def read() -> Iterator[str]:
        for path in files:
            yield from _file_documents(path, encoding_errors)

    return Documents(read, sum(counts[p] for p in files))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _split_files(folder: Path) -> tuple[Path | None, Path | None]:
    """The folder's (train file, valid file), each None when absent; a `DataError` when a
    split has several candidates."""
    found: dict[str, list[Path]] = {"train": [], "valid": [], "test": []}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith("."):
            words = re.split(r"[^a-z0-9]+", p.name.lower())
            split = next((_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS), None)
            if split:
                found[split].append(p)
    for split in ("train", "valid"):
        if len(found[split]) > 1:
            names = ", ".join(p.name for p in found[split])
            raise DataError(
                f"folder {folder} has several {split} files ({names}); keep one, or name the file to use"
            )
    train = found["train"][0] if found["train"] else None
    valid = found["valid"][0] if found["valid"] and train else None  # a lone valid file is just text
    return train, valid


class HFSource(Source):
    """A Hugging Face dataset, loaded (and cached, as memory-mapped Arrow files) by
    `datasets.load_dataset`, read `HF_BATCH_ROWS` rows at a time."""

    def __init__(self, name: str, config: str | None, *, bare: bool):
        self.name, self.config, self.bare = name, config, bare
        self.label = f"{name}:{config}" if config else name
        self.description = f"Hugging Face dataset {self.label}"
        self.slug = _slug("hf-" + self.label.replace("/", "-"))

    def identity(self) -> dict[str, Any]:
        return {"kind": "hf", "name": self.name, "config": self.config}

    def _fail(self, reason: str) -> DataError:
        also = "; it is not a local file or folder either" if self.bare else ""
        return DataError(
            f"cannot load Hugging Face dataset {self.label!r} (no network or unknown name{also}): "
            f"{reason}; use a local file or folder, or 'embedded'"
        )

    def stream(self, valid_fraction: float, encoding_errors: str, *, progress: bool = False) -> Streams:
        if not _hf_offline_mode():
            endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
            if not _reachable(endpoint):  # else the Hub client retries for ~25 s before failing
                raise self._fail(
                    f"{endpoint} is unreachable (set HF_HUB_OFFLINE=1 to use a copy "
                    f"already in the Hugging Face cache)"
                )
        try:
            import datasets  # lazily: importing it costs a second and it is only needed here
        except ImportError:
            raise self._fail("the 'datasets' package is missing (pip install datasets)") from None
        try:  # streaming=False, the default: Arrow files in the cache, memory-mapped, not read into RAM
            dataset = datasets.load_dataset(self.name, self.config)
        except Exception as e:  # noqa: BLE001 - ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            raise self._fail(one_line(e, 200)) from None
        return self._streams(dataset, valid_fraction, progress)

    def _streams(self, dataset: Any, valid_fraction: float, progress: bool) -> Streams:
        splits = list(dataset)
        if "train" not in splits:
            raise DataError(
                f"Hugging Face dataset {self.label!r} has no train split (it has {', '.join(splits)}); "
                f"use another dataset or a local file"
            )
        texts = {
            name: self._texts(dataset[name])
            for name in splits
            if name in ("train", "validation", "valid", "test")
        }
        train, where = texts["train"], f"the train split of {self.label!r}"
        held_out = next(
            (
                texts[n]
                for n in ("validation", "valid", "test")
                if n in texts and _first_document_row(texts[n]) >= 0
            ),
            None,
        )
        if held_out is not None:
            if _first_document_row(train) < 0:
                raise _no_text(where)
            return Streams(_hf_documents(train), _hf_documents(held_out))
        # The last valid_fraction of train's documents: count them (a pass holding a batch
        # of rows at a time), then cut the rows where the tail's first document is.
        per_batch = _count_documents(train, progress)
        n = sum(per_batch)
        if not n:
            raise _no_text(where)
        n_train = n - tail_count(n, valid_fraction, "documents", where)
        cut = _document_row(train, per_batch, n_train)
        return Streams(
            _hf_documents(train, 0, cut, n_train), _hf_documents(train, cut, train.num_rows, n - n_train)
        )

    def _texts(self, split: Any) -> Any:
        """`split` narrowed to its ``text`` column (so no other column is ever read)."""
        if "text" not in split.column_names:
            raise DataError(
                f"Hugging Face dataset {self.label!r} has no 'text' column "
                f"(it has {', '.join(split.column_names)}); use a dataset with one"
            )
        return split.select_columns(["text"])


# A row of a dataset's text column is a document when it is a string with more than
# whitespace; the document is that string stripped.


def _is_document(text: object) -> bool:
    return isinstance(text, str) and bool(text) and not text.isspace()  # == bool(text.strip()), no copy


def _batches(split: Any, start: int, stop: int) -> Iterator[tuple[int, list]]:
    """``(first row, texts)`` for each batch of at most `HF_BATCH_ROWS` rows in ``[start, stop)``."""
    for row in range(start, stop, HF_BATCH_ROWS):
        yield row, split[row : min(row + HF_BATCH_ROWS, stop)]["text"]


def _hf_documents(split: Any, start: int = 0, stop: int | None = None, count: int | None = None) -> Documents:
    """The documents of rows ``[start, stop)`` of `split`'s text column."""
    stop = split.num_rows if stop is None else stop

    def read() -> Iterator[str]:
        for _, texts in _batches(split, start, stop):
            yield from (text.strip() for text in texts if _is_document(text))

    return Documents(read, count)


def _document_rows(split: Any, start: int) -> Iterator[int]:
    """The rows from `start` on that hold a document."""
    for row, texts in _batches(split, start, split.num_rows):
        yield from (row + i for i, text in enumerate(texts) if _is_document(text))


def _first_document_row(split: Any) -> int:
    """The first row that holds a document, -1 when none does."""
    return next(_document_rows(split, 0), -1)


def _count_documents(split: Any, progress: bool) -> list[int]:
    """The number of documents in each batch of `_batches(split, 0, num_rows)`."""
    per_batch = []
    with tqdm(total=split.num_rows, desc="count documents", unit="row", disable=not progress) as bar:
        for _, texts in _batches(split, 0, split.num_rows):
            per_batch.append(sum(map(_is_document, texts)))
            bar.update(len(texts))
    return per_batch


def _document_row(split: Any, per_batch: list[int], k: int) -> int:
    """The row of document `k` (0-based; `k` < the total), from `_count_documents`' counts."""
    for batch, n in enumerate(per_batch):
        if k < n:
            return next(islice(_document_rows(split, batch * HF_BATCH_ROWS), k, None))
        k -= n
    raise AssertionError("the split holds fewer documents than counted")  # not if the Arrow file stays


def _hf_offline_mode() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _reachable(url: str, timeout: float = _PROBE_SECONDS) -> bool:
    """Whether a TCP connection to `url`'s host opens within `timeout` seconds. Runs in a
    daemon thread because name resolution itself has no timeout."""
    parsed = urlparse(url)
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
            opened.append(True)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or bool(Path(text).suffix)
        or not _HF_NAME.fullmatch(text)
    )


def resolve_source(source: str | os.PathLike | None, cache_dir: Path) -> Source:
    """The `Source` that `source` names (see the module docstring); `DataError` for a path
    that does not exist or is neither a file nor a folder."""
    if source is None or (isinstance(source, str) and source == EMBEDDED):
        return EmbeddedSource(cache_dir)
    if isinstance(source, str) and source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        if not _HF_NAME.fullmatch(name):
            raise DataError(f"{source!r} is not a Hugging Face dataset name; write hf:NAME or hf:NAME:CONFIG")
        return HFSource(name, config or None, bare=False)
    path = Path(source).expanduser()
    try:
        exists = path.exists()
    except OSError as e:  # e.g. a folder on the way that we may not enter
        raise DataError(
            f"cannot access {source}: {e.strerror or e}; check the path and its permissions"
        ) from None
    if exists:
        path = path.resolve()
        if path.is_file():
            return FileSource(path)
        if path.is_dir():
            return FolderSource(path)
        raise DataError(
            f"{path} is neither a regular file nor a folder; give a text file or a folder of them"
        )
    if isinstance(source, str) and not _looks_like_path(source):
        return HFSource(source, None, bare=True)
    raise DataError(f"no such file or folder: {source}; check the path, or use 'embedded' or hf:NAME")
