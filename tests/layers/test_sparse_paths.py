"""The fast paths equal the reference paths: ∞-MoE sparse vs masked (its GELU MLP and its
gated FFN), top-k grouped vs loop.

Outputs, the input gradient and every parameter gradient, in float64 (tolerance 1e-8, where
the grouped matmul runs as its loop fallback) and float32 (1e-5, where d and B are multiples
of 4 so `torch._grouped_mm` itself runs; B = 3 exercises the fallback in float32 too).
The top-k grouped path runs on both plans: the host's, and the static one (CUDA's, on CPU
tensors); `test_grouped.py` holds the static executor itself to the host one.
"""

import pytest
import torch

from infmoe import ConfigError, InfiniteMoE, TopKMoE
from infmoe.layers import grouped
from infmoe.layers.dispatch import plan_device
from infmoe.layers.grouped import GroupedFFN, grouped_mm_loop, grouped_mm, plan_chunks
from paths import D, DZ, GLU, TOL, assert_mean_mode_with_leading_shapes_match, assert_same, infmoe, inputs, run

@pytest.fixture(params=[None, 1, 40 * D * 4], ids=["default-chunks", "chunk-per-block", "few-blocks-per-chunk"])
def chunking(request, monkeypatch):
    """Run with the default chunk budget, with one block per chunk (the smallest budget), and
    with a budget of 40 float32 rows, which puts several blocks in each of several chunks."""
    if request.param is not None:
        monkeypatch.setattr(grouped, "CHUNK_BYTES", request.param)


