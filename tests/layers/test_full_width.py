"""The full-width path (`infmoe.layers.full_width`) equals the masked reference: outputs,
the input gradient and every parameter gradient, for K >= 1, per-unit and block routing,
both gates it serves, mean mode, ties at the top-N threshold and bf16 autocast."""

import pytest
import torch

from infmoe.layers.full_width import top_n_mask
from paths import TOL, assert_mean_mode_with_leading_shapes_match, assert_same, infmoe, inputs, run


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gate", ["sigmoid", "constant"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_full_equals_masked(dtype, gate, k, block_size):
    layer = infmoe(dtype, block_size=block_size, gate=gate)
    x, dy, noise = inputs(dtype, k, repeat_noise=k > 1)
    ref = run(layer, "masked", x, dy, noise=noise)
    stats = dict(layer.aux.stats)
    assert_same(run(layer, "full", x, dy, noise=noise), ref, TOL[dtype])
    for name in ("union_fraction", "used_fraction", "block_usage", "sigma_mean", "kl"):
        torch.testing.assert_close(layer.aux.stats[name], stats[name], rtol=1e-6, atol=1e-7, msg=name)
    assert (gate == "constant") == ("grad score.weight" not in ref)


def test_full_in_mean_mode_and_with_leading_shapes():
    assert_mean_mode_with_leading_shapes_match("full", block_size=1)


def test_the_softmax_gate_takes_the_reference_under_full():
    layer = infmoe(torch.float64, block_size=1, gate="softmax")
    x, dy, noise = inputs(torch.float64, 2)
    assert_same(run(layer, "full", x, dy, noise=noise), run(layer, "masked", x, dy, noise=noise), 1e-12)


def test_ties_at_the_threshold_keep_exactly_n_as_topk_does():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.5, 4.0]])
    keep = top_n_mask(scores, 2)  # row 0: three scores tie for the last place
    assert keep.sum(-1).tolist() == [2, 2]
    expected = torch.zeros_like(scores).scatter_(1, scores.topk(2, -1, sorted=False).indices, 1.0)
    assert torch.equal(keep, expected)


def test_all_scores_equal_still_keeps_n_and_matches_the_reference():
    layer = infmoe(torch.float64, block_size=1, mode="mean")
    with torch.no_grad():
        layer.score.weight.zero_()  # every unit scores c = 0: all tie
    x, dy, _ = inputs(torch.float64, 1)
    ref = run(layer, "masked", x, dy)
    fast = run(layer, "full", x, dy)
    assert layer.aux.stats["union_fraction"].item() == layer.n_kept / layer.n_blocks
    assert_same(fast, ref, 1e-8)


@pytest.mark.parametrize("k", [1, 3])
def test_full_under_bf16_autocast_keeps_the_fp32_blocks(k):
    torch.manual_seed(0)
    layer = infmoe(torch.float32, d_hidden=1024, block_size=1, n_samples=k)
    x, dy, noise = inputs(torch.float32, k, t=64)
    ref = run(layer, "full", x, dy, noise=noise)
    usage32 = layer.aux.stats["block_usage"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = run(layer, "full", x, dy, noise=noise)
    assert torch.equal(layer.aux.stats["block_usage"], usage32)  # the same units, token by token summed
    assert layer.w_in.grad.dtype == torch.float32
    assert fast["y"].dtype == torch.bfloat16  # the FFN ran in bf16, as autocast's matmuls do
    torch.testing.assert_close(fast["y"].float(), ref["y"], rtol=0.05, atol=0.05)
    for key in ("grad score.weight", "grad router.weight", "grad w_in"):
        torch.testing.assert_close(fast[key], ref[key], rtol=0.1, atol=0.05 * ref[key].abs().max().item(), msg=key)


def test_auto_takes_full_for_per_unit_training_and_rows_for_one_token_decoding():
    layer = infmoe(torch.float32, d_hidden=96, block_size=1)
    assert layer.plan(tokens=2048, n_samples=1, grad=True) == "full"
    assert layer.plan(tokens=1, n_samples=1, grad=False) == "rows"
    assert layer.plan(tokens=1, n_samples=16, grad=False) == "rows"
    assert layer.plan(tokens=2, n_samples=1, grad=False) == "full"  # reading every row once is cheaper
    assert layer.plan(tokens=16, n_samples=1, grad=False) == "full"
    assert infmoe(torch.float32, d_hidden=1024, block_size=128).plan(2048, 1, True) == "sparse"
