import json
import os
import re
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


# At this width and learning rate training diverges within a few steps: a real divergence,
# nothing patched. Which step, and whether the loss or the gradient norm goes first (nan or
# inf), depends on the CPU's kernels, so the tests below assert the behaviour, not the path.
# max_steps=40 keeps the learning rate near 1e3 for longer than the few steps divergence
# takes anywhere we have seen (step 2 here, step 3 on CI's Xeon), so a slower path still gets
# there; eval_interval=40 keeps the validation pass, which runs after a step is applied, out
# of the way, so the step that diverges is one whose update the loop can still refuse.
DIVERGES = dict(d_model=64, lr=1e3, warmup_steps=1, log_interval=1, max_steps=40, eval_interval=40)
NOT_APPLIED = re.compile(r"the (gradient norm|loss) became (nan|inf|-inf) at step (\d+)\b.*so the step was not applied")


def all_finite(path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_checkpoint(path).weights.values())


def diverge_and_catch_the_model(settings: dict):
    """Run `settings` until TrainingDiverged; → (the error's message, the live GPT as it was at
    the raise). A global forward hook (public torch API, nothing patched) catches the model."""
    from infmoe.models import GPT

    seen = []

    def catch(module, args, output):
        if isinstance(module, GPT) and not any(m is module for m in seen):
            seen.append(module)

    handle = torch.nn.modules.module.register_module_forward_hook(catch)
    try:
        with pytest.raises(TrainingDiverged) as err:
            run(settings)
    finally:
        handle.remove()
    assert len(seen) == 1, seen
    return str(err.value), seen[0]


def assert_stopped_before_the_update(message: str, model, checkpoint, first_step: int) -> None:
    """The message names a non-finite loss or gradient norm at step N and says the step was
    not applied; the checkpoint on disk is finite and of step N-1; the live model still holds
    exactly its weights (bit for bit: no update ran after the save, so nothing may differ)."""
    found = NOT_APPLIED.search(message)
    assert found, message
    step = int(found.group(3))
    assert step >= first_step, message
    assert f"last good checkpoint (step {step - 1})" in message and "\n" not in message, message
    saved = load_checkpoint(checkpoint)
    assert saved.state["step"] == step - 1
    assert all_finite(checkpoint)
    live = model.state_dict()
    assert all(torch.equal(live[k].detach().cpu(), v) for k, v in saved.weights.items())


def test_a_non_finite_gradient_stops_before_the_update(tmp_path, micro):
    # save_interval=1: a checkpoint of every applied step, so the one on disk is the step before.
    message, model = diverge_and_catch_the_model(micro(tmp_path, save_interval=1, **DIVERGES))
    assert_stopped_before_the_update(message, model, tmp_path / "checkpoint.safetensors", first_step=2)


def test_a_huge_lr_on_resume_never_overwrites_a_good_checkpoint(tmp_path, micro):
    finished, _ = run(micro(tmp_path, max_steps=4, d_model=64))
    message, model = diverge_and_catch_the_model(micro(tmp_path, resume=True, save_interval=1, **DIVERGES))
    assert_stopped_before_the_update(message, model, finished.checkpoint, first_step=5)


def test_save_checkpoint_refuses_non_finite_weights_and_keeps_the_file(tmp_path, micro):
    from infmoe.checkpoint import save_checkpoint

    finished, _ = run(micro(tmp_path, max_steps=2, warmup_steps=1))
    before = finished.checkpoint.read_bytes()
    model = load_checkpoint(finished.checkpoint).build_model()
    with torch.no_grad():
        model.blocks[0].attn.c_proj.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="not finite"):
        save_checkpoint(finished.checkpoint, model)
    assert finished.checkpoint.read_bytes() == before


