import math
from collections import Counter
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from dispatch_count import count_data_dependent_ops
from infmoe import ConfigError, TopKMoE
from infmoe.layers.dispatch import plan_device
from infmoe.layers.grouped import grouped_mm_contract

D, E = 6, 4


def make(**kw) -> TopKMoE:
    torch.manual_seed(0)
    return TopKMoE(D, kw.pop("d_hidden", 4 * E), **(dict(n_experts=E, top_k=2) | kw)).double()


def expert(layer: TopKMoE, e: int, x: torch.Tensor) -> torch.Tensor:
    h = F.gelu(x @ layer.w_in[e] + layer.b_in[e], approximate="tanh")
    return h @ layer.w_out[e] + layer.b_out[e]


def test_k_equals_e_is_the_softmax_weighted_sum_of_all_experts():
    layer = make(top_k=E)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    probs = (x @ layer.router.weight.T).softmax(-1)
    expected = sum(probs[..., e : e + 1] * expert(layer, e, x) for e in range(E))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_top_k_matches_a_per_token_reference():
    layer = make(top_k=2, n_experts=E)
    x = torch.randn(17, D, dtype=torch.float64)
    logits = x @ layer.router.weight.T
    expected = torch.zeros_like(x)
    for t in range(17):
        top = sorted(range(E), key=lambda e: -logits[t, e].item())[:2]
        weights = torch.softmax(logits[t, top], 0)  # softmax over the chosen k, renormalised
        for w, e in zip(weights, top):
            expected[t] += w * expert(layer, e, x[t : t + 1])[0]
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_load_balance_and_z_loss_match_hand_computation():
    # E = 2, k = 1, router = identity, so each row of x is its logits.
    layer = TopKMoE(2, 4, n_experts=2, top_k=1, load_balance_weight=1.0, z_loss_weight=0.0).double()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    ln3 = math.log(3)
    x = torch.tensor([[ln3, 0.0], [0.0, ln3], [ln3, 0.0], [ln3, 0.0]], dtype=torch.float64)
    layer(x)
    # probs: [.75,.25], [.25,.75], [.75,.25], [.75,.25] -> routed to 0,1,0,0: f = [3/4, 1/4]
    # P = mean probs = [.625, .375]; loss = E * sum f*P = 2 * (.75*.625 + .25*.375) = 1.125
    assert layer.aux.stats["load_balance"].item() == pytest.approx(1.125, abs=1e-12)
    assert layer.aux.loss.item() == pytest.approx(1.125, abs=1e-12)
    # every row has logsumexp = ln(3 + 1) = ln 4
    assert layer.aux.stats["z_loss"].item() == pytest.approx(math.log(4) ** 2, abs=1e-12)
    assert layer.aux.stats["expert_load"].tolist() == [0.75, 0.25]


