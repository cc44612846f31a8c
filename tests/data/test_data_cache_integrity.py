"""The prepared-data cache is checked against its files, not trusted (issue 22 item 3).

Each test damages a real cache on disk the way a user or a stray process would, then runs
`prepare` or the real CLI (`infmoe.cli.main`) on it.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from infmoe.checkpoint import load_checkpoint
from infmoe.cli import main
from infmoe.data import pipeline, prepare

SMALL = {"tokenizer": "bpe", "vocab_size": 300, "progress": False}
BEYOND = 60_000  # a token id no tokenizer here has (uint16 still holds it)
# A training run of a few milliseconds a step (cf. tests/conftest.py's micro).
TINY = ["--config", "tiny-infmoe", "--n_layer", "2", "--d_model", "32", "--n_head", "2", "--n_ctx", "32",
        "--tokenizer", "bpe", "--tokenizer_vocab", "300", "--batch_size", "4", "--max_steps", "4",
        "--warmup_steps", "1", "--eval_interval", "2", "--eval_tokens", "256", "--log_interval", "1",
        "--save_interval", "2", "--progress", "false", "--tensorboard", "false"]


@pytest.fixture
def text(tmp_path: Path, paragraphs) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(paragraphs(60), encoding="utf-8")
    return path


def overwrite(path: Path, ids_of=lambda ids: np.zeros_like(ids), *, keep_mtime: bool = False) -> None:
    """Rewrite the token file `path` in place, same size, with `ids_of(its ids)`. Its mtime
    moves on as with any write (and is set a second further, for filesystems with coarse
    timestamps), or, with `keep_mtime`, is set back to what it was."""
    before = path.stat()
    ids = np.fromfile(path, dtype="<u2")
    ids_of(ids).astype("<u2").tofile(path)
    assert path.stat().st_size == before.st_size
    mtime = before.st_mtime_ns if keep_mtime else before.st_mtime_ns + 10**9
    os.utime(path, ns=(before.st_atime_ns, mtime))


def with_an_id_beyond_the_vocabulary(ids: np.ndarray) -> np.ndarray:
    ids = ids.copy()
    ids[3] = BEYOND
    return ids


def forbid_hashing(monkeypatch) -> None:
    def fail(*args):
        raise AssertionError("hashed the cache although its stamps were unchanged")

    monkeypatch.setattr(pipeline, "_content_digest", fail)


def read_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def the_note(capsys, folder: Path, why: str) -> str:
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("infmoe: note:")]
    assert len(notes) == 1 and str(folder) in notes[0] and why in notes[0], err
    assert "Traceback" not in err
    return notes[0]


def one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert all(needle in err for needle in needles), err
    return err


# --- prepare() ------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["zeros", "truncated", "id beyond the vocabulary"])
def test_a_damaged_token_file_is_prepared_again_with_a_note(text, cache_dir, capsys, damage):
    """Before: zeros of the same size were served as the cached data (and a written
    out-of-vocabulary id only failed later, in `unigram_loss`)."""
    first = prepare(text, cache_dir=cache_dir, **SMALL)
    folder, train, recorded = first.directory, first.train.copy(), first.meta["content_sha256"]
    del first  # its memmap
    if damage == "zeros":
        overwrite(folder / "train.bin")
    elif damage == "truncated":
        os.truncate(folder / "train.bin", 10)
    else:
        overwrite(folder / "train.bin", with_an_id_beyond_the_vocabulary)
    capsys.readouterr()
    again = prepare(text, cache_dir=cache_dir, **SMALL)
    why = {"zeros": "SHA-256", "truncated": "train.bin holds 10 bytes", "id beyond the vocabulary": f"{BEYOND}"}
    the_note(capsys, folder, why[damage])
    assert not again.cached and np.array_equal(again.train, train)
    assert again.meta["content_sha256"] == recorded  # the same content as before the damage


def test_an_unchanged_cache_is_not_read_again(text, cache_dir, monkeypatch):
    first = prepare(text, cache_dir=cache_dir, **SMALL)
    forbid_hashing(monkeypatch)  # the stamps recorded when it was built gate the hash
    again = prepare(text, cache_dir=cache_dir, **SMALL)
    assert again.cached and again.meta == first.meta == read_meta(first.directory)


def test_a_touched_file_is_hashed_once_and_its_new_stamp_recorded(text, cache_dir, monkeypatch, capsys):
    first = prepare(text, cache_dir=cache_dir, **SMALL)
    train_bin = first.directory / "train.bin"
    stat = train_bin.stat()
    os.utime(train_bin, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a copy or `touch`: same bytes
    hashed = []
    real_digest = pipeline._content_digest
    monkeypatch.setattr(pipeline, "_content_digest", lambda *args: hashed.append(1) or real_digest(*args))
    touched = prepare(text, cache_dir=cache_dir, **SMALL)
    assert touched.cached and len(hashed) == 1 and "note" not in capsys.readouterr().err
    stamps = read_meta(first.directory)["stamps"]
    assert stamps["train.bin"] == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns + 10**9}
    assert touched.meta["content_sha256"] == first.meta["content_sha256"] and touched.meta["stamps"] == stamps
    assert not [p for p in first.directory.iterdir() if p.name.endswith(".tmp")]  # renamed into place
    forbid_hashing(monkeypatch)
    assert prepare(text, cache_dir=cache_dir, **SMALL).cached  # recorded: not hashed a second time


@pytest.mark.parametrize("recorded", ["the hash", "nothing"])
def test_an_old_cache_without_stamps_is_hashed_once(text, cache_dir, monkeypatch, recorded):
    """Caches written before the stamps existed (and, older still, before content_sha256)."""
    first = prepare(text, cache_dir=cache_dir, **SMALL)
    old = {k: v for k, v in first.meta.items() if k != "stamps" and (recorded == "the hash" or k != "content_sha256")}
    (first.directory / "meta.json").write_text(json.dumps(old))
    again = prepare(text, cache_dir=cache_dir, **SMALL)
    assert again.cached and again.meta == first.meta == read_meta(first.directory)
    forbid_hashing(monkeypatch)
    assert prepare(text, cache_dir=cache_dir, **SMALL).cached


def test_an_old_cache_whose_tokens_changed_is_prepared_again(text, cache_dir, capsys):
    first = prepare(text, cache_dir=cache_dir, **SMALL)
    folder, train = first.directory, first.train.copy()
    (folder / "meta.json").write_text(json.dumps({k: v for k, v in first.meta.items() if k != "stamps"}))
    del first
    overwrite(folder / "train.bin", keep_mtime=True)  # no stamps to compare: hashed anyway
    again = prepare(text, cache_dir=cache_dir, **SMALL)
    the_note(capsys, folder, "SHA-256")
    assert not again.cached and np.array_equal(again.train, train)


def test_a_change_that_restores_size_and_mtime_is_not_noticed_by_design(text, cache_dir):
    """The size/mtime stamps decide whether the files are read again (hashing a cache of
    gigabytes on every start would be too slow). They catch accidents, not concealment: a
    file rewritten with its size kept and its mtime set back (``os.utime``) is trusted.
    Ids beyond the vocabulary written that way are still refused where they are used (see
    the CLI tests below); other ids are not, by design."""
    first = prepare(text, cache_dir=cache_dir, **SMALL)
    overwrite(first.directory / "train.bin", keep_mtime=True)
    again = prepare(text, cache_dir=cache_dir, **SMALL)
    assert again.cached and not again.train.any()


def test_a_damaged_cache_that_cannot_be_prepared_again_is_one_line(cache_dir, fake_hub, monkeypatch, capsys):
    """The corpus is a Hugging Face dataset that has gone offline since it was prepared."""
    import datasets

    fake_hub["train"] = {"text": [f"document {i} of a small dataset about foxes and dogs" for i in range(80)]}
    fake_hub["validation"] = {"text": [f"held out document {i} on wizards" for i in range(8)]}
    folder = prepare("hf:someone/foxes", cache_dir=cache_dir, **SMALL).directory
    overwrite(folder / "train.bin")

    def offline(name, config=None):
        raise ConnectionError("Couldn't reach 'someone/foxes' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    capsys.readouterr()
    args = ["prepare", "--data", "hf:someone/foxes", "--cache_dir", str(cache_dir), "--tokenizer", "bpe",
            "--tokenizer_vocab", "300", "--quiet"]
    assert main(args) == 2
    note, error = capsys.readouterr().err.splitlines()  # what it tried, then why it stopped
    assert note.startswith(f"infmoe: note: the prepared data in {folder} is damaged")
    assert error.startswith(f"infmoe prepare: error: the prepared data in {folder} is damaged")
    assert "cannot be prepared again" in error and "use a local file or folder" in error


# --- the CLI: prepare, train --resume, eval, inspect ----------------------------------


def prepare_args(corpus: Path, cache: Path) -> list[str]:
    return ["prepare", "--data", str(corpus), "--cache_dir", str(cache), "--tokenizer", "bpe",
            "--tokenizer_vocab", "300", "--quiet"]


def prepared_folder(cache: Path) -> Path:
    (folder,) = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return folder


def test_prepare_replaces_ids_beyond_the_vocabulary(text, cache_dir, capsys):
    """Before: `infmoe prepare` said "prepare the data again", and said it again when run again."""
    assert main(prepare_args(text, cache_dir)) == 0
    folder = prepared_folder(cache_dir)
    overwrite(folder / "train.bin", with_an_id_beyond_the_vocabulary)
    capsys.readouterr()
    assert main(prepare_args(text, cache_dir)) == 0
    the_note(capsys, folder, f"token id {BEYOND}, beyond the vocabulary of 300")
    # hidden behind a restored mtime, they are still refused, with a fix that works
    overwrite(folder / "train.bin", with_an_id_beyond_the_vocabulary, keep_mtime=True)
    assert main(prepare_args(text, cache_dir)) == 2
    one_error_line(capsys, f"token id {BEYOND} >= vocab_size=300", f"delete {folder} and run again")
    shutil.rmtree(folder)
    assert main(prepare_args(text, cache_dir)) == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> tuple[Path, Path]:
    """(a run folder stopped at step 2 of 4, its prepared-data cache)."""
    root = tmp_path_factory.mktemp("integrity")
    out, cache = root / "run", root / "cache"
    assert main(["train", *TINY, "--data", str(corpus), "--cache_dir", str(cache), "--out_dir", str(out),
                 "--stop_at", "2"]) == 0
    return out, cache


def test_resume_after_the_tokens_were_zeroed_continues_on_the_real_ones(run, tmp_path, capsys):
    """Before: `--resume` trained on the zeros (the unigram baseline jumped to ~11)."""
    out, cache = run
    cache = shutil.copytree(cache, tmp_path / "cache")  # copy2 keeps the mtimes: still stamped
    damaged, reference = (shutil.copytree(out, tmp_path / name) for name in ("damaged", "reference"))
    resume = ["train", *TINY, "--cache_dir", str(cache), "--resume"]
    data = load_checkpoint(out / "checkpoint.safetensors").state["data"]["source"]
    assert main([*resume, "--data", data, "--out_dir", str(reference)]) == 0  # on the intact cache
    overwrite(prepared_folder(cache) / "train.bin")
    capsys.readouterr()
    assert main([*resume, "--data", data, "--out_dir", str(damaged)]) == 0
    the_note(capsys, prepared_folder(cache), "SHA-256")
    assert np.fromfile(prepared_folder(cache) / "train.bin", dtype="<u2").any()
    a, b = (load_checkpoint(folder / "checkpoint.safetensors") for folder in (reference, damaged))
    assert a.state["step"] == b.state["step"] == 4 and a.state["unigram_loss"] == b.state["unigram_loss"]
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)  # trained on the same tokens


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_eval_and_inspect_refuse_ids_beyond_the_vocabulary_in_one_line(run, tmp_path, cache_dir, capsys, command):
    """Before: an IndexError traceback from the embedding."""
    checkpoint = str(run[0] / "checkpoint.safetensors")

    def args(out: str) -> list[str]:
        samples = ["--samples", "1"] if command == "eval" else []
        return [command, checkpoint, "--cache_dir", str(cache_dir), "--tokens", "256", *samples,
                "--out", str(tmp_path / out)]

    assert main(args("first")) == 0  # prepares the data with the model's tokenizer
    folder = prepared_folder(cache_dir)
    overwrite(folder / "valid.bin", with_an_id_beyond_the_vocabulary)  # a plain write: prepared again
    capsys.readouterr()
    assert main(args("second")) == 0
    the_note(capsys, folder, f"token id {BEYOND}")
    overwrite(folder / "valid.bin", with_an_id_beyond_the_vocabulary, keep_mtime=True)  # hidden from prepare
    assert main(args("third")) == 2
    one_error_line(capsys, f"infmoe {command}: error:", f"hold id {BEYOND}, beyond the model's vocabulary",
                   f"delete {folder} and run again")
