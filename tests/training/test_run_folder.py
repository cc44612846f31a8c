"""A run folder under stress: a second writer, a resume that must log as if never stopped,
a log cut mid-line, and settings that must be refused before anything is written."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from infmoe.cli import main
from infmoe.io import LOCK_FILE, FolderBusy, folder_lock
from infmoe.training import resolve, train
from infmoe.training.metrics import read_metrics


def argv(settings: dict) -> list[str]:
    return ["train", *(item for key, value in settings.items() for item in (f"--{key}", str(value)))]


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def holder_pid(folder) -> str:
    path = folder / LOCK_FILE
    return path.read_text().strip() if path.exists() else ""


def test_a_second_training_into_a_busy_folder_is_refused_with_the_holders_pid(tmp_path, micro, capsys):
    settings = micro(tmp_path / "run", max_steps=400, eval_interval=400, save_interval=400)
    first = subprocess.Popen([sys.executable, "-m", "infmoe.cli", *argv(settings)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: holder_pid(tmp_path / "run") == str(first.pid) or first.poll() is not None,
                 "the first training to take the folder")
        assert first.poll() is None, first.stderr.read().decode()
        assert main(argv(dict(settings, seed=2))) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"PID {first.pid}" in err and "another --out_dir" in err
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.kill()
        first.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = f"from infmoe.io import folder_lock\nwith folder_lock({str(tmp_path)!r}, fix='x'):\n    input()"
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        wait_for(lambda: holder_pid(tmp_path) == str(holder.pid), "the holder to take the lock")
        with pytest.raises(FolderBusy, match=f"PID {holder.pid}"):
            with folder_lock(tmp_path, fix="x"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with folder_lock(tmp_path, fix="x"):  # the kernel released it with the process
        assert holder_pid(tmp_path) == str(os.getpid())


def logged(folder) -> dict[int, dict]:
    return {row["step"]: row for row in read_metrics(folder / "metrics.jsonl") if "train/loss" in row}


def test_a_resumed_run_logs_what_the_uninterrupted_run_logs(tmp_path, micro):
    # The checkpoint at step 4 falls inside the interval logged at step 6.
    settings = dict(log_interval=3, save_interval=4)
    train(*resolve(micro(tmp_path / "whole", **settings)))
    train(*resolve(micro(tmp_path / "split", stop_at=4, **settings)))
    train(*resolve(micro(tmp_path / "split", resume=True, **settings)))
    whole, split = logged(tmp_path / "whole"), logged(tmp_path / "split")
    assert sorted(whole) == sorted(split) == [3, 6, 8]
    for step in whole:
        for key in whole[step]:
            if key != "train/tokens_per_s":  # wall-clock time differs; everything else may not
                assert split[step][key] == whole[step][key], (step, key)
        assert split[step]["train/tokens_per_s"] > 0


def test_a_partial_last_metrics_line_is_dropped_on_resume(tmp_path, micro, capsys):
    folder = tmp_path / "run"
    assert main(argv(micro(folder, stop_at=4, log_interval=1))) == 0
    metrics = folder / "metrics.jsonl"
    whole = metrics.read_bytes()
    metrics.write_bytes(whole + b'{"step": 5, "train/lo')  # what a crash mid-append leaves
    assert main(argv(micro(folder, log_interval=1, resume=True))) == 0
    assert "dropped the partial last line" in capsys.readouterr().err
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole again
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 9))


def test_resuming_past_the_end_says_nothing_was_trained(tmp_path, micro, capsys):
    folder = tmp_path / "run"
    assert main(argv(micro(folder))) == 0
    capsys.readouterr()
    before = (folder / "checkpoint.safetensors").read_bytes()
    assert main(argv(micro(folder, resume=True))) == 0
    assert "nothing to train" in capsys.readouterr().err
    assert main(argv(micro(folder, resume=True, max_steps=6))) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "at step 8, past the --max_steps of 6" in err
    assert (folder / "checkpoint.safetensors").read_bytes() == before


@pytest.mark.parametrize("option, value, message", [
    ("seed", "-1", "seed=-1"), ("seed", "abc", "seed='abc'"), ("seed", "1.5", "seed=1.5"),
    ("seed", str(2**70), f"seed={2**70}"),
    ("kl_free", ".inf", "kl_free=inf is invalid: must be a finite number"),
    ("lr", ".nan", "lr=nan is invalid"), ("grad_clip", "-.inf", "grad_clip=-inf is invalid"),
    ("n_components", "1000000000", "n_components=1000000000 is invalid: must be at most 256"),
])
def test_bad_values_are_refused_before_anything_is_written(tmp_path, micro, capsys, option, value, message):
    folder = tmp_path / "run"
    assert main(argv(micro(folder, **{option: value}))) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
    assert not folder.exists()
