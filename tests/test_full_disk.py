"""A real full disk (see conftest.FullDisk) under every command that writes: one line, exit
status 2, and whatever was on disk before is still whole."""

import json
import shutil

import pytest

from infmoe.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, micro):
    out = tmp_path_factory.mktemp("run")
    settings = micro(out, max_steps=2, warmup_steps=1)
    assert main(["train", *[item for k, v in settings.items() for item in (f"--{k}", str(v))]]) == 0
    return out / "checkpoint.safetensors"


def refused(done) -> str:
    """The one error line of a refused command (progress bars may share stderr with it)."""
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "cannot write" in errors[0], errors[0]
    return errors[0]


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name
                  or p.name.startswith(".infmoe-export-"))


def test_eval_json_and_png(trained, cache_dir, full_disk):
    out = full_disk.folder / "ev"
    argv = ["eval", str(trained), "--samples", "1", "--tokens", "256", "--cache_dir", str(cache_dir), "--out", str(out)]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in full_disk.folder.iterdir()}
    for free in (200, 8 * 1024):  # the JSON does not fit; then the JSON fits and the PNG does not
        full_disk.fill(free)
        refused(full_disk.run(argv))
        assert {p.name: p.read_bytes() for p in full_disk.folder.iterdir() if p.name != ".filler"} == before
        assert leftovers(full_disk.folder) == []


def test_zeroshot_json(trained, tmp_path, full_disk):
    data = tmp_path / "piqa.jsonl"
    data.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0}) + "\n")
    full_disk.fill(100)
    refused(full_disk.run(["zeroshot", str(trained), "--task", "piqa", "--data", str(data),
                           "--out", str(full_disk.folder / "r.json")]))
    assert not (full_disk.folder / "r.json").exists() and leftovers(full_disk.folder) == []


def test_export(trained, full_disk):
    folder = full_disk.folder / "hf"
    assert main(["export", str(trained), "--hf", str(folder)]) == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    full_disk.fill(4 * 1024)
    refused(full_disk.run(["export", str(trained), "--hf", str(folder)]))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert leftovers(full_disk.folder) == []


def test_data_cache(corpus, full_disk):
    text = full_disk.folder.parent / "text.txt"
    shutil.copy(corpus, text)
    full_disk.fill(4 * 1024)
    message = refused(full_disk.run(["prepare", "--data", str(text), "--cache_dir", str(full_disk.folder / "cache"),
                                     "--tokenizer", "bpe", "--tokenizer_vocab", "300", "--quiet"]))
    assert "prepared data" in message
    assert leftovers(full_disk.folder) == [] and not any((full_disk.folder / "cache").glob("*/meta.json"))
