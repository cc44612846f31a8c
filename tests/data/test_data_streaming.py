"""Streaming: Hugging Face datasets and folders of .txt files are read lazily, in batches,
and give exactly the token files that reading them whole into lists gave."""

from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import pytest

from infmoe.data import Tokenizer, pipeline, prepare, sources, tokens
from infmoe.data.sources import Documents
from infmoe.errors import DataError

SMALL = {"tokenizer": "bpe", "vocab_size": 300, "progress": False}
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
    "its",
    "jolly",
    "box",
]


def rows(n: int) -> list:
    """`n` dataset rows: mostly documents (some with surrounding whitespace), some empty,
    whitespace-only or null, as real text columns have."""
    out: list = []
    for i in range(n):
        text = f"row {i}: " + " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(3 + i % 11))
        out.append("" if i % 9 == 4 else "  \n\t" if i % 13 == 6 else None if i % 17 == 8 else f"  {text}\n")
    return out


def documents(texts: list) -> list[str]:
    """What the list-reading code took for documents: the stripped non-empty strings."""
    return [t.strip() for t in texts if isinstance(t, str) and t.strip()]


def tail(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    cut = len(docs) - min(len(docs) - 1, max(1, round(len(docs) * fraction)))
    return docs[:cut], docs[cut:]


def check_files(prepared, train: list[str], valid: list[str], tmp_path: Path) -> None:
    """`prepared` holds what the list code wrote for these splits: a BPE trained on all of
    `train`, then each document's ids and EOT, in order."""
    tokenizer = Tokenizer.train_bpe(train, SMALL["vocab_size"], progress=False)
    tokenizer.save(tmp_path / "expected")
    assert (prepared.directory / "tokenizer.json").read_bytes() == (
        tmp_path / "expected" / "tokenizer.json"
    ).read_bytes()
    for ids, docs in ((prepared.train, train), (prepared.valid, valid)):
        assert ids.tolist() == [i for doc in docs for i in (*tokenizer.encode(doc), tokenizer.eot_id)]
    assert (prepared.meta["train_documents"], prepared.meta["valid_documents"]) == (len(train), len(valid))


class Log:
    """Records reads of dataset rows (or files) and the documents handed to encode_batch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.events: list[tuple[str, int]] = []
        real_getitem, real_encode = datasets.Dataset.__getitem__, Tokenizer.encode_batch

        def getitem(dataset, key):
            got = real_getitem(dataset, key)
            if isinstance(key, slice):
                self.events.append(("read", len(got["text"])))
            return got

        def encode_batch(tokenizer, texts):
            self.events.append(("encode", len(texts)))
            return real_encode(tokenizer, texts)

        monkeypatch.setattr(datasets.Dataset, "__getitem__", getitem)
        monkeypatch.setattr(Tokenizer, "encode_batch", encode_batch)

    def sizes(self, kind: str) -> list[int]:
        return [n for k, n in self.events if k == kind]

    def max_pending(self, start: int = 0) -> int:
        """The most items read but not yet encoded at any encode_batch call from event `start` on."""
        read = encoded = most = 0
        for kind, n in self.events[start:]:
            if kind == "read":
                read += n
            else:
                most = max(most, read - encoded)
                encoded += n
        return most


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """Rows read 7 at a time, documents encoded 5 at a time: many batches even for a
    small corpus, with split boundaries falling inside batches."""
    monkeypatch.setattr(sources, "HF_BATCH_ROWS", 7)
    monkeypatch.setattr(tokens, "CHUNK_DOCS", 5)
    return 7, 5


# --- Hugging Face datasets ----------------------------------------------------------------


@pytest.mark.parametrize("batch_rows", [7, 1024])
def test_hf_with_a_validation_split_writes_the_same_files(
    fake_hub, cache_dir: Path, tmp_path: Path, monkeypatch, batch_rows: int
):
    monkeypatch.setattr(sources, "HF_BATCH_ROWS", batch_rows)
    texts = rows(300)
    fake_hub.update(train={"text": texts[:250], "id": list(range(250))}, validation={"text": texts[250:]})
    prepared = prepare("hf:fake/corpus", cache_dir=cache_dir, **SMALL)
    check_files(prepared, documents(texts[:250]), documents(texts[250:]), tmp_path)


@pytest.mark.parametrize("batch_rows", [7, 1024])
def test_hf_train_only_writes_the_same_files(
    fake_hub, cache_dir: Path, tmp_path: Path, monkeypatch, batch_rows: int
):
    monkeypatch.setattr(sources, "HF_BATCH_ROWS", batch_rows)
    texts = rows(300)
    fake_hub.update(train={"text": texts})
    prepared = prepare("hf:fake/corpus", cache_dir=cache_dir, valid_fraction=0.15, **SMALL)
    check_files(prepared, *tail(documents(texts), 0.15), tmp_path)


@pytest.mark.parametrize("fraction", [1e-6, 0.01, 0.1, 0.5, 0.999])
def test_the_validation_tail_is_the_last_documents_wherever_the_batches_cut(
    fake_hub, cache_dir: Path, small_batches, fraction: float
):
    texts = rows(123)
    fake_hub.update(train={"text": texts})
    splits = sources.resolve_source("hf:fake", cache_dir).load(fraction, "strict")
    train, valid = tail(documents(texts), fraction)
    assert (splits.train, splits.valid) == (train, valid) and valid
    again = sources.resolve_source("hf:fake", cache_dir).load(fraction, "strict")
    assert (again.train, again.valid) == (splits.train, splits.valid)


def test_the_validation_tail_starts_at_its_row_even_after_empty_rows(
    fake_hub, cache_dir: Path, small_batches
):
    # Documents 0..9 in rows with empty rows between: the cut for 2 validation documents
    # lies on the row of document 8, past the empty rows after document 7.
    texts = [t for i in range(10) for t in (f"doc {i}", "", None, " ")]
    fake_hub.update(train={"text": texts})
    splits = sources.resolve_source("hf:fake", cache_dir).load(0.2, "strict")
    assert splits.train == [f"doc {i}" for i in range(8)] and splits.valid == ["doc 8", "doc 9"]


@pytest.mark.parametrize(
    ("served", "match"),
    [
        ({"train": {"text": ["", " ", None]}}, r"the train split of 'fake' holds no text"),
        (
            {"train": {"text": [" ", None]}, "validation": {"text": ["v"]}},
            r"the train split of 'fake' holds no text",
        ),
        ({"train": {"text": ["", "only one", " "]}}, r"the train split of 'fake' has 1 documents, too few"),
        ({"train": {"text": ["a"]}, "test": {"content": ["b"]}}, r"has no 'text' column \(it has content\)"),
    ],
)
def test_hf_corpora_without_enough_text(fake_hub, cache_dir: Path, one_line_error, served, match):
    fake_hub.update(served)
    one_line_error(DataError, prepare, "hf:fake", cache_dir=cache_dir, **SMALL, match=match)
    assert [p.name for p in cache_dir.iterdir()] == []


def test_hf_validation_with_no_text_falls_back_to_test(fake_hub, cache_dir: Path):
    fake_hub.update(train={"text": ["a", "b"]}, validation={"text": ["", None]}, test={"text": [" t "]})
    assert sources.resolve_source("hf:fake", cache_dir).load(0.5, "strict").valid == ["t"]


def test_hf_documents_are_read_in_batches_as_they_are_tokenized(
    fake_hub, cache_dir: Path, small_batches, fake_gpt2, monkeypatch
):
    batch_rows, chunk = small_batches
    texts = [f"document number {i} " + "word " * (i % 7) for i in range(700)]
    fake_hub.update(train={"text": texts[:600]}, validation={"text": texts[600:]})
    log = Log(monkeypatch)
    prepared = prepare("hf:fake", cache_dir=cache_dir, tokenizer="gpt2", progress=False)
    assert prepared.meta["train_documents"] == 600 and prepared.meta["valid_documents"] == 100
    assert max(log.sizes("read")) <= batch_rows and max(log.sizes("encode")) <= chunk
    # Never more than the two probes for text, a batch of rows and a chunk of documents
    # waiting: the dataset is read as it is tokenized, not first into memory.
    assert log.max_pending() <= 3 * batch_rows + chunk
    first_encode = log.events.index(("encode", chunk))
    assert sum(log.sizes("read")[: first_encode + 1]) < 100 < len(texts)


def test_the_counting_pass_reads_batches_and_keeps_none(
    fake_hub, cache_dir: Path, small_batches, fake_gpt2, monkeypatch
):
    batch_rows, chunk = small_batches
    fake_hub.update(train={"text": [f"story {i}." for i in range(400)]})
    log = Log(monkeypatch)
    prepared = prepare("hf:fake", cache_dir=cache_dir, tokenizer="gpt2", valid_fraction=0.1, progress=False)
    assert (prepared.meta["train_documents"], prepared.meta["valid_documents"]) == (360, 40)
    assert max(log.sizes("read")) <= batch_rows
    # After the counting pass (400 rows) and the cut's batch, tokenizing reads as it goes.
    reads_before_tokenizing = sum(
        n for k, n in log.events[: log.events.index(("encode", chunk))] if k == "read"
    )
    assert reads_before_tokenizing <= 400 + 2 * batch_rows


# --- the BPE's training sample --------------------------------------------------------------


def test_bpe_sample_stops_at_the_bound_without_reading_further(monkeypatch):
    monkeypatch.setattr(pipeline, "BPE_SAMPLE_CHARS", 10)
    pulled: list[str] = []

    def docs():
        for doc in ["abcd", "efg", "hij", "klmn", "opq"]:
            pulled.append(doc)
            yield doc

    assert list(pipeline.bpe_sample(docs())) == ["abcd", "efg", "hij"]  # 4 + 3 + 3 = 10
    assert pulled == ["abcd", "efg", "hij"]
    assert list(pipeline.bpe_sample(["abcdefghijkl", "m"])) == ["abcdefghijkl"]  # never cut
    assert list(pipeline.bpe_sample(["ab", "cd"])) == ["ab", "cd"]  # a small corpus: all of it


def test_a_bpe_is_trained_on_the_bounded_sample_only(fake_hub, cache_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(pipeline, "BPE_SAMPLE_CHARS", 2000)
    texts = [f"plain words number {i} and more" for i in range(100)] + ["zqxj" * 50] * 20
    fake_hub.update(train={"text": texts}, validation={"text": ["zqxj" * 50]})
    seen: list[list[str]] = []
    real_train = Tokenizer.train_bpe.__func__

    def train_bpe(cls, docs, vocab_size, *, progress=True):
        seen.append(list(docs))
        return real_train(cls, seen[-1], vocab_size, progress=progress)

    monkeypatch.setattr(Tokenizer, "train_bpe", classmethod(train_bpe))
    prepared = prepare("hf:fake", cache_dir=cache_dir, **SMALL)
    lengths = np.cumsum([len(t) for t in texts])
    n_sample = int(np.searchsorted(lengths, 2000)) + 1  # up to the document reaching 2000 characters
    assert seen == [texts[:n_sample]] and lengths[n_sample - 2] < 2000 <= lengths[n_sample - 1]
    assert prepared.meta["train_documents"] == 120  # all of train is tokenized
    assert len(prepared.valid) == 200 + 1  # letters the sample never had: one byte token each
    expected = Tokenizer.train_bpe(texts[:n_sample], 300, progress=False)
    assert prepared.tokenizer.encode("plain words zqxj") == expected.encode("plain words zqxj")


def test_training_from_an_iterator_equals_training_from_a_list(tmp_path: Path):
    docs = [f"alpha beta gamma {i} " * (1 + i % 4) for i in range(200)]
    Tokenizer.train_bpe(docs, 290, progress=False).save(tmp_path / "list")
    Tokenizer.train_bpe(iter(docs), 290, progress=False).save(tmp_path / "iter")
    assert (tmp_path / "list" / "tokenizer.json").read_bytes() == (
        tmp_path / "iter" / "tokenizer.json"
    ).read_bytes()


# --- folders of many .txt files -------------------------------------------------------------


@pytest.fixture
def txt_folder(tmp_path: Path, paragraphs) -> tuple[Path, list[list[str]]]:
    """A folder of 12 .txt files in 3 subfolders (one of them blank), and each file's
    documents in sorted path order."""
    folder = tmp_path / "corpus"
    per_file = []
    for k in range(12):
        path = folder / f"part{k % 3}" / f"f{k:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = " \n\n" if k == 5 else paragraphs(10 + k, f"file {k} doc")
        path.write_text(text, encoding="utf-8")
    for path in sorted(folder.rglob("*.txt"), key=lambda p: p.relative_to(folder).as_posix()):
        if docs := [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]:
            per_file.append(docs)
    return folder, per_file


def test_a_folder_of_txt_files_writes_the_same_files(txt_folder, cache_dir: Path, tmp_path: Path):
    folder, per_file = txt_folder
    prepared = prepare(folder, cache_dir=cache_dir, valid_fraction=0.2, **SMALL)
    train_files, valid_files = per_file[:-2], per_file[-2:]  # 11 files with text: round(2.2) = 2
    check_files(prepared, [d for f in train_files for d in f], [d for f in valid_files for d in f], tmp_path)


def test_a_folder_is_read_a_file_at_a_time(txt_folder, cache_dir: Path, fake_gpt2, monkeypatch):
    folder, per_file = txt_folder
    monkeypatch.setattr(tokens, "CHUNK_DOCS", 4)
    log = Log(monkeypatch)
    real_documents = sources._file_documents

    def file_documents(path, encoding_errors):
        docs = real_documents(path, encoding_errors)
        log.events.append(("read", len(docs)))
        return docs

    monkeypatch.setattr(sources, "_file_documents", file_documents)
    prepare(folder, cache_dir=cache_dir, tokenizer="gpt2", valid_fraction=0.2, progress=False)
    reads = [i for i, (kind, _) in enumerate(log.events) if kind == "read"]
    assert len(reads) == 12 + 11  # a scan, then a read while tokenizing of each file with text
    encodes = [i for i, (kind, _) in enumerate(log.events) if kind == "encode"]
    assert reads[12] < encodes[0] < reads[13]  # tokenizing starts after the first file, not the last
    largest = max(len(docs) for docs in per_file)
    assert log.max_pending(start=reads[12]) <= largest + 4


# --- lazily read documents ------------------------------------------------------------------


def test_documents_count_once_read_to_the_end():
    docs = Documents(lambda: iter(["a", "b", "c"]))
    assert docs.count is None and list(islice(docs, 2)) == ["a", "b"]
    assert docs.count is None  # a partial read counts nothing
    assert list(docs) == ["a", "b", "c"] and docs.count == 3 and list(docs) == ["a", "b", "c"]
    assert Documents.of(["x", "y"]).count == 2
