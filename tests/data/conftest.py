"""Fixtures for the data tests: a private cache folder, a small corpus, the shared data."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import tiktoken

from infmoe.data.embedded import embedded_text
from infmoe.data.text import EOT
from infmoe.errors import InfmoeError

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A fresh cache folder (never ~/.cache)."""
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A cache folder that already holds the built embedded corpus, and its text: built
    once per session because building takes seconds."""
    folder = tmp_path_factory.mktemp("embedded-cache")
    text, _ = embedded_text(folder)
    return folder, text


@pytest.fixture
def shared_data() -> Path:
    """/work/shared/data (the project's real corpora), or a skip when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"../shared/data is absent: {SHARED_DATA.resolve()} holds the real corpora (WikiText-2) "
            f"that this test reads; it only exists in the development checkout"
        )
    return SHARED_DATA.resolve()


def _paragraphs(n: int, tag: str = "doc") -> str:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex its jolly box".split()
    return (
        "\n\n".join(
            f"{tag} {i}: " + " ".join(words[(i * 7 + j) % len(words)] for j in range(12 + i % 9)) + "."
            for i in range(n)
        )
        + "\n"
    )


@pytest.fixture
def paragraphs() -> Callable[..., str]:
    """``paragraphs(n, tag="doc")``: `n` distinct blank-line-separated documents of
    English-like text, the i-th starting with ``f"{tag} {i}:"``."""
    return _paragraphs


@pytest.fixture
def one_line_error() -> Callable[..., str]:
    """``one_line_error(ErrorType, fn, *args, match=regex, **kwargs)``: call `fn`, require
    `ErrorType` with a single-line message matching `match`, raised ``from None`` (so no
    library traceback is chained to it); returns the message."""

    def check(
        error_type: type[InfmoeError], fn: Callable[..., object], *args: object, match: str, **kwargs: object
    ) -> str:
        with pytest.raises(error_type) as info:
            fn(*args, **kwargs)
        message = str(info.value)
        assert message and "\n" not in message and message == message.strip(), repr(message)
        assert re.search(match, message), f"{match!r} not in {message!r}"
        assert info.value.__cause__ is None and (
            info.value.__context__ is None or info.value.__suppress_context__
        )
        return message

    return check


@pytest.fixture
def fake_gpt2(monkeypatch: pytest.MonkeyPatch) -> tiktoken.Encoding:
    """Make ``tiktoken.get_encoding("gpt2")`` return a tiny byte-level encoding named gpt2
    (256 byte ids + <|endoftext|> = 256), so the tiktoken path is tested offline."""
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOT: 256},
    )
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: encoding)
    return encoding


@pytest.fixture
def gpt2_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``tiktoken.get_encoding`` fail the way it does without network."""

    def offline(name: str) -> None:
        raise ConnectionError(
            "HTTPSConnectionPool(host='openaipublic.blob.core.windows.net')\nMax retries exceeded"
        )

    monkeypatch.setattr(tiktoken, "get_encoding", offline)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> dict:
    """`datasets.load_dataset` answering from memory: fill the returned dict with
    ``{split: {column: values}}``; each load builds in-memory Arrow `datasets.Dataset`s
    from it, the kind that ``load_dataset(..., streaming=False)`` returns."""
    import datasets  # a declared dependency, imported here because it takes a second

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no reachability probe
    served: dict = {}
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda name, config=None: datasets.DatasetDict(
            {split: datasets.Dataset.from_dict(columns) for split, columns in served.items()}
        ),
    )
    return served