@pytest.mark.parametrize("glu", **GLU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gate", ["sigmoid", "softmax", "constant"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("units_per_block", [4, 3, 8])
def test_infmoe_sparse_equals_masked(dtype, gate, k, units_per_block, glu, chunking):
    layer = infmoe(dtype, units_per_block=units_per_block, gate=gate, glu=glu)
    x, dy, noise = inputs(dtype, k, repeat_noise=k > 1)
    ref = run(layer, "masked", x, dy, noise=noise)
    assert_same(run(layer, "sparse", x, dy, noise=noise), ref, TOL[dtype])
    assert (gate == "constant") == ("grad router.weight" not in ref)  # gates carry the router's gradient


@pytest.mark.parametrize("glu", **GLU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_infmoe_blocks_no_token_chose_and_a_single_token(dtype, glu):
    layer = infmoe(dtype, units_per_block=4, active_fraction=0.1, glu=glu)  # 12 blocks, 2 kept per sample
    for t in (3, 1):
        x, dy, noise = inputs(dtype, 2, t=t)
        ref = run(layer, "masked", x, dy, noise=noise)
        assert layer.aux.stats["used_fraction"] < 1  # some blocks got no token at all
        assert_same(run(layer, "sparse", x, dy, noise=noise), ref, TOL[dtype])


def test_infmoe_later_samples_selecting_nothing_new_cost_nothing():
    layer = infmoe(torch.float64, units_per_block=4)
    x, dy, noise = inputs(torch.float64, 4)
    layer(x, noise[:1])
    one = layer.aux.stats["union_fraction"]
    ref = run(layer, "masked", x, dy, noise=noise[:1].expand(4, -1, -1))
    assert layer.aux.stats["union_fraction"] == one  # K identical samples: the union of one
    assert_same(run(layer, "sparse", x, dy, noise=noise[:1].expand(4, -1, -1)), ref, 1e-8)


@pytest.mark.parametrize("glu", **GLU)
def test_infmoe_mean_mode_and_leading_shapes(glu):
    assert_mean_mode_with_leading_shapes_match("sparse", units_per_block=4, glu=glu)


def test_infmoe_auto_rule():
    def auto(units_per_block, **kw):
        return infmoe(torch.float32, d_hidden=1024, units_per_block=units_per_block, **kw).uses_sparse()

    # sparse / full = u (1.05 + 37 / B) <= 1, u = 1 - (1 - N)^K
    assert [auto(64, n_samples=k) for k in (1, 2, 4, 8)] == [True, False, False, False]
    assert [auto(512, n_samples=k) for k in (1, 2, 4, 8)] == [True, True, False, False]
    assert [auto(b) for b in (1, 8, 16, 32, 64)] == [False, False, False, False, True]
    assert not auto(32) and auto(32, active_fraction=0.25)  # u = 0.25: 0.25 (1.05 + 1.16) <= 1
    assert auto(64, n_samples=8, mode="mean")  # one mask whatever K is
    assert auto(16, impl="sparse") and not auto(256, impl="masked")
    # a GLU block: 3/2 the work for the same per-row overhead, u (1.05 + 37 / (1.5 B))
    assert not auto(32) and auto(32, glu=True)  # 0.5 (1.05 + 0.77) <= 1
    assert [auto(b, glu=True) for b in (16, 32)] == [False, True]


@pytest.mark.parametrize("glu", **GLU)
def test_infmoe_sparse_under_cpu_autocast_runs_in_bf16_with_fp32_gradients(glu):
    layer = infmoe(torch.float32, units_per_block=8, glu=glu)
    x, dy, noise = inputs(torch.float32, 2)
    ref = run(layer, "masked", x, dy, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = run(layer, "sparse", x, dy, noise=noise)
    assert layer.w_in.grad.dtype == torch.float32
    assert (fast["y"] - ref["y"]).abs().max() > 1e-4  # bf16 rounding: it did run in bf16
    torch.testing.assert_close(fast["y"], ref["y"], rtol=0.05, atol=0.05)
    torch.testing.assert_close(fast["grad w_in"], ref["grad w_in"], rtol=0.05, atol=0.05)


# The top-k layer's grouped path on each plan: the host's (eager CPU), and the static one
# (CUDA's, here run on CPU tensors), where the loop reference stays on the host plan.
PLANS = dict(argvalues=[None, "cuda"], ids=["host-plan", "static-plan"])


@pytest.mark.parametrize("plan", **PLANS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "options",
    [dict(top_k=2), dict(top_k=1), dict(top_k=4), dict(top_k=2, capacity_factor=0.5), dict(top_k=1, capacity_factor=1.0)],
    ids=["k2", "k1", "k=E", "k2-drops", "k1-drops"],
)
def test_topk_grouped_equals_loop(dtype, options, plan, chunking):
    torch.manual_seed(0)
    layer = TopKMoE(D, 32, n_experts=4, **options).to(dtype)
    layer.reset_parameters(std=0.3)
    x, dy, _ = inputs(dtype, 1)
    ref = run(layer, "loop", x, dy)
    ref_stats = layer.aux.stats
    if "capacity_factor" in options:
        assert ref_stats["dropped_fraction"] > 0
    with plan_device(plan):
        fast = run(layer, "grouped", x, dy)
    assert_same(fast, ref, TOL[dtype])
    for key, value in ref_stats.items():
        torch.testing.assert_close(layer.aux.stats[key], value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls,options", [(InfiniteMoE, dict(d_z=DZ)), (TopKMoE, {})])
def test_bad_impl_is_one_clear_error(cls, options):
    with pytest.raises(ConfigError) as err:
        cls(D, 48, impl="fast", **options)
    assert str(err.value).startswith("impl=") and "\n" not in str(err.value)


@pytest.mark.parametrize("glu", **GLU)
def test_float32_runs_torch_grouped_mm_itself(glu, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return torch_grouped_mm(*args, **kwargs)

    torch_grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", counting)
    x, dy, noise = inputs(torch.float32, 2)
    run(infmoe(torch.float32, units_per_block=4, glu=glu), "sparse", x, dy, noise=noise)
    assert len(calls) == 6  # one chunk: 2 forward, 4 backward
    run(TopKMoE(D, 32, n_experts=4), "grouped", x, dy)
    assert len(calls) == 12


# --- groups that no row reached ----------------------------------------------------------
# A grouped-GEMM kernel need not write (or zero) the weight gradient of a group with no
# rows; the Function writes those zeros itself. float32 runs torch._grouped_mm, float64
# its loop.

PATHS = dict(argvalues=[torch.float32, torch.float64], ids=["grouped_mm", "loop"])


def count_grouped_mm(monkeypatch) -> list:
    calls, real = [], torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64-loop", "bf16"])
@pytest.mark.parametrize("chunk_rows", [None, 1, 4])
@pytest.mark.parametrize("transposed_w1", [False, True])
def test_grouped_ffn_gives_groups_without_rows_exactly_zero_gradients(
        device, dtype, chunk_rows, transposed_w1, monkeypatch):
    calls = count_grouped_mm(monkeypatch)
    g = torch.Generator().manual_seed(0)
    t, d, b = 6, 16, 8  # 16-byte aligned rows in bf16 too, so torch._grouped_mm takes them
    counts = torch.tensor([0, 3, 0, 0, 5, 2, 0])  # empty first, last, alone and in a run
    token = torch.cat([torch.randperm(t, generator=g)[:n].sort().values for n in counts.tolist()])
    chunks = plan_chunks(token.to(device), counts, row_bytes=1, max_bytes=chunk_rows)
    assert len(chunks) == {None: 1, 1: 4, 4: 3}[chunk_rows]

    def param(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    w1 = param(7, b, d) if transposed_w1 else param(7, d, b)
    x, gate, b1, w2 = param(t, d), param(len(token)), param(7, b), param(7, b, d)
    y = GroupedFFN.apply(x, gate, w1.transpose(1, 2) if transposed_w1 else w1, b1, w2, chunks)
    y.backward(torch.randn(t, d, generator=g).to(device, dtype))
    assert bool(calls) == (dtype != torch.float64)
    empty = (counts == 0).to(device)
    for name, grad in [("w1", w1.grad), ("b1", b1.grad), ("w2", w2.grad)]:
        assert torch.equal(grad[empty], torch.zeros_like(grad[empty])), name
        assert (grad[~empty].flatten(1).abs().sum(1) > 0).all(), name


@pytest.mark.parametrize("glu", **GLU)
@pytest.mark.parametrize("dtype", **PATHS)
def test_infmoe_blocks_no_token_chose_get_exactly_zero_gradients(dtype, glu, chunking, monkeypatch):
    calls = count_grouped_mm(monkeypatch)
    layer = infmoe(dtype, units_per_block=4, active_fraction=0.1, glu=glu)  # 12 blocks, 2 kept per sample
    x, dy, noise = inputs(dtype, 1, t=3)
    grads = run(layer, "sparse", x, dy, noise=noise)
    assert bool(calls) == (dtype == torch.float32)
    unused_block = layer.aux.stats["block_usage"] == 0
    assert 0 < unused_block.sum() < len(unused_block)
    for name in ("grad w_in", "grad b_in", "grad w_out"):
        grad = grads[name]
        rows = len(grad) // layer.n_blocks  # of each block: 4, or the GLU's w_in 8
        unused = unused_block.repeat_interleave(rows)
        assert torch.equal(grad[unused], torch.zeros_like(grad[unused])), name
        assert (grad[~unused].reshape(-1, rows, *grad.shape[1:]).flatten(1).abs().sum(1) > 0).all(), name


@pytest.mark.parametrize("plan", **PLANS)
@pytest.mark.parametrize("dtype", **PATHS)
def test_topk_experts_no_token_chose_get_exactly_zero_gradients(dtype, plan, chunking, monkeypatch):
    calls = count_grouped_mm(monkeypatch)
    torch.manual_seed(0)
    layer = TopKMoE(D, 32, n_experts=4, top_k=2).to(dtype)
    layer.reset_parameters(std=0.3)
    with torch.no_grad():  # positive inputs, so experts 1 and 2 win every token, 0 and 3 none
        layer.router.weight.copy_(torch.tensor([-1.0, 1.0, 2.0, -2.0], dtype=dtype)[:, None].expand(4, D))
    x, dy, _ = inputs(dtype, 1)
    with plan_device(plan):
        grads = run(layer, "grouped", x.abs() + 0.1, dy)
    assert bool(calls) == (dtype == torch.float32)
    assert layer.aux.stats["expert_load"].tolist() == [0.0, 0.5, 0.5, 0.0]
    for name in ("grad w_in", "grad b_in", "grad w_out", "grad b_out"):
        grad = grads[name]
        assert torch.equal(grad[[0, 3]], torch.zeros_like(grad[[0, 3]])), name
        assert (grad[[1, 2]].flatten(1).abs().sum(1) > 0).all(), name


def test_grouped_ffn_backward_refuses_to_be_differentiated():
    """Its backward is written by hand and not differentiable; a second-order gradient
    through it would be silently wrong, so it must raise instead."""
    g = torch.Generator().manual_seed(0)
    token, counts = torch.tensor([0, 1, 2, 0, 2]), torch.tensor([3, 2])
    (chunk,) = plan_chunks(token, counts, row_bytes=1, max_bytes=None)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    shapes = [(5,), (2, 4, 2), (2, 2), (2, 2, 4)]  # gate, w1, b1, w2
    weights = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    y = GroupedFFN.apply(x, *weights, [chunk])
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)  # as a gradient penalty would
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dx.square().sum().backward()


# --- the pieces ---------------------------------------------------------------------------


def test_grouped_mm_op_equals_its_loop_with_empty_groups():
    token = torch.arange(10)
    counts = torch.tensor([3, 0, 7, 0])
    (chunk,) = plan_chunks(token, counts, row_bytes=4, max_bytes=None)
    a, b3 = torch.randn(10, 8), torch.randn(4, 8, 12)
    left, right = torch.randn(8, 10), torch.randn(10, 12)
    for x, y in [(a, b3), (a, b3.transpose(1, 2).contiguous().transpose(1, 2)), (left, right), (a.T.contiguous().T, b3)]:
        torch.testing.assert_close(grouped_mm(x, y, chunk), grouped_mm_loop(x, y, chunk.counts), rtol=1e-6, atol=1e-6)


def test_chunks_hold_whole_groups_within_the_budget():
    counts = torch.tensor([2, 0, 5, 1, 1, 3])
    token = torch.arange(12)
    chunks = plan_chunks(token, counts, row_bytes=10, max_bytes=40)  # at most 4 rows, >= 1 group
    assert [(c.group_start, c.group_end) for c in chunks] == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert torch.equal(torch.cat([c.token for c in chunks]), token)
    assert chunks[3].token.tolist() == [9, 10, 11] and chunks[3].rows == slice(9, 12)
    assert chunks[0].local_group.tolist() == [0, 0] and chunks[0].offs.tolist() == [2, 2]


@pytest.mark.parametrize("glu", [None, "silu", "gelu"], ids=["gelu-mlp", "swiglu", "geglu"])
@pytest.mark.parametrize("chunk_rows", [1, 4, None])
@pytest.mark.parametrize("transposed_w1", [False, True])
def test_grouped_ffn_backward_passes_gradcheck(transposed_w1, chunk_rows, glu):
    g = torch.Generator().manual_seed(0)
    t, d, b, groups = 5, 3, 2, 3
    r = b if glu is None else 2 * b  # rows of w1 per group: a GLU's gate and up rows
    token = torch.tensor([0, 2, 4, 1, 2, 3, 4, 0])
    counts = torch.tensor([3, 0, 5])
    chunks = plan_chunks(token, counts, row_bytes=1, max_bytes=chunk_rows)
    assert len(chunks) == {1: 2, 4: 2, None: 1}[chunk_rows]  # 4 rows: groups 0-1, then 2

    def param(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    w1 = param(groups, r, d).transpose(1, 2) if transposed_w1 else param(groups, d, r)
    args = (param(t, d), param(len(token)), w1, param(groups, r), param(groups, b, d))
    assert torch.autograd.gradcheck(lambda *a: GroupedFFN.apply(*a, chunks, glu), args)
