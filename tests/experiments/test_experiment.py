import json
import math

import numpy as np
import pytest
import yaml

from infmoe.cli import main
from infmoe.errors import ConfigError
from infmoe.experiments import load_spec
from infmoe.data.tokens import bigram_loss
from infmoe.experiments.stats import spikes, training_minutes
from infmoe.training.metrics import read_curve


def write_spec(tmp_path, corpus, cache_dir, **extra) -> str:
    spec = {
        "data": str(corpus), "out_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"),
        "seeds": [0],
        "train": dict(cache_dir=str(cache_dir), tokenizer="bpe", tokenizer_vocab=512, batch_size=4, max_steps=6,
                      warmup_steps=1, eval_interval=3, eval_tokens=1024, log_interval=1, save_interval=3,
                      tensorboard=False, threads=1, n_layer=1, d_model=32, n_head=2, n_ctx=32),
        "eval": {"tokens": 1024, "samples": [1, 2]},
        "runs": {"inf": {"config": "tiny-infmoe", "units_per_block": 16}, "dense": {"config": "tiny-dense"}},
        "report": [{"id": "A", "runs": ["inf", "dense"]}, {"id": "C", "kind": "sweep", "runs": ["inf"]},
                   {"id": "D", "kind": "curves", "runs": ["inf", "dense"]}],
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_micro_grid_runs_reports_and_skips_finished_runs(tmp_path, corpus, cache_dir, capsys):
    spec = write_spec(tmp_path, corpus, cache_dir)
    report = tmp_path / "RESULTS.md"
    report.write_text("# Results\n\nprose that must survive\n<!-- generated:A -->\nold\n<!-- end:A -->\n")
    assert main(["experiment", spec, "--jobs", "2", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "0 of 2 runs already done" in out and "inf-seed0" in out and "dense-seed0" in out
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")}
    assert set(records) == {"inf-seed0", "dense-seed0"}, out
    inf = records["inf-seed0"]
    assert inf["steps"] == 6 and [r["label"] for r in inf["sweep"]] == ["K=1", "K=2", "mean"]
    assert inf["headline"]["label"] == "K=1" and len(inf["curve"]["train_loss"]) == 6
    assert inf["baselines"]["bigram"] > 0 and inf["params"]["active"] < inf["params"]["total"]
    assert len(inf["curve"]["sigma_mean"]) == 6 and "sigma_mean" not in records["dense-seed0"]["curve"]
    text = report.read_text()
    assert "prose that must survive" in text and "old" not in text
    assert "| inf |" in text and "| bigram baseline |" in text and "results-C.png" in text
    assert (tmp_path / "results-C.png").exists() and (tmp_path / "results-D.png").exists()

    assert main(["experiment", spec, "--report", str(report)]) == 0  # nothing left to run
    assert "2 of 2 runs already done (0 curves re-read from their logs); 0 to run now" in capsys.readouterr().out


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path, corpus, cache_dir, micro, capsys):
    spec_path = write_spec(tmp_path, corpus, cache_dir)
    spec = load_spec(spec_path)
    job = next(j for j in spec.jobs if j.run == "dense")
    # a run stopped at step 3, as a killed grid leaves it
    assert main(["train", *[x for k, v in {**job.settings, "stop_at": 3, "progress": False}.items()
                            for x in (f"--{k}", str(v))]]) == 0
    assert main(["experiment", spec_path, "--jobs", "1", "--only", "dense-seed0"]) == 0
    record = json.loads(spec.result_path(job).read_text())
    assert record["steps"] == 6 and record["curve"]["step"] == [1, 2, 3, 4, 5, 6]
    assert "0 of 2 runs already done (0 curves re-read from their logs); 1 to run now" in capsys.readouterr().out
    assert not (tmp_path / "results" / "inf-seed0.json").exists()  # --only left it alone
    from infmoe.experiments.runner import select_jobs

    (tmp_path / "two").mkdir()
    two_seeds = load_spec(write_spec(tmp_path / "two", corpus, cache_dir, seeds=[0, 1]))
    assert [j.name for j in select_jobs(two_seeds, ["dense-seed1", "inf"])] == ["dense-seed1", "inf-seed0", "inf-seed1"]
    assert main(["experiment", spec_path, "--only", "dense,nope"]) == 2
    assert "no run or job named nope in the spec; its runs are dense, inf" in capsys.readouterr().err


def test_a_run_is_evaluated_where_and_as_it_trained(tmp_path, corpus, cache_dir):
    """The result records the device and precision of the evaluation: those of training
    (here the CPU in bf16 autocast), not a fixed CPU in fp32."""
    spec = load_spec(write_spec(tmp_path, corpus, cache_dir, runs={"inf": {"config": "tiny-infmoe", "units_per_block": 16,
                                                                           "precision": "bf16", "device": "cpu"}},
                                report=[]))
    (job,) = spec.jobs
    from infmoe.experiments.job import run_job

    run_job(job, 512, [1], str(spec.result_path(job)))
    record = json.loads(spec.result_path(job).read_text())
    assert record["device"] == "cpu" and record["precision"] == "bf16"
    from infmoe.checkpoint import load_checkpoint
    from infmoe.evaluation import evaluate_model

    checkpoint = load_checkpoint(tmp_path / "runs" / "inf-seed0" / "checkpoint.safetensors")
    fp32 = evaluate_model(checkpoint.build_model(), checkpoint.tokenizer(), str(corpus), samples=[1], max_tokens=512,
                          batch_size=16, cache_dir=str(cache_dir))
    assert record["headline"]["loss"] != fp32.rows[0].loss  # the recorded loss came from the bf16 evaluation


def test_spec_errors_are_caught_before_any_run(tmp_path, corpus, cache_dir):
    bad = write_spec(tmp_path, corpus, cache_dir, runs={"x": {"config": "tiny-dense", "lrate": 1}})
    with pytest.raises(ConfigError, match="run 'x'.*--lrate"):
        load_spec(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_bigram_loss_matches_a_hand_computation():
    train = np.array([0, 1, 0, 1, 0, 2])
    valid = np.array([0, 1, 2])
    # c(0,1) = 2, c(0) = 3, c(1,2) = 0, c(1) = 2; V = 3, alpha = 0.1
    expected = -(math.log((2 + 0.1) / (3 + 0.3)) + math.log((0 + 0.1) / (2 + 0.3))) / 2
    assert bigram_loss(train, valid, 3) == pytest.approx(expected)


def test_a_resumed_log_counts_each_step_once(tmp_path):
    rows = [{"step": 10, "train/loss": 5.0, "train/tokens_per_s": 100.0},
            {"step": 20, "train/loss": 4.0, "train/tokens_per_s": 50.0},  # lost: the run died after it
            {"step": 10, "val/loss": 4.5},
            {"step": 20, "train/loss": 3.9, "train/tokens_per_s": 200.0, "routing/sigma_mean": 0.5}]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = read_curve(log)
    assert curve["step"] == [10, 20] and curve["train_loss"] == [5.0, 3.9] and curve["val_loss"] == [4.5]
    assert curve["sigma_mean"] == [0.5]
    # 10 steps of 100 tokens at 100 tokens/s, then 10 at 200 tokens/s: 15 s
    assert training_minutes({"curve": curve, "tokens_seen": 2000, "steps": 20}) == pytest.approx(15 / 60)


def test_compare_section_by_hand():
    from infmoe.experiments.report import compare_section

    def records(*losses):
        return [{"headline": {"loss": x}} for x in losses]

    results = {"ours": records(2.0, 2.2), "close": records(2.1, 2.3), "far": records(3.0, 3.2), "one": records(2.5)}
    lines = compare_section(["ours", "close", "far", "one", "missing"], results).splitlines()
    # std 0.1414 on each side: t = Δ / sqrt(2 * 0.02 / 2) = Δ / 0.1414
    assert "| close | 2 vs 2 | 2.100 ± 0.141 | 2.200 ± 0.141 | +0.100 | 1.105 | +0.7 | no |" in lines
    assert "| far | 2 vs 2 | 2.100 ± 0.141 | 3.100 ± 0.141 | +1.000 | 2.718 | +7.1 | yes |" in lines
    assert "| one | 2 vs 1 | 2.100 ± 0.141 | 2.500 | +0.400 | 1.492 | - | yes |" in lines
    assert "| missing | (no finished runs) | | | | | | |" in lines


def test_cost_section_sums_training_time_over_seed_runs():
    from infmoe.experiments.report import cost_section

    def record(seconds_per_step):  # 10 logged steps of 100 tokens each
        rate = 100 / seconds_per_step
        return {"tokens_seen": 1000, "steps": 10, "curve": {"step": list(range(1, 11)), "tokens_per_s": [rate] * 10}}

    results = {"a": [record(36.0), record(72.0)], "b": [record(180.0)], "other": [record(1.0)]}
    # 10 steps at 36, 72 and 180 s: 6 + 12 + 30 min = 0.8 h, the longest 30 min
    assert cost_section(["a", "b"], results).splitlines()[-1] == "| 3 | 0.8 h | 30.0 min | 0.00M |"
    assert cost_section(["missing"], results) == "(no finished runs)"


def test_spikes_counts_jumps_above_the_recent_median():
    smooth = [5 - 0.01 * i for i in range(50)]
    assert spikes(smooth) == 0
    bumped = list(smooth)
    bumped[20] += 0.5
    bumped[40] += 0.3
    assert spikes(bumped) == 2


def test_the_shipped_specs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "experiments"
    laptop = load_spec(root / "laptop.yaml")
    assert len(laptop.jobs) >= 40 and {s["id"] for s in laptop.report} >= set("ABCDE")
    assert {j.run for j in laptop.jobs} >= {"infmoe", "dense-active", "dense-total", "moe-top4of8", "switch-top1of2"}
    assert len(load_spec(root / "gpu-openwebtext.yaml").jobs) == 4


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path, corpus, cache_dir, capsys):
    """A job that fails only once it runs (a zero-shot file that is there but not JSON) does
    not stop the others; the grid then lists it last and exits 1, so a script can tell."""
    task = tmp_path / "piqa.jsonl"
    task.write_text("not json\n")
    spec = write_spec(tmp_path, corpus, cache_dir, eval={"tokens": 1024, "samples": [1], "zeroshot": {"piqa": str(task)}},
                      runs={"broken": {"config": "tiny-dense", "zeroshot": True}, "fine": {"config": "tiny-dense"}})
    assert main(["experiment", spec, "--jobs", "2"]) == 1
    out, err = capsys.readouterr()
    assert "broken-seed0: FAILED: DataError" in out and "fine-seed0: val loss" in out
    assert err.splitlines()[-2:] == ["infmoe experiment: 1 job(s) failed; fix the cause and run the same command to "
                                     "retry them:", f"  broken-seed0: FAILED: DataError: {task}:1: not a JSON object "
                                     "(Expecting value); a piqa record is {goal, sol1, sol2, label}"]
    assert [p.stem for p in (tmp_path / "results").glob("*.json")] == ["fine-seed0"]


def test_kill_stops_the_workers_too_and_leaves_a_checkpoint(tmp_path, corpus, cache_dir):
    """A real SIGTERM to a grid of three jobs, one at a time, while the first trains: it
    checkpoints, no worker outlives the grid, and no queued job starts (issue 22 item 8)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from infmoe.checkpoint import load_checkpoint

    long_run = dict(batch_size=4, max_steps=100_000, warmup_steps=1, eval_interval=100_000, eval_tokens=1024,
                    log_interval=1, save_interval=100_000, tensorboard=False, threads=1, n_layer=1, d_model=32,
                    n_head=2, n_ctx=32, cache_dir=str(cache_dir), tokenizer="bpe", tokenizer_vocab=512)
    runs = {name: {"config": "tiny-dense"} for name in ("first", "second", "third")}
    spec = write_spec(tmp_path, corpus, cache_dir, train=long_run, runs=runs, report=[])
    log = tmp_path / "runs" / "first-seed0" / "metrics.jsonl"
    grid = subprocess.Popen([sys.executable, "-m", "infmoe.cli", "experiment", spec, "--jobs", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (log.exists() and log.stat().st_size > 0) and time.monotonic() < deadline:
            assert grid.poll() is None, grid.communicate()[0]
            time.sleep(0.2)
        grid.send_signal(signal.SIGTERM)  # the parent only, as `kill PID` does
        out = grid.communicate(timeout=60)[0]  # the queued jobs would train for hours
        assert grid.returncode == 143, out
        assert "interrupted by SIGTERM" in out and "2 queued not started; run the same command to continue" in out
        for _ in range(100):  # no worker outlives the grid
            try:
                os.killpg(grid.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("a worker of the killed grid is still running")
        assert 0 < load_checkpoint(log.parent / "checkpoint.safetensors").state["step"] < 100_000
        assert [p.name for p in (tmp_path / "runs").iterdir()] == ["first-seed0"]
    finally:
        if grid.poll() is None:
            os.killpg(grid.pid, signal.SIGKILL)


def test_adaptive_k_and_zeroshot_per_k_are_recorded_reported_and_reevaluated(tmp_path, corpus, cache_dir, capsys):
    words = corpus.read_text().split()[:600]
    task = tmp_path / "piqa.jsonl"
    task.write_text("".join(json.dumps({"goal": " ".join(words[i:i + 6]), "sol1": " ".join(words[i + 6:i + 9]),
                                        "sol2": " ".join(words[i + 9:i + 12]), "label": i % 2}) + "\n"
                            for i in range(0, 480, 12)))
    evaluation = {"tokens": 1024, "samples": [1, 2], "adaptive": 4, "zeroshot_samples": [1, 2],
                  "zeroshot": {"piqa": str(task)}}
    runs = {"inf": {"config": "tiny-infmoe", "units_per_block": 16, "sigma_min": 0.5, "zeroshot": True},
            "dense": {"config": "tiny-dense", "zeroshot": True}}
    report = [{"id": "Z", "kind": "zeroshot-sweep", "runs": ["inf", "dense"]}, {"id": "C", "kind": "sweep", "runs": ["inf"]}]
    spec = write_spec(tmp_path, corpus, cache_dir, eval=evaluation, runs=runs, report=report)
    markdown = tmp_path / "RESULTS.md"
    assert main(["experiment", spec, "--report", str(markdown)]) == 0
    results = tmp_path / "results"
    inf, dense = (json.loads((results / f"{name}-seed0.json").read_text()) for name in ("inf", "dense"))
    auto = inf["sweep"][-1]
    assert auto["label"] == "auto (K<=4)" and auto["mode"] == "adaptive" and 2 <= auto["mean_samples"] <= 4
    assert set(inf["zeroshot_sweep"]) == {"1", "2"} and inf["zeroshot_sweep"]["1"] == inf["zeroshot"]
    assert inf["zeroshot_sweep"]["2"]["piqa"]["n"] == inf["zeroshot"]["piqa"]["n"] == 40
    assert "zeroshot_sweep" not in dense and "zeroshot" in dense  # no K to turn
    text = markdown.read_text()
    assert "| run | task | K=1 | K=2 | K=2 − K=1 (paired z) |" in text and "| inf | piqa (n=40) |" in text
    assert "| inf | auto (K<=4) |" in text and "| dense |" not in text.split("<!-- generated:C -->")[0]

    # the eval settings change: --reevaluate evaluates the named finished run again, from its checkpoint
    evaluation["adaptive"] = 2
    spec = write_spec(tmp_path, corpus, cache_dir, eval=evaluation, runs=runs, report=report)
    dense_before = (results / "dense-seed0.json").read_text()
    capsys.readouterr()
    assert main(["experiment", spec, "--reevaluate", "--only", "inf"]) == 0
    assert "1 to evaluate again now" in capsys.readouterr().out
    again = json.loads((results / "inf-seed0.json").read_text())
    assert again["sweep"][-1]["label"] == "auto (K<=2)" and again["steps"] == inf["steps"]
    assert [r["loss"] for r in again["sweep"][:3]] == [r["loss"] for r in inf["sweep"][:3]]  # same draws
    assert (results / "dense-seed0.json").read_text() == dense_before
    (tmp_path / "runs" / "dense-seed0" / "checkpoint.safetensors").unlink()
    assert main(["experiment", spec, "--reevaluate", "--only", "dense"]) == 0
    assert "cannot re-evaluate dense-seed0" in capsys.readouterr().out
    assert main(["experiment", spec, "--reevaluate"]) == 2
    assert "--reevaluate needs --only" in capsys.readouterr().err


def test_zeroshot_sweep_section_pairs_items_by_hand():
    from infmoe.experiments.report import zeroshot_sweep_section

    def scored(correct):
        return {"acc": sum(correct) / len(correct), "acc_stderr": 0.1, "n": len(correct), "correct": correct}

    record = {"zeroshot_sweep": {"1": {"piqa": scored([0, 1, 1, 1, 0])}, "16": {"piqa": scored([1, 1, 1, 0, 1])}}}
    lines = zeroshot_sweep_section(["inf"], {"inf": [record]}).splitlines()
    # differences 1, 0, 0, -1, 1: mean 0.2, sample variance 0.7, z = 0.2 / sqrt(0.7 / 5) = 0.53
    assert lines[0] == "| run | task | K=1 | K=16 | K=16 − K=1 (paired z) |"
    assert lines[2] == "| inf | piqa (n=5) | 0.600 ± 0.100 | 0.800 ± 0.100 | +0.200 (+0.5) |"
    assert lines[3] == "| inf | all tasks, items pooled |  |  | +0.200 (+0.5) |"
    assert zeroshot_sweep_section(["other"], {}) == "(no zero-shot results per K)"


def test_eval_section_renders_an_eval_json(tmp_path):
    from infmoe.experiments.report import build_sections

    rows = [{"label": "K=1", "mode": "sample", "n_samples": 1, "loss": 2.5, "accuracy": 0.3, "ms_per_token": 0.2,
             "union_fraction": 0.5, "mean_samples": None},
            {"label": "auto (K<=16)", "mode": "adaptive", "n_samples": 16, "loss": 2.4, "accuracy": 0.31,
             "ms_per_token": 0.3, "union_fraction": 0.6, "mean_samples": 2.25}]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"checkpoint": "run/ckpt", "data": "wiki", "tokens": 4096, "device": "cpu",
                                "precision": "fp32", "threads": 2, "rows": rows}))
    (body,) = build_sections([{"id": "idle", "kind": "eval", "file": str(path)}], {}, tmp_path / "R.md").values()
    lines = body.splitlines()
    assert lines[0] == "`infmoe eval run/ckpt` on wiki (4,096 validation tokens, cpu, fp32, 2 threads)"
    assert lines[4] == "| K=1 | 2.5000 | 0.3000 | 0.2000 | 1.00 | 0.500 | 1 |"
    assert lines[5] == "| auto (K<=16) | 2.4000 | 0.3100 | 0.3000 | 1.50 | 0.600 | 2.25 |"
    with pytest.raises(ConfigError, match="cannot read"):
        build_sections([{"id": "idle", "kind": "eval", "file": str(tmp_path / "none.json")}], {}, tmp_path / "R.md")
