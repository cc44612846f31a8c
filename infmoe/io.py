"""Writing files so that nothing already on disk is lost or half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from infmoe.errors import InfmoeError


class OutputError(InfmoeError):
    """An output file or folder that cannot be written (permissions, disk full, ...)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` when the block succeeds,
    delete it when the block fails. An OSError becomes one `OutputError` line."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise OutputError(
            f"cannot write {path}: {err.strerror or err}; free disk space or choose a writable folder"
        ) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and prove a file can be written there, before any compute."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to {folder}: {err.strerror or err}; choose a writable folder") from None
    return folder
