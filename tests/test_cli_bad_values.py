"""Issue 22: every bad value through the real command line gets one line and exit 2, and
outputs never overwrite what they should not. Each test runs the failure itself: a real
argv (as Linux hands it over), a real log cut mid-line, real pickles, real files on disk."""

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from infmoe.cli import eval_output_paths, main
from infmoe.layers.infinite_moe import MAX_SAMPLES
from infmoe.generation import generate
from infmoe.models import GPT, GPTConfig

TOO_BIG_SEED = 2**70  # 1180591620717411303424: overflows the int64 every generator takes
FAST = ["--tokens", "64", "--samples", "1", "--mode", "sample"]  # one quick row of eval


def argv(settings: dict) -> list[str]:
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro):
    """A run folder of a 3-step ∞-MoE training, σ logged at every step."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *argv(micro(out, max_steps=3, warmup_steps=1, eval_interval=3, save_interval=3,
                                      log_interval=1))]) == 0
    return out


def one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert all(needle in err for needle in needles), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- 4: outputs that must not overwrite what they should not ----------------------------------


def test_eval_out_is_a_prefix_whatever_dots_it_holds(run, tmp_path, cache_dir):
    for lr in ("0.003", "0.001"):  # "evals/lr0.003" once became evals/lr0.json, which lr0.001 overwrote
        assert main(["eval", str(run), *FAST, "--cache_dir", str(cache_dir), "--out", str(tmp_path / f"lr{lr}")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr0.001.json", "lr0.001.png", "lr0.003.json",
                                                          "lr0.003.png"]


@pytest.mark.parametrize("out,written", [
    ("evals/lr0.003", ("evals/lr0.003.json", "evals/lr0.003.png")),
    ("evals/x.json", ("evals/x.json", "evals/x.png")),  # the pair named by either of its files
    ("evals/x.png", ("evals/x.json", "evals/x.png")),
    ("evals/x.tar.gz", ("evals/x.tar.gz.json", "evals/x.tar.gz.png")),
    ("evals/", ("evals/eval.json", "evals/eval.png")),  # a folder: eval.json and eval.png inside
])
def test_eval_output_names(out, written):
    assert eval_output_paths(out, "unused") == tuple(map(Path, written))


def test_eval_of_an_export_writes_inside_it(run, tmp_path, corpus, cache_dir):
    pytest.importorskip("transformers")
    exports = [tmp_path / "a", tmp_path / "b"]  # two exports in one parent
    for folder in exports:
        assert main(["export", str(run), "--hf", str(folder)]) == 0
        assert main(["eval", str(folder), *FAST, "--data", str(corpus), "--cache_dir", str(cache_dir)]) == 0
    assert all((folder / "eval.json").is_file() and (folder / "eval.png").is_file() for folder in exports)
    assert not (tmp_path / "eval.json").exists()
    assert json.loads((exports[0] / "eval.json").read_text())["checkpoint"] == str(exports[0])


def test_eval_of_a_checkpoint_writes_beside_it(run, cache_dir):
    assert main(["eval", str(run / "checkpoint.safetensors"), *FAST, "--cache_dir", str(cache_dir)]) == 0
    assert (run / "eval.json").is_file() and (run / "eval.png").is_file()


def test_inspect_refuses_a_folder_that_is_not_its_own(run, tmp_path, cache_dir, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my own page")
    inspect = ["inspect", str(run), "--tokens", "64", "--cache_dir", str(cache_dir), "--out"]
    assert main([*inspect, str(mine)]) == 2
    one_error_line(capsys, f"{mine} is not empty and not the output of an earlier infmoe inspect")
    assert [p.name for p in mine.iterdir()] == ["index.html"] and (mine / "index.html").read_text() == "my own page"
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / ".summary.json.x1y2.tmp").write_text("")  # what a killed inspect leaves: not the user's
    assert main([*inspect, str(ours)]) == 0
    assert json.loads((ours / "summary.json").read_text())["written_by"] == "infmoe inspect"
    assert main([*inspect, str(ours)]) == 0  # an earlier inspect's output is ours to replace


# --- 10 (seeds of the commands that take --seed), 11 (batch and window sizes) --------------


@pytest.mark.parametrize("seed", [TOO_BIG_SEED, -1])
@pytest.mark.parametrize("command", [
    ["generate", "MODEL", "--prompt", "x"],
    ["eval", "MODEL"],
    ["inspect", "MODEL", "--out", "OUT"],
    ["zeroshot", "MODEL", "--task", "piqa", "--data", "missing.jsonl"],
    ["upcycle", "MODEL", "--out", "OUT"],
])
def test_a_seed_outside_int64_is_one_line(run, tmp_path, command, seed, capsys):
    command = [str(run) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert main([*command, "--seed", str(seed)]) == 2
    one_error_line(capsys, f"--seed={seed} is invalid: must be an integer in [0, 2**63 - 1]")


def test_the_largest_seed_generates(run, capsys):
    assert main(["generate", str(run), "--prompt", "x", "--max_new_tokens", "2", "--seed", str(2**63 - 1)]) == 0


@pytest.mark.parametrize("command", ["eval", "inspect"])
@pytest.mark.parametrize("flag,value", [("--batch_size", 0), ("--batch_size", -1), ("--seq_len", -3),
                                        ("--seq_len", 0), ("--seq_len", 33)])
def test_batch_and_window_sizes_are_one_line_naming_the_flag(run, tmp_path, cache_dir, command, flag, value,
                                                             capsys):
    out = ["--out", str(tmp_path / "out")] if command == "inspect" else []
    assert main([command, str(run), "--tokens", "64", "--cache_dir", str(cache_dir), *out, flag, str(value)]) == 2
    one_error_line(capsys, f"{flag}={value} is invalid")


# --- 12: override values that are not YAML ---------------------------------------------------


@pytest.mark.parametrize("value", ["[1,", "*x", "{a: 1", "!!int abc", "!!timestamp x"])
def test_an_override_that_is_not_yaml_is_one_line(value, capsys):
    assert main(["params", "tiny-infmoe", "--n_layer", value]) == 2
    one_error_line(capsys, f"--n_layer {value!r} is not a value YAML can read", "quote text")


def test_a_python_tag_in_an_override_runs_nothing(tmp_path, capsys):
    planted = tmp_path / "pwned"
    assert main(["params", "tiny-infmoe", "--n_layer", f'!!python/object/apply:os.system ["touch {planted}"]']) == 2
    one_error_line(capsys, "--n_layer", "could not determine a constructor")
    assert not planted.exists()


# --- 13: inspect --run of a log with nothing, a cut line, or foreign rows ---------------------


def inspect_run(run_dir, model, out, cache_dir) -> int:
    return main(["inspect", str(model), "--tokens", "64", "--cache_dir", str(cache_dir), "--out", str(out),
                 "--run", str(run_dir)])


def test_inspect_run_with_an_empty_log_leaves_out_the_curve(run, tmp_path, cache_dir, capsys):
    (tmp_path / "metrics.jsonl").write_text("")  # a run that has not logged yet
    assert inspect_run(tmp_path, run, tmp_path / "out", cache_dir) == 0
    assert "logs no σ yet" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["sigma_over_training"] == {}
    assert "σ over training" not in (tmp_path / "out" / "index.html").read_text()


def test_inspect_run_with_a_cut_last_line_plots_the_whole_lines(run, tmp_path, cache_dir, capsys):
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    steps = [row["step"] for row in map(json.loads, lines[:-1]) if "routing/sigma_mean" in row]
    (tmp_path / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    assert inspect_run(tmp_path, run, tmp_path / "out", cache_dir) == 0
    assert "dropped the partial last line" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["sigma_over_training"]["step"] == steps


def test_inspect_run_with_rows_without_step_is_one_line(run, tmp_path, cache_dir, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"train/loss": 5.0}\n')
    assert inspect_run(tmp_path, run, tmp_path / "out", cache_dir) == 2
    one_error_line(capsys, "line 1 has no integer 'step'")


# --- 14: prompt bytes, temperatures, sample counts --------------------------------------------


def test_a_prompt_that_is_not_utf8_is_one_line(run, capsys):
    prompt = os.fsdecode(b"caf\xe9")  # Latin-1 bytes, as Linux puts them in sys.argv: "caf\udce9"
    assert main(["generate", str(run), "--prompt", prompt, "--max_new_tokens", "2"]) == 2
    one_error_line(capsys, "--prompt is not UTF-8 text (character 3 is an undecodable byte)")


@pytest.mark.parametrize("flag,value,needle", [
    ("--temperature", "nan", "temperature=nan is invalid: must be 0 (greedy) or lie in [0.001, 100]"),
    ("--temperature", "inf", "temperature=inf is invalid"),
    ("--temperature", "1e-45", "temperature=1e-45 is invalid"),
    ("--temperature", "-1", "temperature=-1.0 is invalid"),
    ("--top_p", "nan", "top_p=nan is invalid: must lie in (0, 1]"),
])
def test_sampling_values_outside_their_range_are_one_line(run, flag, value, needle, capsys):
    assert main(["generate", str(run), "--prompt", "x", "--max_new_tokens", "2", flag, value]) == 2
    one_error_line(capsys, needle)


def test_the_bounds_of_temperature_generate(run, capsys):
    for temperature in ("0.001", "100"):
        assert main(["generate", str(run), "--prompt", "x", "--max_new_tokens", "4", "--temperature", temperature,
                     "--seed", "1"]) == 0


@pytest.mark.parametrize("command", [
    ["eval", "MODEL", "--samples", "1000000000"],
    ["eval", "MODEL", "--samples", "auto", "--max_samples", "1000000000"],
    ["generate", "MODEL", "--prompt", "x", "--samples", "1000000000"],
    ["generate", "MODEL", "--prompt", "x", "--samples", "auto", "--max_samples", str(MAX_SAMPLES + 1)],
    ["zeroshot", "MODEL", "--task", "piqa", "--data", "missing.jsonl", "--samples", "1000000000"],
])
def test_a_sample_count_beyond_the_bound_is_one_line(run, command, capsys):
    assert main([str(run) if a == "MODEL" else a for a in command]) == 2
    one_error_line(capsys, f"K must be >= 1 and at most {MAX_SAMPLES}")


# --- 15: a context of one position ------------------------------------------------------------


def test_a_model_with_one_position_generates():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, n_ctx=1, n_layer=1, d_model=16, n_head=2, init_std=0.5)).eval()
    tokens = list(generate(model, [3, 1, 4, 1, 5], max_new_tokens=5, temperature=0))
    with torch.no_grad():  # with one position, each token follows from the one before it alone
        expected = [int(model(torch.tensor([[previous]])).logits[0, -1].argmax())
                    for previous in [5] + tokens[:-1]]
    assert tokens == expected


# --- 18: pickled GPT-2 weights that are not a state dict --------------------------------------


def gpt2_folder(folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(model_type="gpt2", n_layer=1, n_embd=32, n_head=2,
                                                        vocab_size=300, n_positions=32)))
    return folder


@pytest.mark.parametrize("state,needle", [
    ([torch.zeros(2)], "holds a list, not a state dict of named tensors"),
    ({1: torch.zeros(2)}, "holds the entry 1: Tensor, not a state dict of named tensors"),
    ({"wte.weight": 3}, "holds the entry 'wte.weight': int, not a state dict"),
])
def test_a_pickle_that_is_not_a_state_dict_is_one_line(tmp_path, state, needle, capsys):
    folder = gpt2_folder(tmp_path / "gpt2")
    torch.save(state, folder / "pytorch_model.bin")
    assert main(["generate", str(folder), "--prompt", "x"]) == 2
    one_error_line(capsys, str(folder / "pytorch_model.bin"), needle)


class _Planted:
    """Unpickled by a plain pickle.load, this prints "pwned": code a weights file may not run."""

    def __reduce__(self):
        return print, ("pwned",)


def test_a_malicious_pickle_is_refused_in_exactly_one_line(tmp_path, capsys):
    folder = gpt2_folder(tmp_path / "gpt2")
    with open(folder / "pytorch_model.bin", "wb") as f:  # protocol 4: torch's reader warns of it in 2 lines
        pickle.dump({"wte.weight": _Planted()}, f, protocol=4)
    # Warnings reach stderr through the warnings machinery, which pytest diverts: record them instead.
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert main(["generate", str(folder), "--prompt", "x"]) == 2
    assert [str(w.message) for w in shown] == []
    printed = capsys.readouterr()
    assert "pwned" not in printed.out + printed.err
    assert printed.err.count("\n") == 1 and "pytorch_model.bin is not readable (UnpicklingError)" in printed.err


# --- 19: bench --render of what is not a saved result -----------------------------------------


@pytest.mark.parametrize("content,needle", [
    (None, "cannot read"),
    (b"timings: fast\n", "is not JSON (JSONDecodeError)"),
    (b"\xff\xfe", "is not JSON (UnicodeDecodeError)"),
    (b"[]", "holds a JSON list, not a bench result"),
    (b'{"a": 1}', "it has no 'machine' where a bench result has one"),
    (b'{"machine": {}, "repeats": 1, "layers": [], "models": []}', "it has no 'torch'"),
])
def test_bench_render_of_a_foreign_file_is_one_line(tmp_path, content, needle, capsys):
    path = tmp_path / "result.json"
    if content is not None:
        path.write_bytes(content)
    assert main(["bench", "--render", str(path)]) == 2
    one_error_line(capsys, str(path), needle)
