"""`infmoe experiment` checks its spec, its inputs and its results folder before anything
trains (one line, exit 2), and survives a cut log line. (A signal to the grid, and a job
that fails: test_experiment.py.)"""

import json

import pytest
import yaml
from test_experiment import write_spec

from infmoe.cli import main


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Run `infmoe argv`; assert exit 2 with one line on stderr holding every fragment."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def edit_spec(tmp_path, corpus, cache_dir, edit) -> str:
    """write_spec's spec, changed by edit(spec dict) (which may return YAML text to write instead)."""
    path = write_spec(tmp_path, corpus, cache_dir)
    spec = yaml.safe_load(open(path))
    text = edit(spec)
    with open(path, "w") as f:
        f.write(text if isinstance(text, str) else yaml.safe_dump(spec))
    return path


def set_key(*keys_and_value):
    """An edit that sets spec[k1][k2]... = value."""
    *keys, value = keys_and_value

    def edit(spec):
        for key in keys[:-1]:
            spec = spec.setdefault(key, {})
        spec[keys[-1]] = value

    return edit


DUPLICATE_RUN = "runs:\n  inf: {config: tiny-infmoe}\n  inf: {config: tiny-dense}\n"
BAD_SPECS = {
    # item 2: one job twice into one folder, a run lost to a duplicate name, seeds from a string, escapes
    "seed twice": (set_key("seeds", [0, 0]), "seeds=[0, 0] is invalid: seed 0 appears twice; list each once"),
    "run seed twice": (set_key("runs", "inf", "seeds", [1, 1]), "runs.inf.seeds=[1, 1] is invalid: seed 1 appears"),
    "run name twice": (lambda spec: yaml.safe_dump({k: v for k, v in spec.items() if k != "runs"}) + DUPLICATE_RUN,
                       "key 'inf' appears twice in one mapping, and YAML would keep only the last"),
    "train key twice": (lambda spec: yaml.safe_dump(spec).replace("train:\n", "train:\n  lr: 0.1\n  lr: 0.2\n"),
                        "key 'lr' appears twice"),
    "seeds as text": (set_key("seeds", "0,1"), "seeds='0,1' is invalid: must be a non-empty list of distinct"),
    "escaping run name": (set_key("runs", "../../escape", {"config": "tiny-dense"}),
                          "run name='../../escape' is invalid: must be a folder name"),
    "absolute run name": (set_key("runs", "/tmp/abs", {"config": "tiny-dense"}), "run name='/tmp/abs' is invalid"),
    "run name with a separator": (set_key("runs", "a/b", {"config": "tiny-dense"}), "run name='a/b' is invalid"),
    "hidden run name": (set_key("runs", ".inf", {"config": "tiny-dense"}), "run name='.inf' is invalid"),
    "empty run name": (set_key("runs", "", {"config": "tiny-dense"}), "run name='' is invalid"),
    "run folders differing in case": (set_key("runs", "INF", {"config": "tiny-dense"}),
                                      "would share the run folder"),
    "a run's own data": (set_key("runs", "inf", "data", "embedded"),
                         "runs.inf.data is set by the grid for each job: use the top-level 'data' key"),
    # item 6: each field, before anything trains
    "seeds as a number": (set_key("seeds", 3), "seeds=3 is invalid"),
    "seed 'a'": (set_key("seeds", ["a"]), "seeds[0]='a' is invalid"),
    "seed true": (set_key("seeds", [True]), "seeds[0]=True is invalid"),
    "negative seed": (set_key("seeds", [-1]), "seeds[0]=-1 is invalid"),
    "run as a string": (set_key("runs", "inf", "tiny-infmoe"), "runs.inf='tiny-infmoe' is invalid: must be a mapping"),
    "runs as a list": (set_key("runs", ["inf"]), "runs=['inf'] is invalid"),
    "eval.tokens text": (set_key("eval", "tokens", "abc"), "eval.tokens='abc' is invalid: must be an integer >= 1"),
    "eval.samples a number": (set_key("eval", "samples", 4), "eval.samples=4 is invalid: must be a non-empty list"),
    "eval.samples zero": (set_key("eval", "samples", [0]), "eval.samples[0]=0 is invalid: must be an integer >= 1"),
    "eval.adaptive zero": (set_key("eval", "adaptive", 0), "eval.adaptive=0 is invalid"),
    "eval.zeroshot_samples zero": (set_key("eval", "zeroshot_samples", [1, 0]), "eval.zeroshot_samples[1]=0"),
    "unknown zero-shot task": (set_key("eval", "zeroshot", {"piqaa": "x.jsonl"}),
                               "eval.zeroshot task='piqaa' is invalid: choose one of 'hellaswag'"),
    "zeroshot run without tasks": (set_key("runs", "inf", "zeroshot", True),
                                   "runs.inf.zeroshot is true but eval.zeroshot names no tasks"),
    "zeroshot not a flag": (set_key("runs", "inf", "zeroshot", "yes"), "runs.inf.zeroshot='yes' is invalid"),
    "report section as a string": (set_key("report", ["A"]), "report[0]='A' is invalid: must be a mapping"),
    "report kind": (set_key("report", [{"id": "A", "kind": "tabel", "runs": ["inf"]}]),
                    "report section A: kind='tabel' is invalid: choose one of 'table'"),
    "report without runs": (set_key("report", [{"id": "A", "runs": "inf"}]), "report section A: runs='inf'"),
    "report id as a path": (set_key("report", [{"id": "../A", "runs": ["inf"]}]), "report[0].id='../A' is invalid"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_a_bad_spec_is_one_line_before_anything_trains(tmp_path, corpus, cache_dir, capsys, case):
    edit, message = BAD_SPECS[case]
    spec = edit_spec(tmp_path, corpus, cache_dir, edit)
    refused(capsys, ["experiment", spec, "--jobs", "2"], f"infmoe experiment: error: experiment spec {spec}", message)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["top level", "a run"])
def test_no_seeds_is_refused_not_zero_jobs(tmp_path, corpus, cache_dir, capsys, where):
    """Item 19: `seeds: []` ran zero jobs and exited 0 without a word."""
    edit = set_key("seeds", []) if where == "top level" else set_key("runs", "inf", "seeds", [])
    spec = edit_spec(tmp_path, corpus, cache_dir, edit)
    refused(capsys, ["experiment", spec], "seeds=[] is invalid: must be a non-empty list of distinct integer seeds")


def test_missing_inputs_and_bad_jobs_are_one_line_before_anything_trains(tmp_path, corpus, cache_dir, capsys):
    spec = write_spec(tmp_path, corpus, cache_dir, data=str(tmp_path / "missing.txt"))
    refused(capsys, ["experiment", spec], f"experiment spec {spec}: data: no such file or folder: {tmp_path}/missing.txt")
    spec = write_spec(tmp_path, corpus, cache_dir, eval={"samples": [1], "zeroshot": {"piqa": "no/piqa.jsonl"}},
                      runs={"inf": {"config": "tiny-infmoe", "zeroshot": True}})
    refused(capsys, ["experiment", spec], "eval.zeroshot.piqa: no/piqa.jsonl is not a file; give the piqa jsonl")
    spec = write_spec(tmp_path, corpus, cache_dir, train={"max_steps": 6, "warmup_steps": 1},
                      runs={"up": {"init_from": str(tmp_path / "none.safetensors")}})
    refused(capsys, ["experiment", spec], f"runs.up.init_from: {tmp_path}/none.safetensors does not exist")
    spec = write_spec(tmp_path, corpus, cache_dir)
    for jobs in ("0", "-1"):
        refused(capsys, ["experiment", spec, "--jobs", jobs], f"--jobs={jobs} is invalid: must be an integer >= 1")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("foreign,problem", [('{"checkpoint": "x", "rows": []}', "no 'run' key"),
                                             ("[1, 2]", "not a JSON object"), ("not json", "not JSON")])
def test_a_foreign_file_in_the_results_folder_is_refused(tmp_path, corpus, cache_dir, capsys, foreign, problem):
    spec = write_spec(tmp_path, corpus, cache_dir)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "eval.json").write_text(foreign)
    report = str(tmp_path / "RESULTS.md")
    for argv in (["experiment", spec, "--report-only", "--report", report], ["experiment", spec]):
        refused(capsys, argv, f"{tmp_path}/results/eval.json is not an experiment result ({problem}); move it out")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "RESULTS.md").exists()


