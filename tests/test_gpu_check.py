"""benchmarks/gpu_check.py, dry-run on the CPU: every stage reported, failures recorded
(a config that raises, a stage out of time) while the stages after them still run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
TITLES = ["Environment", "The layer tests on this device, and the compile tests", "infmoe bench",
          "infmoe bench --compile", "Training throughput", "Profile of one training step",
          "Generation with the KV cache"]


def gpu_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_cpu_dry_run_reports_every_stage_and_goes_on_after_failures(tmp_path):
    # Two real failures: training a config with the inference-only impl raises in the
    # library's forward; the compiled bench gets 3 s, far less than it needs, and is killed.
    bad = "tiny-infmoe --impl rows"
    done = gpu_check("--device", "cpu", "--quick", "--out", str(tmp_path), "--train-configs", f"tiny-dense,{bad}",
                     "--budget", "compile=3")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu.json").read_text())
    md = (tmp_path / "gpu.md").read_text()
    stages = {s["name"]: s for s in report["stages"]}
    assert [s["title"] for s in report["stages"]] == TITLES
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[:-1] == [f"## {i}. {t}: {s['status']}" for i, (t, s) in enumerate(zip(TITLES, stages.values()), 1)]
    assert headings[-1] == "## What this shows / what failed" and report["finished"]
    assert {n: s["status"] for n, s in stages.items()} == dict(
        environment="passed", tests="passed", bench="passed", compile="failed", training="failed", profile="passed",
        generation="passed")

    compiled = stages["compile"]
    assert compiled["error"]["type"] == "TimeoutError" and "infmoe.cli bench --compile" in compiled["error"]["message"]
    assert compiled["seconds"] < 10 and compiled["rows"][0]["timed_out"]  # its bench killed, not waited for
    bench = stages["bench"]["rows"][0]
    assert bench["ok"] and bench["markdown"].strip() in md  # the bench's own tables, embedded as written
    assert [r["variant"] for r in bench["result"]["layers"]][:2] == ["dense, active width", "dense, full width H"]
    dense, broken = stages["training"]["rows"]
    assert dense["config"] == "tiny-dense" and dense["ok"] and dense["tokens_per_s"] > 0
    assert broken["config"] == bad and broken["error"]["type"] == "ConfigError"
    message = broken["error"]["message"]
    assert message.startswith("impl='rows' is invalid") and message in md
    assert "- **training failed**" in md and f"{bad} fp32: ConfigError: {message}" in md

    # The numbers of gpu.json are the ones gpu.md shows.
    assert f"| tiny-dense | fp32 | 2 x 64 x 1 | {dense['tokens_per_s']:.0f} | 1.00 |" in md
    for row in stages["generation"]["rows"]:
        assert f"| {row['setting']} | {row['path']} | float32 | 16 | {row['tokens_per_s']:.1f} |" in md
    assert {r["path"] for r in stages["generation"]["rows"]} >= {"dense", "rows"}  # what decoding ran
    env = {r["item"]: r["value"] for r in stages["environment"]["rows"]}
    assert env["torch"] == torch.__version__ and f"| torch | `{torch.__version__}` |" in md

    # The tests stage runs real tests here: the dispatch rule's CPU cases.
    (tests,) = stages["tests"]["rows"]
    assert tests["rc"] == 0 and tests["passed"] > 0 and tests["failed"] == 0 and tests["deselected"] > 0
    assert tests["command"] == "python -m pytest -q tests/layers/test_dispatch.py -k cpu"
    assert f"| `{tests['command']}` | {tests['passed']} | 0 |" in md

    # The profile: both block sizes, every category, idle the rest of the wall time; no syncs
    # or GPU memory to count on the CPU.
    rows = stages["profile"]["rows"]
    assert [r["config"] for r in rows] == ["tiny-infmoe --units_per_block 1", "tiny-infmoe --units_per_block 256"]
    for r in rows:
        assert r["ok"] and r["kernels"] == "CPU operators" and r["syncs"] is None
        assert set(r["kernel_ms"]) == {"attention", "GEMM", "selection", "gather/scatter/index", "elementwise",
                                       "other"}
        assert r["kernel_ms"]["GEMM"] > 0 and r["idle_ms"] == pytest.approx(r["wall_ms"] - sum(r["kernel_ms"].values()))
        assert r["peak_gib"] == {"1": None, "4": None} and set(r["paths"]) == {"1", "4"}
        assert f"| {r['config']} | {'/'.join(r['paths'].values())} | {r['wall_ms']:.1f} |" in md
    assert md.count("| n/a | n/a | n/a |") == 2  # syncs and both peaks, per block size
    assert rows[0]["paths"]["1"] == "full"  # per unit, K = 1: the full path on the CPU's plan


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_default_run_refuses_with_one_line(tmp_path):
    done = gpu_check("--out", str(tmp_path), timeout=120)
    assert done.returncode == 2
    assert done.stdout.count("\n") == 1 and "no CUDA device is available" in done.stdout and not done.stderr
    assert not any(tmp_path.iterdir())  # no report: there was nothing to check


@pytest.mark.parametrize("args", [["--device", "tpu"], ["--only", "training,nothing"], ["--budget", "bench"]])
def test_bad_options_are_one_line_and_status_2(tmp_path, args):
    done = gpu_check(*args, "--out", str(tmp_path), timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "error:" in done.stderr
    assert not any(tmp_path.iterdir())


def test_a_stage_out_of_time_is_killed_and_the_report_still_written(tmp_path):
    done = gpu_check("--device", "cpu", "--quick", "--out", str(tmp_path), "--only", "generation,tests",
                     "--budget", "generation=1.5", timeout=120)
    assert done.returncode == 1
    generation, tests = json.loads((tmp_path / "gpu.json").read_text())["stages"]
    assert generation["status"] == "failed" and generation["error"]["type"] == "TimeoutError"
    assert "ran out of its 1.5 s budget and was killed" in generation["error"]["message"]
    assert generation["seconds"] < 5 and tests["status"] == "passed"
    assert "## 1. Generation with the KV cache: failed" in (tmp_path / "gpu.md").read_text()
