"""One tokenizer interface over two backends: tiktoken's GPT-2 encoding and a byte-level BPE
trained with Hugging Face `tokenizers`.

Both map any Unicode string to ids and back without loss (byte-level), and both know the
document separator ``<|endoftext|>``: written literally in a text, it encodes to `eot_id`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sized
from pathlib import Path

import tiktoken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from infmoe.data.text import EOT, one_line
from infmoe.errors import DataError, invalid, positive_int

BPE_FILE = "tokenizer.json"  # Hugging Face tokenizers' own format
TIKTOKEN_FILE = "tiktoken.json"  # a marker: {"kind": "tiktoken", "encoding": "gpt2"}
MIN_BPE_VOCAB = 257  # the 256 byte symbols plus <|endoftext|>
_ALLOWED = frozenset({EOT})


class Tokenizer:
    """A text ↔ token-id map. ``name`` is ``"gpt2"`` (tiktoken) or ``"bpe-<vocab_size>"``
    (trained); ``vocab_size`` bounds the ids (all ids are in ``[0, vocab_size)``);
    ``eot_id`` is the id of ``<|endoftext|>``. Build one with `Tokenizer.gpt2`,
    `Tokenizer.train_bpe` or `load_tokenizer`."""

    def __init__(self, backend: HFTokenizer | tiktoken.Encoding):
        self._backend = backend
        if isinstance(backend, tiktoken.Encoding):
            self.name = backend.name
            self.vocab_size = backend.n_vocab
            self.eot_id = backend.eot_token
        else:
            eot = backend.token_to_id(EOT)
            if eot is None:
                raise DataError(
                    f"the tokenizer has no {EOT} token; prepare the data again to train a new one"
                )
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            self.name = f"bpe-{self.vocab_size}"
            self.eot_id = eot

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"

    @property
    def is_tiktoken(self) -> bool:
        return isinstance(self._backend, tiktoken.Encoding)

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """GPT-2's tokenizer (50,257 ids) from tiktoken. Its files are downloaded once (and
        cached by tiktoken), so offline and uncached this raises a one-line `DataError`."""
        try:
            return cls(tiktoken.get_encoding("gpt2"))
        except Exception as e:  # noqa: BLE001 - requests' ConnectionError, a hash mismatch, a bad cache...
            raise DataError(
                f"cannot load the GPT-2 tokenizer with tiktoken ({one_line(e, 160)}); it is downloaded once, "
                f"so connect to the network (or set TIKTOKEN_CACHE_DIR to a folder holding it), "
                f"or use tokenizer 'bpe' to train one on the corpus"
            ) from None

    @classmethod
    def train_bpe(cls, documents: Iterable[str], vocab_size: int, *, progress: bool = True) -> Tokenizer:
        """A byte-level BPE (GPT-2's pre-tokenisation, ``<|endoftext|>`` as its only special
        token, id 0) trained on `documents` up to `vocab_size` ids. A small corpus can end
        with fewer ids; `vocab_size` of the result says how many. `documents` may be any
        iterable, read once as it goes (the trainer keeps word counts, not the text)."""
        check_bpe_vocab(vocab_size)
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
            show_progress=progress,
        )
        length = len(documents) if isinstance(documents, Sized) else None  # for the progress bar
        backend.train_from_iterator(documents, trainer=trainer, length=length)
        return cls(backend)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (no special tokens added; a literal ``<|endoftext|>`` becomes `eot_id`)."""
        if isinstance(self._backend, tiktoken.Encoding):
            return self._backend.encode(text, allowed_special=_ALLOWED)
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, computed in parallel (Rust threads in both backends)."""
        if isinstance(self._backend, tiktoken.Encoding):
            return self._backend.encode_batch(
                texts, allowed_special=_ALLOWED, num_threads=os.cpu_count() or 1
            )
        return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (``<|endoftext|>`` written out; a cut multi-byte character
        becomes U+FFFD)."""
        ids = [int(i) for i in ids]
        if isinstance(self._backend, tiktoken.Encoding):
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=False)

    def files(self) -> dict[str, str]:
        """This tokenizer as {file name: text}: ``tokenizer.json`` for a BPE, the small marker
        ``tiktoken.json`` for a tiktoken encoding (its files live in tiktoken's cache). What
        `save` writes, and how a tokenizer travels inside a checkpoint."""
        if isinstance(self._backend, tiktoken.Encoding):
            marker = {"kind": "tiktoken", "encoding": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id}
            return {TIKTOKEN_FILE: json.dumps(marker, indent=2) + "\n"}
        return {BPE_FILE: self._backend.to_str(pretty=True)}

    def save(self, directory: str | os.PathLike) -> None:
        """Write `files` into `directory`, removing the other kind's file (one tokenizer per folder)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = self.files()
        for name, text in files.items():
            (directory / name).write_text(text, encoding="utf-8")
        for name in {BPE_FILE, TIKTOKEN_FILE} - set(files):
            (directory / name).unlink(missing_ok=True)


def check_bpe_vocab(vocab_size: object) -> int:
    """`vocab_size` if it is a usable BPE vocabulary size, else a `ConfigError`."""
    if positive_int("vocab_size", vocab_size) < MIN_BPE_VOCAB or vocab_size > 2**32:
        raise invalid(
            "vocab_size", vocab_size, f"a byte-level BPE needs {MIN_BPE_VOCAB} <= vocab_size <= 2**32"
        )
    return vocab_size


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer that `Tokenizer.save` wrote into `directory`; a one-line `DataError`
    when there is none or it cannot be read."""
    directory = Path(directory)
    files = {}
    for name in (BPE_FILE, TIKTOKEN_FILE):
        try:
            files[name] = (directory / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"tokenizer file {directory / name} is unreadable ({one_line(e, 160)}); "
                            f"delete {directory} and prepare the data again") from None
    return tokenizer_from_files(files, lambda name: str(directory / name), f"delete {directory} and prepare the data again")


def tokenizer_from_files(files: dict[str, str], where: Callable[[str], str], fix: str) -> Tokenizer:
    """The tokenizer that `Tokenizer.files` gave as `files`, read without touching the disk;
    a one-line `DataError` naming the file (`where(name)` says where it came from) and
    `fix` when it is missing or corrupt."""
    if BPE_FILE in files:
        try:
            return Tokenizer(HFTokenizer.from_str(files[BPE_FILE]))
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed file
            raise DataError(f"tokenizer file {where(BPE_FILE)} is corrupt ({one_line(e, 160)}); {fix}") from None
    if TIKTOKEN_FILE in files:
        try:
            name = json.loads(files[TIKTOKEN_FILE])["encoding"]
            if name != "gpt2":
                raise ValueError(f"unknown encoding {name!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"tokenizer marker {where(TIKTOKEN_FILE)} is corrupt ({one_line(e, 160)}); {fix}") from None
        return Tokenizer.gpt2()
    raise DataError(f"no tokenizer in {where('')} (neither {BPE_FILE} nor {TIKTOKEN_FILE}); {fix}")
