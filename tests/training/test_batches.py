import numpy as np
import torch

from infmoe.evaluation.validation import eval_batches
from infmoe.training.batches import WindowSampler


def test_windows_are_disjoint_within_an_epoch_and_targets_shift_by_one():
    tokens = np.arange(1001, dtype=np.uint16)
    sampler = WindowSampler(tokens, seq_len=10, seed=3)
    x, y = sampler.windows(0, sampler.n_windows)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert sorted(x[:, 0].tolist()) == list(range(0, 1000, 10))  # every window exactly once


def test_ranks_split_the_global_batch_without_overlap():
    sampler = WindowSampler(np.arange(5001, dtype=np.uint16), seq_len=10, seed=0)
    whole, _ = sampler.batch(step=2, micro=1, batch_size=8, grad_accum=2)
    parts = [sampler.batch(step=2, micro=1, batch_size=4, grad_accum=2, rank=r, world_size=2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)


def test_batches_are_a_pure_function_of_the_step():
    tokens = np.arange(3001, dtype=np.uint16)
    a = WindowSampler(tokens, 10, seed=1).batch(7, 0, 4, 1)[0]
    fresh = WindowSampler(tokens, 10, seed=1)
    fresh.batch(50, 0, 4, 1)  # moving elsewhere first changes nothing
    assert torch.equal(fresh.batch(7, 0, 4, 1)[0], a)
    assert not torch.equal(WindowSampler(tokens, 10, seed=2).batch(7, 0, 4, 1)[0], a)


def test_eval_batches_cover_the_start_of_the_split_in_order():
    batches = eval_batches(np.arange(95, dtype=np.uint16), seq_len=10, batch_size=4, max_tokens=1000)
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (9, 10) and x[0, 0] == 0 and x[-1, -1] == 89
