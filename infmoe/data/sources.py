"""Where a corpus comes from: the embedded default, a local file or folder, or a Hugging Face
dataset, each turned into a training and a validation list of documents.

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
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from infmoe.data.embedded import embedded_documents, embedded_text
from infmoe.data.text import one_line, read_text, split_documents, split_tail
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


@dataclass
class Splits:
    """The documents of each split, in corpus order (both lists non-empty)."""

    train: list[str]
    valid: list[str]


class Source(ABC):
    """A corpus. `identity` is cheap (no reading of the text) and changes whenever the
    text may have changed; `load` reads and splits it."""

    description: str  # for people: "file /data/x.txt", "Hugging Face dataset wikitext:wikitext-2-raw-v1"
    slug: str  # for the cache folder's name

    @abstractmethod
    def identity(self) -> dict[str, Any]: ...

    @abstractmethod
    def load(self, valid_fraction: float, encoding_errors: str) -> Splits: ...


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")[:40] or "corpus"


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _require_text(documents: list[str], where: str) -> list[str]:
    if not documents:
        raise DataError(f"{where} holds no text (it is empty or only whitespace); give a corpus with text")
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

    def load(self, valid_fraction: float, encoding_errors: str) -> Splits:
        return Splits(
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

    def load(self, valid_fraction: float, encoding_errors: str) -> Splits:
        docs = _require_text(_file_documents(self.path, encoding_errors), str(self.path))
        return Splits(*split_tail(docs, valid_fraction, "documents", str(self.path)))


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

    def load(self, valid_fraction: float, encoding_errors: str) -> Splits:
        if self.train_file:
            train = _require_text(_file_documents(self.train_file, encoding_errors), str(self.train_file))
            if self.valid_file is None:
                return Splits(*split_tail(train, valid_fraction, "documents", str(self.train_file)))
            return Splits(
                train, _require_text(_file_documents(self.valid_file, encoding_errors), str(self.valid_file))
            )
        per_file = [docs for p in self.files if (docs := _file_documents(p, encoding_errors))]
        _require_text([d for docs in per_file for d in docs], f"the .txt files of {self.path}")
        if len(per_file) == 1:
            return Splits(*split_tail(per_file[0], valid_fraction, "documents", str(self.path)))
        train_files, valid_files = split_tail(per_file, valid_fraction, "files", str(self.path))
        return Splits([d for docs in train_files for d in docs], [d for docs in valid_files for d in docs])


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
    """A Hugging Face dataset, loaded (and cached) by `datasets.load_dataset`."""

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

    def load(self, valid_fraction: float, encoding_errors: str) -> Splits:
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
        try:
            dataset = datasets.load_dataset(self.name, self.config)
        except Exception as e:  # noqa: BLE001 - ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            raise self._fail(one_line(e, 200)) from None
        return self._splits(dataset, valid_fraction)

    def _splits(self, dataset: Any, valid_fraction: float) -> Splits:
        splits = list(dataset)
        if "train" not in splits:
            raise DataError(
                f"Hugging Face dataset {self.label!r} has no train split (it has {', '.join(splits)}); "
                f"use another dataset or a local file"
            )
        docs = {
            name: self._documents(dataset[name])
            for name in splits
            if name in ("train", "validation", "valid", "test")
        }
        train = _require_text(docs["train"], f"the train split of {self.label!r}")
        held_out = next((docs[n] for n in ("validation", "valid", "test") if docs.get(n)), None)
        if held_out is None:
            return Splits(
                *split_tail(train, valid_fraction, "documents", f"the train split of {self.label!r}")
            )
        return Splits(train, held_out)

    def _documents(self, split: Any) -> list[str]:
        if "text" not in split.column_names:
            raise DataError(
                f"Hugging Face dataset {self.label!r} has no 'text' column "
                f"(it has {', '.join(split.column_names)}); use a dataset with one"
            )
        return [doc for doc in (t.strip() for t in split["text"] if isinstance(t, str)) if doc]


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
