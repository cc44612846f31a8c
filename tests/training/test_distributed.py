"""torchrun with 2 CPU processes (Gloo) against one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from infmoe.randomness import derive_seed
from infmoe.training import resolve, train


def losses(out_dir) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def torchrun(settings: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    args = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "infmoe.train", *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# ∞-MoE in mean mode and top-k MoE without the load-balancing loss: both are functions of
# the global batch alone. (∞-MoE's sampled noise differs per rank on purpose, and the
# Switch loss is a product of per-batch averages, so neither splits exactly across ranks.)
CASES = {
    "infmoe-mean": dict(config="tiny-infmoe", mode="mean"),
    "moe": dict(config="tiny-moe", load_balance_weight=0.0),
}


# SAME_LOSS: why abs=1e-5 when two ranks are compared with one process. The ranks reduce
# their gradients in another order than one process does (and run at OMP_NUM_THREADS=1,
# while the process keeps its own thread count), so the losses differ by rounding: measured
# 4.8e-7 at most over 6 steps at 1 and 2 threads (one float32 ulp at a loss of ~6). 1e-5 is
# about 20 ulps; a rank's batch dropped or counted twice changes even the first step's loss
# by the spread between batches, far more than that.


@pytest.mark.parametrize("parallel,case", [("ddp", "infmoe-mean"), ("ddp", "moe"), ("fsdp", "infmoe-mean")])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, micro, parallel, case):
    common = dict(CASES[case], log_interval=1, max_steps=6)
    train(*resolve(micro(tmp_path / "one", batch_size=4, **common)))
    torchrun(micro(tmp_path / "two", batch_size=2, parallel=parallel, **common))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert one == pytest.approx(two, abs=1e-5)  # see SAME_LOSS


# Every gate under DDP, in mean mode so that two ranks must match one process exactly. The
# constant gate leaves the router and score map without gradients (with a KL weight the
# router gets one through the KL, the score map still none): DDP must be told, or it waits
# for them and fails at the second step.
@pytest.mark.parametrize("options", [dict(gate="softmax"), dict(gate="constant"),
                                     dict(gate="constant", kl_weight=0.01)], ids=["softmax", "constant", "constant-kl"])
def test_ddp_trains_every_gate(tmp_path, micro, options):
    common = dict(config="tiny-infmoe", mode="mean", log_interval=1, max_steps=4, eval_interval=4, **options)
    train(*resolve(micro(tmp_path / "one", batch_size=4, **common)))
    done = torchrun(micro(tmp_path / "two", batch_size=2, parallel="ddp", **common))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)  # see SAME_LOSS
    printed = done.stdout + done.stderr
    assert printed.count("step 4: validation loss") == 1, printed  # rank 0 alone reports
    assert printed.count("final validation loss") == 1, printed


def test_fsdp_checkpoint_from_two_ranks_resumes_on_one(tmp_path, micro):
    common = dict(CASES["infmoe-mean"], log_interval=1, max_steps=6)
    train(*resolve(micro(tmp_path / "one", batch_size=4, **common)))
    torchrun(micro(tmp_path / "split", batch_size=2, parallel="fsdp", stop_at=3, **common))
    result = train(*resolve(micro(tmp_path / "split", batch_size=4, resume=True, **common)))
    assert result.step == 6
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)  # see SAME_LOSS


def test_sampling_noise_differs_per_rank_and_is_reproducible():
    assert derive_seed(0, 5, 0) != derive_seed(0, 5, 1)
    assert derive_seed(0, 5, 1) == derive_seed(0, 5, 1)


def test_parallel_without_torchrun_is_a_clear_error(tmp_path, micro):
    from infmoe.errors import ConfigError

    with pytest.raises(ConfigError, match="torchrun"):
        train(*resolve(micro(tmp_path, parallel="fsdp")))
