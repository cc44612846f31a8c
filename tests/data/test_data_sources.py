import time
from pathlib import Path

import pytest

from infmoe.data.sources import (
    EmbeddedSource,
    FileSource,
    FolderSource,
    HFSource,
    _reachable,
    resolve_source,
)
from infmoe.errors import DataError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(source, cache_dir: Path, valid_fraction: float = 0.05):
    return resolve_source(source, cache_dir).load(valid_fraction, "strict")


# --- which kind of source a string names --------------------------------------------------


def test_none_and_embedded_name_the_embedded_corpus(embedded_cache):
    folder, _ = embedded_cache
    assert isinstance(resolve_source(None, folder), EmbeddedSource)
    assert isinstance(resolve_source("embedded", folder), EmbeddedSource)


def test_existing_paths_are_files_or_folders(tmp_path: Path, cache_dir: Path):
    file = write(tmp_path / "corpus.txt", "a\n\nb\n")
    assert isinstance(resolve_source(file, cache_dir), FileSource)
    assert isinstance(resolve_source(str(tmp_path), cache_dir), FolderSource)


@pytest.mark.parametrize(
    ("source", "name", "config"),
    [
        ("hf:wikitext:wikitext-2-raw-v1", "wikitext", "wikitext-2-raw-v1"),
        ("hf:roneneldan/TinyStories", "roneneldan/TinyStories", None),
        ("wikitext", "wikitext", None),
        ("roneneldan/TinyStories", "roneneldan/TinyStories", None),
    ],
)
def test_hf_names(source: str, name: str, config, cache_dir: Path, monkeypatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)  # no local path of that name
    src = resolve_source(source, cache_dir)
    assert isinstance(src, HFSource) and (src.name, src.config) == (name, config)


def test_a_bare_name_that_exists_locally_is_the_local_folder(tmp_path: Path, cache_dir: Path, monkeypatch):
    write(tmp_path / "wikitext" / "train.txt", "x\n\ny\n")
    monkeypatch.chdir(tmp_path)
    assert isinstance(resolve_source("wikitext", cache_dir), FolderSource)


@pytest.mark.parametrize(
    "source", ["missing.txt", "./missing", "/no/such/folder", "a/b/c", "~/no-such-corpus.txt", "two words"]
)
def test_missing_paths_are_one_line_errors(
    source: str, cache_dir: Path, one_line_error, monkeypatch, tmp_path: Path
):
    monkeypatch.chdir(tmp_path)
    one_line_error(
        DataError, resolve_source, source, cache_dir, match=r"^no such file or folder: .*; check the path"
    )


# --- local files and folders ------------------------------------------------------------


def test_a_file_splits_off_its_last_documents(tmp_path: Path, cache_dir: Path, paragraphs):
    splits = load(write(tmp_path / "c.txt", paragraphs(40)), cache_dir, 0.1)
    assert len(splits.train) == 36 and len(splits.valid) == 4
    assert splits.valid[0].startswith("doc 36:") and splits.train[-1].startswith("doc 35:")


@pytest.mark.parametrize(
    ("train", "valid"),
    [
        ("train.txt", "valid.txt"),
        ("train.txt", "validation.txt"),
        ("train.txt", "val.txt"),
        ("wiki.train.tokens", "wiki.valid.tokens"),
    ],
)
def test_a_folder_with_split_files_uses_them_and_ignores_test(
    tmp_path: Path, cache_dir: Path, paragraphs, train, valid
):
    write(tmp_path / train, paragraphs(5, "train"))
    write(tmp_path / valid, paragraphs(2, "valid"))
    write(tmp_path / "test.txt", paragraphs(3, "test"))
    splits = load(tmp_path, cache_dir)
    assert [d.split(":")[0] for d in splits.train] == [f"train {i}" for i in range(5)]
    assert [d.split(":")[0] for d in splits.valid] == ["valid 0", "valid 1"]


def test_a_folder_with_only_a_train_file_splits_it(tmp_path: Path, cache_dir: Path, paragraphs):
    write(tmp_path / "train.txt", paragraphs(20))
    write(tmp_path / "test.txt", paragraphs(3, "test"))
    splits = load(tmp_path, cache_dir, 0.25)
    assert len(splits.train) == 15 and splits.valid[0].startswith("doc 15:")