def test_balanced_routing_gives_load_balance_loss_one():
    layer = TopKMoE(2, 4, n_experts=2, top_k=1).double()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    layer(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert layer.aux.stats["load_balance"].item() == pytest.approx(1.0, abs=1e-12)


def test_dropless_by_default_and_capacity_drops_in_token_order():
    layer = make(top_k=1)
    with torch.no_grad():  # send every token to expert 0
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(1.0)
    x = torch.rand(8, D, dtype=torch.float64) + 0.1
    full = layer(x)
    assert layer.aux.stats["dropped_fraction"] == 0
    capped = make(top_k=1, capacity_factor=1.0)  # capacity ceil(1 * 8 * 1 / 4) = 2 tokens
    capped.load_state_dict(layer.state_dict())
    out = capped(x)
    torch.testing.assert_close(out[:2], full[:2], rtol=0, atol=1e-12)
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
    assert capped.aux.stats["dropped_fraction"].item() == pytest.approx(6 / 8)


def test_gradients_reach_router_and_experts():
    layer = make()
    layer(torch.randn(12, D, dtype=torch.float64)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_routed_scale_multiplies_the_output_and_leaves_routing_alone(impl):
    x = torch.randn(20, D, dtype=torch.float64)
    plain, scaled = make(impl=impl), make(impl=impl, routed_scale=2.5)
    y = scaled(x)
    torch.testing.assert_close(y, 2.5 * plain(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(scaled.aux.stats["expert_load"], plain.aux.stats["expert_load"])
    assert scaled.choose_experts(x).weight.sum(-1).sub(2.5).abs().max() < 1e-12


def test_expert_weights_are_stacked_tensors():
    layer = make()
    assert layer.w_in.shape == (E, D, 4) and layer.w_out.shape == (E, 4, D)
    assert not any(isinstance(m, torch.nn.ModuleList) for m in layer.modules())


def test_stats_and_aux_loss_weights():
    layer = make(load_balance_weight=0.5, z_loss_weight=0.25)
    layer(torch.randn(30, D, dtype=torch.float64))
    s = layer.aux.stats
    torch.testing.assert_close(layer.aux.loss, 0.5 * s["load_balance"] + 0.25 * s["z_loss"])
    assert s["expert_load"].sum().item() == pytest.approx(1.0)
    assert make(load_balance_weight=0.0, z_loss_weight=0.0).aux.loss is None


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(n_experts=5), "n_experts"),
        (dict(top_k=5), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(load_balance_weight=-1.0), "load_balance_weight"),
        (dict(impl="masked"), "impl"),
        (dict(routed_scale=0.0), "routed_scale"),
    ],
)
def test_bad_options_raise_one_clear_error(kwargs, field):
    with pytest.raises(ConfigError) as err:
        make(**kwargs)
    assert str(err.value).startswith(field + "=")


# --- the static plan (CUDA's, run on CPU tensors) -----------------------------------------

PLAN_OPTIONS = dict(argvalues=[{}, dict(capacity_factor=0.5)], ids=["dropless", "capacity"])


def static_layer(dtype=torch.float32, **kw) -> TopKMoE:
    """d = 16, B = 8: 16-byte aligned rows in bf16, so the grouped kernel takes them."""
    torch.manual_seed(0)
    layer = TopKMoE(16, 32, n_experts=4, top_k=2, **kw).to(dtype)
    layer.reset_parameters(std=0.3)
    return layer


def step(layer: TopKMoE, x: torch.Tensor, dy: torch.Tensor, forward=None) -> dict[str, torch.Tensor]:
    """Output, gradients, aux loss and stats of one forward+backward (of `forward`, by
    default the layer's own)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = (layer if forward is None else forward)(x)
    y.backward(dy)
    grads = {f"grad {n}": p.grad for n, p in layer.named_parameters()}
    return {"y": y.detach(), "grad x": x.grad, "loss": layer.aux.loss.detach()} | grads | layer.aux.stats


def step_inputs(dtype=torch.float32, t=37):
    g = torch.Generator().manual_seed(1)
    return torch.randn(t, 16, generator=g).to(dtype), torch.randn(t, 16, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", **PLAN_OPTIONS)
def test_static_plan_equals_the_host_plan(options, dtype):
    """Same output and gradients; the same aux loss and stats to the bit (the same counts)."""
    layer = static_layer(dtype, **options)
    host = step(layer, *step_inputs(dtype))
    if options:
        assert host["dropped_fraction"] > 0
    with plan_device("cuda"):
        static = step(layer, *step_inputs(dtype))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for key, value in host.items():
        bound = 0 if key in layer.aux.stats or key == "loss" else tol
        torch.testing.assert_close(static[key], value, rtol=bound, atol=bound, msg=key)


def test_static_plan_compiles_whole_with_backward():
    """fullgraph (no graph break) forward and backward, dropping over capacity; equals eager."""
    layer = static_layer(capacity_factor=0.5)
    eager = step(layer, *step_inputs())
    compiled = step(layer, *step_inputs(), forward=torch.compile(layer, backend="aot_eager", fullgraph=True))
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-kernel-contract"])
@pytest.mark.parametrize("options", **PLAN_OPTIONS)
def test_static_plan_reads_nothing_on_the_host(options, dtype):
    layer = static_layer(dtype, **options)
    x, dy = step_inputs(dtype)
    # the count sees what the host plan reads: bincount's shape, the counts, the kept rows
    host = count_data_dependent_ops(lambda: step(layer, x, dy))
    assert host["aten.bincount.default"] == 1 and host["Tensor.tolist"] >= 1
    with plan_device("cuda"), grouped_mm_contract() if dtype == torch.bfloat16 else nullcontext():
        assert count_data_dependent_ops(lambda: step(layer, x, dy)) == Counter()
