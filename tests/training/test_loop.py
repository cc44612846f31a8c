import errno
import json
import os
import signal

import pytest
import torch

from infmoe.checkpoint import load_checkpoint
from infmoe.errors import CheckpointError, ConfigError
from infmoe.io import OutputError
from infmoe.training import TrainingDiverged, resolve, train


def run(settings: dict, on_step=None):
    losses = {}

    def record(step, loss):
        losses[step] = loss
        if on_step:
            on_step(step, loss)

    return train(*resolve(settings), on_step=record), losses


@pytest.mark.parametrize("config", ["tiny-infmoe", "tiny-moe"])
def test_resume_continues_bit_exactly(tmp_path, micro, config):
    whole, whole_losses = run(micro(tmp_path / "whole", config=config))
    first, _ = run(micro(tmp_path / "split", config=config, stop_at=3))
    assert first.step == 3 and load_checkpoint(first.checkpoint).state["step"] == 3
    second, second_losses = run(micro(tmp_path / "split", config=config, resume=True))
    assert second.step == 8
    assert [second_losses[s] for s in range(4, 9)] == [whole_losses[s] for s in range(4, 9)]  # bit for bit
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(second.checkpoint)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_that_resumes(tmp_path, micro, sig):
    def interrupt(step, loss):
        if step == 3:
            os.kill(os.getpid(), sig)

    result, _ = run(micro(tmp_path), on_step=interrupt)
    assert result.interrupted_by == sig.name and result.step == 3
    assert load_checkpoint(result.checkpoint).state["step"] == 3
    resumed, _ = run(micro(tmp_path, resume=True))
    assert resumed.step == 8 and resumed.interrupted_by is None


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, micro, monkeypatch):
    from infmoe.models import GPT

    real = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, cache=None):
        out = real(self, idx, targets, cache)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 6:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingDiverged) as err:
        run(micro(tmp_path, save_interval=4))
    message = str(err.value)
    assert "loss became nan at step 7" in message and "step 4" in message and "\n" not in message
    assert load_checkpoint(tmp_path / "checkpoint.safetensors").state["step"] == 4


def test_existing_checkpoint_is_never_overwritten_without_resume(tmp_path, micro):
    result, _ = run(micro(tmp_path, max_steps=4))
    before = result.checkpoint.read_bytes()
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        run(micro(tmp_path, max_steps=4))
    assert result.checkpoint.read_bytes() == before


def test_resume_refuses_a_changed_setup(tmp_path, micro):
    run(micro(tmp_path, stop_at=2))
    with pytest.raises(CheckpointError, match="batch_size"):
        run(micro(tmp_path, resume=True, batch_size=2))
    with pytest.raises(CheckpointError, match="model config differs in n_layer"):
        run(micro(tmp_path, resume=True, n_layer=3))
    with pytest.raises(CheckpointError, match="no checkpoint.safetensors"):
        run(micro(tmp_path / "empty", resume=True))


def test_resume_follows_the_data_not_where_it_lives(tmp_path, micro, corpus):
    run(micro(tmp_path / "run", stop_at=2))
    moved = tmp_path / "moved" / "corpus.txt"  # same text, new path and mtime: prepared anew
    moved.parent.mkdir()
    moved.write_bytes(corpus.read_bytes())
    resumed, _ = run(micro(tmp_path / "run", data=str(moved), resume=True, stop_at=3))
    assert resumed.step == 3
    edited = tmp_path / "edited.txt"
    edited.write_text(corpus.read_text(encoding="utf-8") + " one more sentence.", encoding="utf-8")
    with pytest.raises(CheckpointError, match="prepared data differs"):
        run(micro(tmp_path / "run", data=str(edited), resume=True))


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, micro, monkeypatch):
    first, _ = run(micro(tmp_path, stop_at=4))
    before = first.checkpoint.read_bytes()
    import infmoe.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OutputError, match="No space left on device"):
        run(micro(tmp_path, resume=True))
    assert first.checkpoint.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_unwritable_out_dir_fails_before_any_compute(tmp_path, micro):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write to"):
        run(micro(blocker / "run"))


def test_metrics_jsonl_and_tensorboard(tmp_path, micro):
    run(micro(tmp_path, tensorboard=True))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    for key in ("train/lr", "train/tokens_per_s", "routing/sigma_mean", "routing/ever_used_fraction",
                "routing/usage_entropy", "routing/union_fraction"):
        assert key in train_rows[-1], key
    assert 0 < train_rows[-1]["routing/usage_entropy"] <= 1
    assert [r["step"] for r in rows if "val/loss" in r] == [4, 8]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


def test_learns_below_the_unigram_baseline(tmp_path, micro):
    result, _ = run(micro(tmp_path, max_steps=60, eval_interval=60, save_interval=60,
                                   lr=1e-2, batch_size=8))
    assert result.val_loss < result.unigram_loss


def test_unknown_settings_are_rejected_before_training(tmp_path, micro):
    with pytest.raises(ConfigError, match="unknown option --lrate"):
        resolve(micro(tmp_path, lrate=1.0))
    with pytest.raises(ConfigError, match="warmup_steps"):
        resolve(micro(tmp_path, warmup_steps=8))
    with pytest.raises(ConfigError, match="seq_len=64"):
        resolve(micro(tmp_path, seq_len=64))
