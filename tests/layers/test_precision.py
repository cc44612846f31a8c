"""Under bf16 autocast: routing decides exactly as in fp32, and the grouped path's sums over
many rows are accumulated in fp32, not bf16."""

import pytest
import torch
import torch.nn.functional as F

from infmoe import InfiniteMoE, TopKMoE
from infmoe.layers import grouped, infinite_moe
from infmoe.layers.dispatch import plan_device
from infmoe.layers.routing import top_blocks
from infmoe.layers.grouped import grouped_ffn


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("plan", ["cpu", "cuda"])
@pytest.mark.parametrize("impl", ["sparse", "masked"])
def test_infmoe_under_bf16_autocast_keeps_the_fp32_blocks(impl, plan, monkeypatch):
    # 128 blocks, 64 kept: many near-equal scores sit at the top-N boundary.
    torch.manual_seed(0)
    layer = InfiniteMoE(64, 1024, d_z=16, units_per_block=8, n_samples=2, impl=impl)
    x, noise = torch.randn(256, 64), torch.randn(2, 256, 16)
    seen = []  # (index, gate) of every call: what forward itself routed by

    def recording(*args, **kwargs):
        seen.append(top_blocks(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(infinite_moe, "top_blocks", recording)
    with plan_device(plan):
        y32 = layer(x, noise)
        usage32 = layer.aux.stats["block_usage"]
        with bf16_autocast():
            y16 = layer(x, noise)
    assert layer.aux.path == {"sparse": {"cpu": "sparse", "cuda": "grouped"}[plan], "masked": "masked"}[impl]
    assert (y16 - y32).abs().max() > 0  # the FFN itself did run in bf16
    (index32, gate32), (index16, gate16) = seen
    assert torch.equal(index16, index32) and torch.equal(gate16, gate32)
    assert gate16.dtype == torch.float32
    assert torch.equal(layer.aux.stats["block_usage"], usage32)


def test_infmoe_under_bf16_autocast_draws_the_noise_in_fp32():
    torch.manual_seed(0)
    layer = InfiniteMoE(64, 1024, d_z=16, units_per_block=8)
    x = torch.randn(256, 64)
    torch.manual_seed(1)
    fp32 = layer.select(x)
    torch.manual_seed(1)
    with bf16_autocast():
        bf16 = layer.select(x)
    assert torch.equal(bf16.index, fp32.index) and torch.equal(bf16.gate, fp32.gate)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_topk_under_bf16_autocast_chooses_the_fp32_experts(impl):
    torch.manual_seed(0)
    layer = TopKMoE(64, 1024, n_experts=64, top_k=2, impl=impl)
    x = torch.randn(512, 64)
    seen, choose = [], layer.choose_experts
    layer.choose_experts = lambda *args: seen.append(choose(*args)) or seen[-1]  # what forward chose
    layer(x)
    load32 = layer.aux.stats["expert_load"]
    with bf16_autocast():
        layer(x)
    fp32, bf16 = seen
    assert torch.equal(bf16.expert, fp32.expert)
    assert torch.equal(bf16.weight, fp32.weight)
    assert bf16.logits.dtype == torch.float32
    assert torch.equal(layer.aux.stats["expert_load"], load32)


@pytest.mark.parametrize("chunk_bytes", [1, None], ids=["chunk-per-group", "default-chunks"])
def test_grouped_ffn_under_bf16_autocast_sums_rows_in_fp32(chunk_bytes, monkeypatch):
    """Every token in each of 256 groups: y and dx are sums of 256 per-group parts, db1 of
    16 rows. With one group per chunk (what CPU chunking does at the gpt2-small shape) the
    parts of a token meet across chunks, in the accumulator. Against fp64 arithmetic on the
    same bf16-rounded inputs, an fp32 accumulator leaves the error of the bf16 parts (a
    few times one bf16 rounding of the result); a bf16 one adds a rounding at the scale of
    the running sum per addition (here 15x one rounding)."""
    if chunk_bytes is not None:
        monkeypatch.setattr(grouped, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    t, d, b, groups = 16, 16, 8, 256  # d, B multiples of 8: torch._grouped_mm runs in bf16
    token = torch.arange(t).repeat(groups)  # sorted by group: group i owns rows [i t, (i + 1) t)
    group = torch.arange(groups).repeat_interleave(t)
    counts = torch.full((groups,), t)
    x = torch.randn(t, d, generator=g)
    gate = torch.rand(t * groups, generator=g)
    w1 = torch.randn(groups, d, b, generator=g) / d**0.5
    b1 = torch.randn(groups, b, generator=g)
    w2 = torch.randn(groups, b, d, generator=g) / b**0.5
    dy = torch.randn(t, d, generator=g)

    fast = [p.clone().requires_grad_() for p in (x, b1)]
    with bf16_autocast():
        y = grouped_ffn(fast[0], token, counts, gate, w1, fast[1], w2)
    y.backward(dy.to(y.dtype))
    assert y.dtype == torch.bfloat16

    exact = [p.bfloat16().double().requires_grad_() for p in (x, b1)]
    gate64, w1_64, w2_64 = (p.bfloat16().double() for p in (gate, w1, w2))
    a = torch.einsum("rd,rdb->rb", exact[0][token], w1_64[group]) + exact[1][group]
    rows = (gate64[:, None] * F.gelu(a, approximate="tanh"))[:, None, :] @ w2_64[group]
    ref = torch.zeros(t, d, dtype=torch.float64).index_add(0, token, rows[:, 0])
    ref.backward(dy.bfloat16().double())

    def error(value, expected):
        return ((value.double() - expected).norm() / expected.norm()).item()

    one_rounding = error(ref.bfloat16(), ref)
    errors = {"y": error(y, ref), "dx": error(fast[0].grad, exact[0].grad),
              "db1": error(fast[1].grad, exact[1].grad)}
    assert max(errors.values()) < 3 * one_rounding, (errors, one_rounding)
