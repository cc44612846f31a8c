"""End to end through the command line: train → eval → generate, and their bad input."""

import json

import pytest
from safetensors.torch import save_file

import torch
from infmoe.cli import main


def argv(settings: dict) -> list[str]:
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, micro):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *argv(micro(out, max_steps=20, lr=1e-2))]) == 0
    return out / "checkpoint.safetensors"


def one_error_line(capsys, needle):
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_train_writes_a_checkpoint_that_learned(trained):
    from infmoe.checkpoint import load_checkpoint

    import math

    checkpoint = load_checkpoint(trained)
    chance = math.log(checkpoint.config.vocab_size)  # the loss of the untrained model, about
    assert checkpoint.state["step"] == 20 and checkpoint.state["val_loss"] < chance - 0.3


def test_eval_prints_table_and_writes_json_and_png(trained, tmp_path, cache_dir, capsys):
    out = tmp_path / "k-sweep"
    assert main(["eval", str(trained), "--samples", "1,2,4", "--tokens", "1024", "--cache_dir", str(cache_dir),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "K=1" in printed.out and "K=4" in printed.out and "mean" in printed.out
    assert "evaluate" in printed.err  # the progress bar
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in report["rows"]] == ["K=1", "K=2", "K=4", "mean"]
    assert all(r["ms_per_token"] > 0 and r["loss"] > 0 and 0 < r["accuracy"] < 1 for r in report["rows"])
    assert "union of blocks" in printed.out
    union = {r["label"]: r["union_fraction"] for r in report["rows"]}
    assert union["K=1"] == union["mean"] == pytest.approx(0.5)  # one mask keeps N = 50% of the blocks
    assert union["K=1"] < union["K=2"] <= union["K=4"] <= 1
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # fixed seeds: a re-run gives the same losses
    assert main(["eval", str(trained), "--samples", "1,2,4", "--tokens", "1024", "--cache_dir", str(cache_dir),
                 "--out", str(out)]) == 0
    again = json.loads(out.with_suffix(".json").read_text())
    assert [r["loss"] for r in again["rows"]] == [r["loss"] for r in report["rows"]]


def test_generate_streams_text(trained, capsys):
    assert main(["generate", str(trained), "--prompt", "The", "--max-new-tokens", "12", "--seed", "1",
                 "--samples", "2"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("The") and len(first) > len("The\n")
    assert main(["generate", str(trained), "--prompt", "The", "--max-new-tokens", "12", "--seed", "1",
                 "--samples", "2"]) == 0
    assert capsys.readouterr().out == first  # seeded: the same text


def test_samples_auto_lets_each_token_choose_its_k(trained, tmp_path, cache_dir, capsys):
    out = tmp_path / "auto"
    assert main(["eval", str(trained), "--samples", "1,4,auto", "--max_samples", "4", "--tokens", "1024",
                 "--cache_dir", str(cache_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "auto (K<=4)" in printed and "mean K" in printed
    rows = {r["label"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    auto = rows["auto (K<=4)"]
    assert auto["mode"] == "adaptive" and 2 <= auto["mean_samples"] <= 4  # every token checks a second sample
    assert rows["K=1"]["union_fraction"] <= auto["union_fraction"] <= rows["K=4"]["union_fraction"]
    assert rows["K=1"]["mean_samples"] is None
    assert main(["generate", str(trained), "--prompt", "The", "--max-new-tokens", "8", "--seed", "1",
                 "--samples", "auto"]) == 0
    assert capsys.readouterr().out.startswith("The")
    data = tmp_path / "piqa.jsonl"
    data.write_text("".join(json.dumps({"goal": f"goal {i}", "sol1": "one way", "sol2": "another", "label": i % 2})
                            + "\n" for i in range(4)))
    assert main(["zeroshot", str(trained), "--task", "piqa", "--data", str(data), "--samples", "auto",
                 "--max_samples", "3"]) == 0
    capsys.readouterr()
    for bad, needle in ((["--samples", "auto", "--mode", "mean"], "drop --mode"), (["--samples", "1,2"], "give one K"),
                        (["--samples", "auto", "--max_samples", "0"], "--max_samples")):
        assert main(["generate", str(trained), "--prompt", "The", *bad]) == 2
        one_error_line(capsys, needle)
    assert main(["eval", str(trained), "--samples", "1,auto", "--max_samples", "0"]) == 2
    one_error_line(capsys, "--max_samples")


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"\x00\x01\x02binary\x00" * 100, "binary"),
    (b"caf\xe9 au lait\n" * 200, "UTF-8"),
], ids=["empty", "binary", "latin-1"])
def test_bad_corpus_is_one_line_exit_2(tmp_path, micro, capsys, content, needle):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(content)
    assert main(["train", *argv(micro(tmp_path / "run", data=corpus))]) == 2
    one_error_line(capsys, needle)


def test_missing_corpus_and_offline_dataset(tmp_path, micro, capsys):
    assert main(["train", *argv(micro(tmp_path / "run", data=tmp_path / "nope.txt"))]) == 2
    one_error_line(capsys, "nope.txt")
    assert main(["train", *argv(micro(tmp_path / "run", data="no-such-dataset-xyz"))]) == 2
    one_error_line(capsys, "no-such-dataset-xyz")


def test_truncated_and_foreign_checkpoints(trained, tmp_path, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    assert main(["eval", str(truncated)]) == 2
    one_error_line(capsys, "truncated")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    assert main(["generate", str(foreign), "--prompt", "x"]) == 2
    one_error_line(capsys, "not an infmoe checkpoint")
    assert main(["eval", str(tmp_path / "missing.safetensors")]) == 2
    one_error_line(capsys, "does not exist")


def test_vocabulary_mismatch_between_checkpoint_and_data(trained, tmp_path, cache_dir, capsys):
    from infmoe.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(trained)
    model = ckpt.build_model()
    bigger = type(model)(model.config.replace(vocab_size=model.config.vocab_size + 10))
    path = tmp_path / "mismatch.safetensors"
    save_checkpoint(path, bigger, state=ckpt.state, tokenizer_files=ckpt.tokenizer_files)
    assert main(["eval", str(path), "--cache_dir", str(cache_dir)]) == 2
    one_error_line(capsys, "vocab")


def test_unknown_key_and_bad_values(tmp_path, micro, capsys):
    assert main(["train", "--no_such_key", "3"]) == 2
    one_error_line(capsys, "--no_such_key")
    assert main(["train", *argv(micro(tmp_path, units_per_block=7))]) == 2
    one_error_line(capsys, "units_per_block=7")
    assert main(["eval", "x.safetensors", "--bogus"]) == 2
    one_error_line(capsys, "unknown option --bogus")
    assert main(["generate", "x.safetensors", "--prompt", "a", "--top-p", "2"]) == 2
    one_error_line(capsys, "top_p=2.0")


def test_export_folder_works_wherever_a_checkpoint_does(trained, tmp_path, corpus, cache_dir, capsys):
    folder = tmp_path / "hf"
    assert main(["export", str(trained), "--hf", str(folder)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "modeling_infmoe.py"} <= {p.name for p in folder.iterdir()}
    capsys.readouterr()
    assert main(["eval", str(folder), "--tokens", "512", "--cache_dir", str(cache_dir)]) == 2
    one_error_line(capsys, "pass --data")
    assert main(["eval", str(folder), "--data", str(corpus), "--tokens", "512", "--cache_dir", str(cache_dir),
                 "--samples", "1", "--out", str(tmp_path / "ev")]) == 0
    from_folder = json.loads((tmp_path / "ev.json").read_text())["rows"]
    assert main(["eval", str(trained), "--tokens", "512", "--cache_dir", str(cache_dir), "--samples", "1",
                 "--out", str(tmp_path / "ev")]) == 0
    assert [r["loss"] for r in json.loads((tmp_path / "ev.json").read_text())["rows"]] == [r["loss"] for r in from_folder]
    texts = []
    for model in (trained, folder):
        capsys.readouterr()
        assert main(["generate", str(model), "--prompt", "The", "--max-new-tokens", "8", "--seed", "3"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("The")


def test_zeroshot_command(trained, tmp_path, capsys):
    data = tmp_path / "piqa.jsonl"
    records = [{"goal": f"goal {i}", "sol1": "first way", "sol2": "second way", "label": i % 2} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["zeroshot", str(trained), "--task", "piqa", "--data", str(data), "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n"] == 6 and 0 <= result["acc"] <= 1 and "acc_norm" in result
    assert "acc_norm" in capsys.readouterr().out
    assert main(["zeroshot", str(trained), "--task", "squad", "--data", str(data)]) == 2
    one_error_line(capsys, "squad")


def test_upcycle_a_dense_model_and_continue_training(tmp_path, micro, capsys):
    assert main(["train", *argv(micro(tmp_path / "dense", config="tiny-dense", max_steps=4))]) == 0
    upcycled = tmp_path / "upcycled.safetensors"
    assert main(["upcycle", str(tmp_path / "dense" / "checkpoint.safetensors"), "--out", str(upcycled),
                 "--d_z", "8", "--units_per_block", "4"]) == 0
    settings = {k: v for k, v in micro(tmp_path / "more", max_steps=4).items() if k not in ("config", "n_layer",
                                                                                          "d_model", "n_head", "n_ctx")}
    assert main(["train", *argv(settings), "--init_from", str(upcycled)]) == 0
    from infmoe.checkpoint import load_checkpoint

    config = load_checkpoint(tmp_path / "more" / "checkpoint.safetensors").config
    assert config.ffn == "infmoe" and config.ffn_hidden == 2 * 4 * config.d_model
    assert config.ffn_options["d_z"] == 8 and config.ffn_options["units_per_block"] == 4
    capsys.readouterr()
    assert main(["train", *argv(settings), "--init_from", str(upcycled), "--n_layer", "3"]) == 2
    one_error_line(capsys, "--init_from takes the model config")


@pytest.mark.parametrize("signal_name,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_train_exits_with_the_signal_status(tmp_path, micro, signal_name, status):
    """A real signal to a real run, once its first step is logged: a checkpoint and the status."""
    import signal
    import subprocess
    import sys
    import time

    settings = micro(tmp_path, max_steps=400, warmup_steps=2, log_interval=1, eval_interval=400, save_interval=400)
    child = subprocess.Popen([sys.executable, "-m", "infmoe.cli", "train", *argv(settings)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.05)
    child.send_signal(getattr(signal, signal_name))
    _, err = child.communicate(timeout=120)
    assert child.returncode == status, err
    assert "continue with: infmoe train" in err and "Traceback" not in err


@pytest.mark.parametrize("delay", [0.2, 1.5])
def test_ctrl_c_during_start_up_is_one_line_and_130(tmp_path, micro, delay):
    """SIGINT while the command still imports torch (0.2 s) or prepares the run (1.5 s)."""
    import shutil
    import signal
    import subprocess
    import time

    child = subprocess.Popen([shutil.which("infmoe"), "train", *argv(micro(tmp_path))], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(("infmoe train: interrupted",
                                                                                "stopped by SIGINT"))


def write_with_a_nan(checkpoint, out):
    """A copy of `checkpoint` with one weight NaN, written the way an older infmoe (or any
    other tool) could: straight through safetensors, past our writer's refusal."""
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.startswith("model.") and k.endswith("attn.c_proj.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_non_finite_weights_are_refused_by_every_command(trained, tmp_path, capsys):
    bad = write_with_a_nan(trained, tmp_path / "diverged.safetensors")
    for command in (["eval", str(bad), "--out", str(tmp_path / "ev")], ["generate", str(bad), "--prompt", "x"],
                    ["export", str(bad), "--hf", str(tmp_path / "hf")], ["zeroshot", str(bad), "--task", "piqa",
                                                                           "--data", str(tmp_path / "none.jsonl")]):
        assert main(command) == 2, command
        one_error_line(capsys, "non-finite weights")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "ev.json").exists()


def test_every_command_takes_a_run_folder(trained, tmp_path, cache_dir, micro, capsys):
    run_dir = trained.parent
    assert main(["eval", str(run_dir), "--samples", "1", "--tokens", "512", "--cache_dir", str(cache_dir),
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["rows"][0]["loss"] > 0
    assert main(["generate", str(run_dir), "--prompt", "The", "--max-new-tokens", "4", "--seed", "1"]) == 0
    assert main(["export", str(run_dir), "--hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    data = tmp_path / "piqa.jsonl"
    data.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0}) + "\n")
    assert main(["zeroshot", str(run_dir), "--task", "piqa", "--data", str(data)]) == 0
    settings = {k: v for k, v in micro(tmp_path / "more", max_steps=2, warmup_steps=1).items()
                if k not in ("config", "n_layer", "d_model", "n_head", "n_ctx")}
    assert main(["train", *argv(settings), "--init_from", str(run_dir)]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["eval", str(empty)]) == 2
    one_error_line(capsys, "neither checkpoint.safetensors (a run folder of infmoe train) nor config.json")


def test_outputs_are_checked_before_any_compute(trained, tmp_path, monkeypatch, capsys):
    import infmoe.cli as cli
    import infmoe.evaluation.zeroshot as zeroshot

    def computed(*args, **kwargs):
        raise AssertionError("computed before the output was checked")

    monkeypatch.setattr(cli, "evaluate_model", computed)
    monkeypatch.setattr(zeroshot, "evaluate_task", computed)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["eval", str(trained), "--out", str(blocker / "ev")]) == 2
    one_error_line(capsys, "cannot write to")
    data = tmp_path / "piqa.jsonl"
    data.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0}) + "\n")
    assert main(["zeroshot", str(trained), "--task", "piqa", "--data", str(data), "--out", str(blocker / "r.json")]) == 2
    one_error_line(capsys, "cannot write to")


def test_eval_rejects_zero_tokens(trained, capsys):
    assert main(["eval", str(trained), "--tokens", "0"]) == 2
    one_error_line(capsys, "--tokens=0")


def test_exports_follow_the_umask(trained, tmp_path):
    import os

    previous = os.umask(0o027)
    try:
        assert main(["export", str(trained), "--hf", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "hf").iterdir()}
    assert set(modes.values()) == {"0o640"}, modes


def test_generate_threads(trained, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        for flags, expected in (([], 1), (["--threads", "2"], 2)):
            assert main(["generate", str(trained), "--prompt", "The", "--max-new-tokens", "2", *flags]) == 0
            assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    assert main(["generate", str(trained), "--prompt", "The", "--threads", "0"]) == 2
    one_error_line(capsys, "--threads=0")
