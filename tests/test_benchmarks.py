"""The small benchmark scripts docs/speed.md quotes, run at toy sizes: each prints the table
the page shows, with one row per kernel or model and figures that follow from each other."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def table(script: str, *args: str) -> list[list[str]]:
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    rows = [line.strip("|").split(" | ") for line in out.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header


def test_generate_threads_compares_every_model_at_both_thread_counts():
    rows = table("generate_threads.py", "3", "tiny-dense", "tiny-infmoe", "--repeats", "1")
    assert [row[0] for row in rows] == ["tiny-dense", "tiny-infmoe"]
    (_, dense_one, dense_two, _, *dense_vs_dense), (_, one, two, two_over_one, vs_dense_one, vs_dense_two) = rows
    assert dense_vs_dense == ["1.00", "1.00"]

    def close(printed: str, value: float) -> bool:  # the speeds are printed rounded
        return abs(float(printed) - value) <= 0.02 * value + 0.01

    assert close(two_over_one, float(one) / float(two))
    assert close(vs_dense_one, float(one) / float(dense_one))
    assert close(vs_dense_two, float(two) / float(dense_two))


def test_decode_kernels_reports_each_kernel_with_its_bandwidth():
    rows = table("decode_kernels.py", "--d", "512", "--hidden", "2048", "--repeats", "3")
    assert len(rows) == 5
    for kernel, megabytes, ms, gb_per_s in rows:
        assert float(ms) > 0
        assert abs(float(gb_per_s) - float(megabytes) / float(ms)) <= 0.06 * float(gb_per_s) + 0.06, kernel
    all_rows = [float(mb) for kernel, mb, *_ in rows if "all rows" in kernel]
    chosen = [float(mb) for kernel, mb, *_ in rows if "chosen rows" in kernel]
    assert all_rows and chosen and all(abs(a - 2 * c) < 0.11 for a in all_rows for c in chosen)  # half the rows chosen


def test_compiled_paths_times_the_grouped_and_full_paths_as_they_ran():
    rows = table("compiled_paths.py", "--d", "32", "--hidden", "256", "--block", "16", "--tokens", "64",
                 "--repeats", "1")
    assert [(row[0].split(" K=1 ")[-1], row[1]) for row in rows] == [
        ("dense, active width", "—"), ("grouped", "grouped"), ("full", "full")]
    base = float(rows[0][2])
    for _, _, ms, ratio in rows:
        assert abs(float(ratio) - float(ms) / base) <= 0.01 + 0.02 * float(ratio)  # printed rounded


def test_profile_full_lists_the_heaviest_ops_between_the_two_whole_steps():
    rows = table("profile_full.py", "--d", "32", "--hidden", "256", "--tokens", "64", "--top", "4")
    assert rows[0][0].startswith("(dense MLP") and rows[-1][0].startswith("(∞-MoE")
    total = float(rows[-1][1])
    ops = rows[1:-1]
    assert len(ops) == 4 and any(op == "aten::topk" for op, *_ in ops)  # the selection shows up
    assert [float(ms) for _, ms, _ in ops] == sorted((float(ms) for _, ms, _ in ops), reverse=True)
    assert sum(float(ms) for _, ms, _ in ops) <= total + 0.1
