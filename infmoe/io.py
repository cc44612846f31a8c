"""Writing files so that nothing already on disk is lost or half-written.

Every file we write goes to a temporary name beside its destination, is flushed to disk,
then renamed over it: the previous file survives any failure, a full disk included. The
temporaries are named ``.<name>.<random>.tmp``, so a process killed mid-write leaves
only such a file, which `remove_stale_temporaries` clears on the next run.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from infmoe.errors import InfmoeError


class OutputError(InfmoeError):
    """An output file or folder that cannot be written (permissions, disk full, ...)."""


class FolderBusy(OutputError):
    """Another live process holds the folder's lock."""


LOCK_FILE = ".infmoe.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, fix: str) -> Iterator[Path]:
    """Hold an exclusive OS lock on `folder` (made if needed) for the block, or raise
    `FolderBusy` naming the PID of the process that holds it, with `fix` as the way out.

    The lock is the operating system's (flock on POSIX, a byte-range lock on Windows), so
    it dies with its process: a kill -9 never leaves a stale lock behind. The lock file
    stays in the folder: deleting it on release would let a process still opening the old
    file and a newcomer creating a new one both hold "the" lock.
    """
    folder = Path(folder)
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutputError(f"cannot write to {folder}: {err.strerror or err}; choose a writable folder") from None
    try:
        if not _try_lock(fd):
            holder = _read_holder(path)
            raise FolderBusy(f"{folder} is in use by another infmoe process (PID {holder}); {fix}")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(fd)  # releases the lock


def _read_holder(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip() or "unknown"
    except OSError:  # Windows refuses to read a locked byte range
        return "unknown"


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def write_failure(path: str | os.PathLike, err: BaseException) -> OutputError:
    """One `OutputError` line for a failed write of `path`, whichever library raised it."""
    return OutputError(f"cannot write {path}: {os_reason(err)}; free disk space or choose a writable folder")


def os_reason(err: BaseException) -> str:
    """The operating system's words for `err`: an OSError's strerror, or those of the OS
    error a Rust library (safetensors) wraps, e.g. "... No space left on device (os error 28)"."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    code = re.search(r"\(os error (\d+)\)", str(err))
    if code:
        return os.strerror(int(code.group(1)))
    found = re.search(r'message: "([^"]+)"', str(err))
    return found.group(1) if found else (str(err).splitlines() or [type(err).__name__])[0]


def write_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failed write raises: OSError, and safetensors' own error type,
    which wraps the OS error (ENOSPC, EFBIG, ...) instead of raising it."""
    from safetensors import SafetensorError

    return OSError, SafetensorError


def readable_by_umask(path: str | os.PathLike) -> None:
    """Give `path` the mode a plain open() would (0666 minus the umask): mkstemp creates
    files 0600, which would make checkpoints private against the user's own settings."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` when the block succeeds,
    delete it when the block fails. A failed write becomes one `OutputError` line."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        readable_by_umask(tmp)
        os.replace(tmp, path)
        tmp = None
    except write_errors() as err:
        raise write_failure(path, err) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """`atomic_path` for files that belong together (a report and its plot): one temporary
    each, and none is renamed into place unless every one of them was written."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path)) for path in paths]


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries `atomic_path` left beside `path` when its process was killed
    (only names of our own pattern, ``.<name>.*.tmp``); returns what was deleted."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


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


def check_writable_file(path: str | os.PathLike) -> Path:
    """Prove that `path` can be written (its folder exists or can be made, and is writable;
    `path` is not a folder) before any compute, without touching `path` itself."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give a file name")
    check_writable(path.parent)
    return path