def test_a_kill_during_a_checkpoint_write_leaves_no_temporary_after_resume(tmp_path, micro):
    """SIGKILL a real run while it writes a checkpoint (a 4 x 192 model, written at every
    step), then resume: the temporary it left is removed."""
    import subprocess
    import sys
    import time

    settings = micro(tmp_path, n_layer=4, d_model=192, n_head=4, save_interval=1, max_steps=400, warmup_steps=2,
                     eval_interval=400)
    argv = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    stale = []
    for _attempt in range(5):
        for old in tmp_path.glob("*"):
            if old.is_file():
                old.unlink()
        child = subprocess.Popen([sys.executable, "-m", "infmoe.cli", "train", *argv], stderr=subprocess.DEVNULL,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            writing = [p for p in tmp_path.glob(".checkpoint.safetensors.*.tmp") if _size(p)]
            if writing and (tmp_path / "checkpoint.safetensors").exists():
                child.kill()
                break
            time.sleep(0.0005)
        child.wait()
        stale = [p for p in tmp_path.glob(".checkpoint.safetensors.*.tmp") if _size(p)]
        if stale:
            break
    assert stale, "never caught the run in the middle of a checkpoint write"
    run(dict(settings, resume=True, stop_at=load_checkpoint(tmp_path / "checkpoint.safetensors").state["step"] + 1))
    assert not any(path.exists() for path in stale)


def _size(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed into place meanwhile
        return 0


def test_tensorboard_keeps_every_step_across_a_resume(tmp_path, micro):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(micro(tmp_path, stop_at=3, log_interval=1, tensorboard=True))
    run(micro(tmp_path, resume=True, log_interval=1, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([logged[s] for s in range(1, 9)])


def test_checkpoints_follow_the_umask(tmp_path, micro):
    previous = os.umask(0o027)
    try:
        result, _ = run(micro(tmp_path, max_steps=2, warmup_steps=1))
    finally:
        os.umask(previous)
    assert result.checkpoint.stat().st_mode & 0o777 == 0o640


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
    with pytest.raises(CheckpointError, match="--resume: seed differs from the checkpoint's run"):
        run(micro(tmp_path, resume=True, seed=1))
    with pytest.raises(CheckpointError, match="--resume: seq_len, seed differ from"):
        run(micro(tmp_path, resume=True, seed=1, seq_len=16))


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


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, micro, full_disk):
    settings = micro(full_disk.folder / "run", stop_at=4)
    first, _ = run(settings)
    before = first.checkpoint.read_bytes()
    full_disk.fill(free=16 * 1024)  # the metrics lines fit, the next checkpoint does not
    argv = [item for key, value in dict(settings, stop_at=8, resume=True).items() for item in (f"--{key}", str(value))]
    done = full_disk.run(["train", *argv])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "cannot write" in lines[0] and "the checkpoint of step 4 is kept" in lines[0] and "--resume" in lines[0]
    assert first.checkpoint.read_bytes() == before
    assert list(first.checkpoint.parent.glob(".*.tmp")) == []


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
                "routing/usage_entropy", "routing/union_fraction", "routing/sample_disagreement",
                "routing/sigma_over_mu"):
        assert key in train_rows[-1], key
    assert 0 < train_rows[-1]["routing/usage_entropy"] <= 1
    assert 0 < train_rows[-1]["routing/sample_disagreement"] < 1
    assert [r["step"] for r in rows if "val/loss" in r] == [4, 8]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


def test_learns_below_the_unigram_baseline(tmp_path, micro):
    # 120 steps, not 60: at 60 the validation loss was only 0.004 below the unigram baseline
    # (seed 0; seed 1 was 0.012 above it), so any other CPU's rounding could decide the test.
    # At 120 it is 0.12 to 0.20 below for seeds 0-2 at 1 and 2 threads.
    result, _ = run(micro(tmp_path, max_steps=120, eval_interval=120, save_interval=120, lr=1e-2, batch_size=8))
    assert result.val_loss < result.unigram_loss


def test_unknown_settings_are_rejected_before_training(tmp_path, micro):
    with pytest.raises(ConfigError, match="unknown option --lrate"):
        resolve(micro(tmp_path, lrate=1.0))
    with pytest.raises(ConfigError, match="warmup_steps"):
        resolve(micro(tmp_path, warmup_steps=8))
    with pytest.raises(ConfigError, match="seq_len=64"):
        resolve(micro(tmp_path, seq_len=64))


def test_resume_refuses_a_checkpoint_with_non_finite_weights(tmp_path, micro):
    """One an older version could have written: the weights NaN, written past our writer."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    first, _ = run(micro(tmp_path, stop_at=2))
    with safe_open(str(first.checkpoint), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: v * float("nan") if k.startswith("model.") else v for k, v in tensors.items()}
    save_file(tensors, str(first.checkpoint), metadata=metadata)
    with pytest.raises(CheckpointError, match="non-finite weights"):
        run(micro(tmp_path, resume=True))