def test_a_cut_metrics_line_does_not_stop_the_grid(tmp_path, corpus, cache_dir, capsys):
    """Item 5: a finished run whose metrics.jsonl ends mid-line (as a crash or a full disk
    leaves it): its curve is re-read without that line, with a note, and the report is written."""
    spec = write_spec(tmp_path, corpus, cache_dir, runs={"dense": {"config": "tiny-dense"}},
                      report=[{"id": "A", "runs": ["dense"]}])
    result = {"run": "dense", "seed": 0, "steps": 2, "tokens_seen": 256, "params": {"total": 1000, "active": 1000},
              "headline": {"label": "K=1", "loss": 5.0}, "sweep": [], "baselines": {"unigram": 6.0, "bigram": 5.5},
              "curve": {}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "dense-seed0.json").write_text(json.dumps(result))
    run = tmp_path / "runs" / "dense-seed0"
    run.mkdir(parents=True)
    rows = b"".join(json.dumps({"step": s, "train/loss": 6.0 - s}).encode() + b"\n" for s in (1, 2))
    (run / "metrics.jsonl").write_bytes(rows + b'{"step": 3, "train/lo')  # cut mid-line
    report = tmp_path / "RESULTS.md"
    assert main(["experiment", spec, "--report", str(report)]) == 0
    out, err = capsys.readouterr()
    assert "1 of 1 runs already done (1 curves re-read from their logs); 0 to run now" in out
    assert "dropped the partial last line of" in err and "Traceback" not in err
    curve = json.loads((tmp_path / "results" / "dense-seed0.json").read_text())["curve"]
    assert curve["step"] == [1, 2] and curve["train_loss"] == [5.0, 4.0]
    assert "| dense |" in report.read_text()