def test_a_plain_folder_takes_its_txt_files_in_order_and_the_last_ones_for_validation(
    tmp_path: Path, cache_dir: Path
):
    write(tmp_path / "b.txt", "b1\n\nb2\n")
    write(tmp_path / "a.txt", "a1\n\na2\n")
    write(tmp_path / "sub" / "c.txt", "c1\n\nc2\n")
    write(tmp_path / "empty.txt", " \n")
    write(tmp_path / "notes.md", "not a txt file\n")
    write(tmp_path / ".hidden" / "z.txt", "hidden\n")
    splits = load(tmp_path, cache_dir, 0.34)  # 3 files with text: round(1.02) = 1 for validation
    assert splits.train == ["a1", "a2", "b1", "b2"] and splits.valid == ["c1", "c2"]


def test_a_folder_with_one_text_file_splits_its_documents(tmp_path: Path, cache_dir: Path, paragraphs):
    write(tmp_path / "stories.txt", paragraphs(10))
    splits = load(tmp_path, cache_dir, 0.2)
    assert len(splits.train) == 8 and len(splits.valid) == 2


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({}, r"has no train file and no \.txt files"),
        ({"notes.md": "x"}, r"has no train file and no \.txt files"),
        ({"a.txt": "  \n", "b.txt": ""}, r"holds no text"),
        (
            {"train.txt": "x\n\ny\n", "train.raw": "z\n\nw\n"},
            r"several train files \(train\.raw, train\.txt\)",
        ),
        ({"train.txt": "x\n\ny\n", "valid.txt": "\n"}, r"valid\.txt holds no text"),
        (
            {"train.txt": "just one document\n", "test.txt": "t\n"},
            r"train\.txt has 1 documents, too few to split",
        ),
    ],
)
def test_bad_folders(tmp_path: Path, cache_dir: Path, one_line_error, files: dict, match: str):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in files.items():
        write(folder / name, text)
    one_line_error(DataError, load, folder, cache_dir, match=match)


def test_wikitext2_folder_uses_its_train_and_valid_files(shared_data: Path, cache_dir: Path):
    src = resolve_source(shared_data / "wikitext-2", cache_dir)
    assert [p.name for p in src.files] == ["train.txt", "valid.txt"]
    splits = src.load(0.05, "strict")
    assert splits.train[0] == "= Valkyria Chronicles III ="
    assert splits.valid[0] == "= Homarus gammarus ="
    assert len(splits.train) > 10 * len(splits.valid) > 10_000


# --- Hugging Face datasets ----------------------------------------------------------------


def test_hf_train_and_validation_rows_are_documents(fake_hub, cache_dir: Path):
    fake_hub.update(
        train={"text": ["one\n\nstill one", "", "  two  "]},
        validation={"text": ["three"]},
        test={"text": ["four"]},
    )
    splits = load("hf:fake/corpus", cache_dir)
    assert splits.train == ["one\n\nstill one", "two"] and splits.valid == ["three"]


def test_hf_test_split_serves_when_there_is_no_validation(fake_hub, cache_dir: Path):
    fake_hub.update(train={"text": ["a", "b"]}, test={"text": ["c"]})
    assert load("hf:fake", cache_dir).valid == ["c"]


def test_hf_train_only_is_split(fake_hub, cache_dir: Path):
    fake_hub.update(train={"text": [f"row {i}" for i in range(10)]})
    splits = load("hf:fake", cache_dir, 0.2)
    assert splits.valid == ["row 8", "row 9"]


@pytest.mark.parametrize(
    ("served", "match"),
    [
        ({"train": {"content": ["x"]}}, r"has no 'text' column \(it has content\)"),
        ({"validation": {"text": ["x"]}}, r"has no train split"),
    ],
)
def test_hf_bad_layouts(fake_hub, cache_dir: Path, one_line_error, served, match):
    fake_hub.update(served)
    one_line_error(DataError, load, "hf:fake", cache_dir, match=match)


def test_an_unknown_hf_dataset_fails_fast_with_one_line(
    cache_dir: Path, one_line_error, monkeypatch, tmp_path: Path
):
    monkeypatch.chdir(tmp_path)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # exercise the reachability probe
        monkeypatch.delenv(name, raising=False)
    start = time.perf_counter()
    one_line_error(
        DataError,
        load,
        "infmoe-no-such-dataset-7f3a",
        cache_dir,
        match=r"^cannot load Hugging Face dataset 'infmoe-no-such-dataset-7f3a' \(no network or unknown name"
        r".*use a local file or folder, or 'embedded'$",
    )
    assert time.perf_counter() - start < 15  # the Hub client alone would retry for ~25 s offline


def test_the_reachability_probe_says_no_quickly_for_a_host_that_cannot_exist():
    start = time.perf_counter()
    assert not _reachable("https://infmoe.invalid", timeout=2.0)
    assert time.perf_counter() - start < 2.5
