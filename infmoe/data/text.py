"""Raw text in, documents out: reading a file safely and cutting it into documents.

A **document** is the unit that the token files separate with ``<|endoftext|>``. One rule,
applied to every text file (and to the cached embedded corpus):

1. if the text contains the literal marker ``<|endoftext|>``, the marker separates the
   documents (TinyStories' original export, and our own embedded-corpus cache, look so);
2. else, if it has blank lines (lines of nothing but spaces/tabs), each block of lines
   between blank lines is a document (paragraphs, WikiText-2 articles' sections);
3. else each line is a document (one-story-per-line corpora).

Each document is stripped of leading and trailing whitespace; whitespace-only documents
are dropped. Line breaks inside a document are kept as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from infmoe.errors import DataError

EOT = "<|endoftext|>"
ENCODING_ERRORS = ("strict", "replace")

# A line break followed by one or more whitespace-only lines.
_BLANK_LINES = re.compile(r"\r?\n(?:[^\S\r\n]*\r?\n)+")
# Bytes that never occur in text: C0 controls except tab, LF, VT, FF, CR and ESC.
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\x0b\x0c\r\x1b")
_CONTROL_SHARE = 0.05  # above this share of control bytes a file is taken for binary
_SNIFF = 1 << 20  # bytes looked at for the control-byte share

T = TypeVar("T")


def read_text(path: Path, encoding_errors: str = "strict") -> str:
    """The text of one file, decoded as UTF-8, after checks that give one-line errors.

    ``encoding_errors="strict"`` rejects invalid UTF-8 with the byte offset of the first
    bad byte; ``"replace"`` turns every invalid byte sequence into U+FFFD (the Unicode
    replacement character) and goes on. A leading byte-order mark is dropped. Raises
    `DataError` for an unreadable, binary or non-UTF-8 file.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(
            f"cannot read {path}: {e.strerror or e}; check that it exists and its permissions"
        ) from None
    if b"\x00" in data or _control_share(data[:_SNIFF]) > _CONTROL_SHARE:
        raise DataError(f"{path} looks binary, not text (NUL or control bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start}); "
            f"convert it with `iconv -f latin1 -t utf-8`, or pass --encoding-errors replace"
        ) from None
    return text.removeprefix("\ufeff")


def _control_share(data: bytes) -> float:
    """Share of `data`'s bytes that are control characters text never holds."""
    return (len(data) - len(data.translate(None, _CONTROL))) / max(len(data), 1)


def split_documents(text: str) -> list[str]:
    """Cut `text` into documents by the module's rule (marker, blank lines, else lines)."""
    if EOT in text:
        parts = text.split(EOT)
    elif _BLANK_LINES.search(text):
        parts = _BLANK_LINES.split(text)
    else:
        parts = text.splitlines()
    return [doc for doc in (part.strip() for part in parts) if doc]


def tail_count(n: int, fraction: float, what: str, where: str) -> int:
    """How many of `n` items make the last `fraction` (rounded, at least one, leaving at
    least one before them). `DataError` when ``n < 2``; `what` ("documents", "files") and
    `where` name the items in the message."""
    if n < 2:
        raise DataError(
            f"{where} has {n} {what}, too few to split off a validation set; "
            f"give more text (documents are separated by blank lines) or separate train/valid files"
        )
    return min(n - 1, max(1, round(n * fraction)))


def split_tail(items: Sequence[T], fraction: float, what: str, where: str) -> tuple[list[T], list[T]]:
    """``(head, tail)``: the tail is the last `tail_count` of `items`, the head the rest."""
    cut = len(items) - tail_count(len(items), fraction, what, where)
    return list(items[:cut]), list(items[cut:])


def one_line(error: object, limit: int = 300) -> str:
    """`error`'s text with all whitespace runs (newlines included) collapsed to one space and
    cut to `limit` characters, for quoting a library's message inside a one-line error."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
