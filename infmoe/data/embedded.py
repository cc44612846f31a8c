"""The embedded default corpus: the running Python's own documentation, no network needed.

What it is: real English prose (with some code examples) that every Python installation
carries, in this order —

1. the language reference topics of ``pydoc_data.topics`` (what ``help("if")`` prints),
   one document per topic, in sorted topic order;
2. the docstrings of the standard library's ``.py`` files, read with `ast` (nothing is
   imported or executed), one document per module: a ``Module NAME`` heading, the
   module docstring, then each class, method and function docstring under its
   qualified name. Files are taken in sorted path order; test suites, IDLE, turtledemo,
   the generated codec tables (``encodings``) and installed packages are left out, and a
   docstring already seen is not repeated.

The text is deterministic for a given Python installation (about 2.3 MB in ~550 documents
for CPython 3.11). It is cached as a UTF-8 file whose documents are separated by
``<|endoftext|>`` lines, so the general text rule of `infmoe.data.text` reads it back.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from infmoe.data.text import EOT, split_documents
from infmoe.errors import DataError

BUILD_VERSION = 2  # bump when the way the text is built changes: old caches are then ignored
MIN_BYTES = 1_000_000  # a Python without its library sources cannot give a useful corpus

# Folder names under the standard library whose files are not documentation we want.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "encodings",
        "pydoc_data",
        "__pycache__",
        "lib-dynload",
        "ensurepip",
    }
)


def stdlib_root() -> Path:
    """The folder holding the running Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library ``.py`` files the corpus reads, in sorted relative-path order."""
    root = root or stdlib_root()
    files = []
    for folder, subfolders, names in os.walk(root):
        # Prune in place: never descending into site-packages (often huge) saves seconds.
        subfolders[:] = [d for d in subfolders if d not in _SKIP_DIRS]
        files += [Path(folder, n) for n in names if n.endswith(".py") and not n.startswith("_sysconfigdata")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics  # a plain dict of strings; importing it runs nothing else
    except ImportError:  # some distributions package it separately
        return {}
    return topics


def _topics_file() -> Path | None:
    spec = importlib.util.find_spec("pydoc_data.topics")
    return Path(spec.origin) if spec and spec.origin else None


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _docstrings(node: ast.AST, prefix: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) for the classes and functions directly in `node`'s body
    and, recursively, in classes (not in function bodies: those are local helpers)."""
    out: list[tuple[str, str]] = []
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{child.name}"
            doc = ast.get_docstring(child)
            if doc:
                out.append((name, doc))
            if isinstance(child, ast.ClassDef):
                out.extend(_docstrings(child, name))
    return out


def _module_document(root: Path, path: Path, seen: set[str]) -> str | None:
    """One module's docstrings as a document, or None when it has none new."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):  # e.g. lib2to3 test data written in Python 2
        return None
    name = _module_name(root, path)
    sections = [f"Module {name}"]  # the heading says which module the text belongs to
    module_doc = ast.get_docstring(tree)
    for title, doc in [(None, module_doc), *_docstrings(tree, name)]:
        if doc and doc not in seen:
            seen.add(doc)
            sections += [title, doc.strip()] if title else [doc.strip()]
    return "\n\n".join(sections) if len(sections) > 1 else None


def build_embedded_documents() -> list[str]:
    """The corpus as a list of documents (no caching; a few seconds of parsing)."""
    topics = _topics()
    docs = [topics[key].strip() for key in sorted(topics)]
    root = stdlib_root()
    seen: set[str] = set()
    docs.extend(doc for path in stdlib_files(root) if (doc := _module_document(root, path, seen)))
    # The marker separates documents in the cached text, so it must not occur inside one.
    return [d.replace(EOT, "<|endof text|>") for d in docs if d.strip()]


def build_embedded_text() -> str:
    """The corpus as one string, documents separated by ``<|endoftext|>`` lines."""
    text = f"\n{EOT}\n".join(build_embedded_documents()) + "\n"
    if len(text.encode()) < MIN_BYTES:
        raise DataError(
            f"the embedded corpus needs the Python standard library's .py sources, and {stdlib_root()} "
            f"gives only {len(text.encode())} bytes of text; give a text file or folder instead"
        )
    return text


def _inputs_key() -> str:
    """A hash of everything the built text depends on, from file metadata only (cheap)."""
    root = stdlib_root()
    stats = [(p.relative_to(root).as_posix(), p.stat()) for p in stdlib_files(root)]
    files = [(name, st.st_size, st.st_mtime_ns) for name, st in stats]
    topics = _topics_file()
    topics_stat = (topics.stat().st_size, topics.stat().st_mtime_ns) if topics else None
    key = [BUILD_VERSION, sys.version, str(root), files, topics_stat]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def embedded_text(cache_dir: Path) -> tuple[str, Path]:
    """The corpus text and the file caching it under `cache_dir`, built on first use.

    The cache file name carries a hash of the Python version and the size and mtime of
    every source file, so an upgraded Python builds a new one. It is written to a
    temporary file and renamed, so a crash never leaves half a corpus behind.
    """
    version = ".".join(map(str, sys.version_info[:3]))
    path = cache_dir / f"embedded-py{version}-{_inputs_key()}.txt"
    try:
        return path.read_text(encoding="utf-8"), path
    except (OSError, UnicodeDecodeError):
        pass
    text = build_embedded_text()
    tmp = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise DataError(
            f"cannot write the embedded corpus to {cache_dir}: {e.strerror or e}; "
            f"pass a writable cache_dir (or set INFMOE_CACHE)"
        ) from None
    return text, path


def embedded_documents(text: str) -> list[str]:
    """The documents of the cached corpus text (the inverse of `build_embedded_text`)."""
    return split_documents(text)
