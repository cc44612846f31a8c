import math
from collections import Counter
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dispatch_count import count_data_dependent_ops
from infmoe import ConfigError, TopKMoE
from infmoe.layers.dispatch import plan_device
from infmoe.layers.grouped import grouped_mm_contract

D, E = 6, 4


def make(**kw) -> TopKMoE:
    torch.manual_seed(0)
    return TopKMoE(D, kw.pop("d_hidden", 4 * E), **(dict(n_experts=E, top_k=2) | kw)).double()


def ffn(layer: TopKMoE, x, w_in, b_in, w_out, b_out) -> torch.Tensor:
    """One expert written out: x (..., d), w_in (d, B) or (d, 2B) = [gate | up] → (..., d)."""
    a = x @ w_in + b_in
    if not layer.glu:
        h = F.gelu(a, approximate="tanh")
    else:
        act = {"silu": F.silu, "gelu": lambda v: F.gelu(v, approximate="tanh")}[layer.activation]
        h = act(a[..., : layer.d_expert]) * a[..., layer.d_expert :]
    return h @ w_out + b_out


def expert(layer: TopKMoE, e: int, x: torch.Tensor) -> torch.Tensor:
    return ffn(layer, x, layer.w_in[e], layer.b_in[e], layer.w_out[e], layer.b_out[e])


def shared(layer: TopKMoE, x: torch.Tensor) -> torch.Tensor:
    """The S shared experts summed, each cut from the shared weights, the output bias once."""
    rows, b = layer.w_in.shape[-1], layer.d_expert
    y = layer.shared_out.bias
    for s in range(layer.shared_experts):
        w_in = layer.shared_in.weight[s * rows : (s + 1) * rows].T
        b_in = layer.shared_in.bias[s * rows : (s + 1) * rows]
        w_out = layer.shared_out.weight[:, s * b : (s + 1) * b].T
        y = y + ffn(layer, x, w_in, b_in, w_out, 0)
    return y


def reference(layer: TopKMoE, x: torch.Tensor) -> torch.Tensor:
    """A per-token loop over the chosen experts, x (T, d) → (T, d): routed (capacity dropping
    a token's assignment once its expert has taken `expert_capacity` earlier ones, in token
    order), plus the shared experts."""
    logits = x @ layer.router.weight.T
    capacity = layer.expert_capacity(len(x)) if layer.capacity_factor else len(x) * layer.top_k
    taken = [0] * layer.n_experts
    rows = []
    for t in range(len(x)):
        top = sorted(range(layer.n_experts), key=lambda e: -logits[t, e].item())[: layer.top_k]
        weights = torch.softmax(logits[t, top], 0) * layer.routed_scale  # renormalised over the k
        y = torch.zeros_like(x[t])
        for w, e in zip(weights, top):
            if taken[e] < capacity:
                y = y + w * expert(layer, e, x[t])
            taken[e] += 1
        rows.append(y + shared(layer, x[t]) if layer.shared_experts else y)
    return torch.stack(rows)


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
        (dict(glu="swiglu"), "glu"),
        (dict(glu=True, activation="relu"), "activation"),
        (dict(activation="silu"), "activation"),  # a SiLU MLP: GELU only
        (dict(shared_experts=-1), "shared_experts"),
        (dict(shared_experts=True), "shared_experts"),
        (dict(shared_experts=1), "n_experts"),  # 4 + 1 experts do not divide d_hidden = 16
    ],
)
def test_bad_options_raise_one_clear_error(kwargs, field):
    with pytest.raises(ConfigError) as err:
        make(**kwargs)
    assert str(err.value).startswith(field + "=")


# --- gated and shared experts ----------------------------------------------------------

KINDS = dict(argvalues=[{}, dict(glu=True), dict(glu=True, activation="gelu")],
             ids=["gelu", "swiglu", "geglu"])
# path → (impl, the plan it runs under): every way TopKMoE computes its experts
PATHS = {"host": ("grouped", nullcontext), "static": ("grouped", lambda: plan_device("cuda")),
         "loop": ("loop", nullcontext)}


def routed_and_shared(shared_experts: int = 0, **kw) -> TopKMoE:
    """A layer of E routed and S shared experts of width 4, weights large enough that the
    activations are far from linear."""
    layer = make(d_hidden=4 * (E + shared_experts), shared_experts=shared_experts, **kw)
    layer.reset_parameters(std=0.5)
    return layer


def grads(y: torch.Tensor, inputs: list[torch.Tensor], dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(y, inputs, dy)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("capacity", [None, 0.5], ids=["dropless", "capacity"])
@pytest.mark.parametrize("shared_experts", [0, 2], ids=["routed", "shared"])
@pytest.mark.parametrize("kind", **KINDS)
def test_every_path_equals_the_per_token_reference_forward_and_backward(kind, shared_experts, capacity, path):
    impl, plan = PATHS[path]
    layer = routed_and_shared(shared_experts, impl=impl, capacity_factor=capacity, **kind)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, D, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(13, D, generator=g, dtype=torch.float64)
    inputs = [x, *layer.parameters()]
    with plan():
        y = layer(x)
        got = grads(y, inputs, dy)
    assert (layer.aux.stats["dropped_fraction"] > 0) == (capacity is not None)
    expected = reference(layer, x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, got, grads(expected, inputs, dy), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=name)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("t", [1, 3], ids=["1-token", "3-tokens"])  # decoding's shapes
def test_fp32_on_decoding_shapes_equals_the_fp64_reference(t, path):
    impl, plan = PATHS[path]
    layer = routed_and_shared(2, impl=impl, glu=True).float()
    x = torch.randn(t, D, generator=torch.Generator().manual_seed(3), requires_grad=True)
    with plan():
        y = layer(x)
        got = grads(y, [x, *layer.parameters()], torch.ones_like(y))
    exact = routed_and_shared(2, glu=True)  # fp64
    exact.load_state_dict(layer.state_dict())
    x64 = x.detach().double().requires_grad_()
    expected = reference(exact, x64)
    torch.testing.assert_close(y, expected.float(), rtol=1e-5, atol=1e-5)
    for a, b in zip(got, grads(expected, [x64, *exact.parameters()], torch.ones_like(expected)), strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)


def test_shared_experts_leave_routing_and_the_auxiliary_losses_alone():
    """Shared experts are not routed: the same router gives the same choice, loss and stats."""
    plain, with_shared = routed_and_shared(0), routed_and_shared(2)
    with_shared.router.load_state_dict(plain.router.state_dict())
    x = torch.randn(30, D, dtype=torch.float64)
    plain(x), with_shared(x)
    assert torch.equal(with_shared.aux.loss, plain.aux.loss)
    for key, value in plain.aux.stats.items():
        assert torch.equal(with_shared.aux.stats[key], value), key


def test_default_options_build_the_layer_as_before():
    """Gated and shared experts leave the default layer as it was: its parameters (names,
    shapes, initial values from the same random draws) and GPT-2's GELU experts, bit for bit."""
    layer = make(impl="loop")
    torch.manual_seed(0)
    router = torch.nn.Linear(D, E, bias=False)  # drawn, then re-initialised, as before
    router_weight = router.weight.detach().normal_(0, 0.02)
    expected = {"w_in": torch.empty(E, D, 4).normal_(0, 0.02), "b_in": torch.zeros(E, 4),
                "w_out": torch.empty(E, 4, D).normal_(0, 0.02), "b_out": torch.zeros(E, D),
                "router.weight": router_weight}
    state = layer.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value.double()), key
    # the loop path as it was written before: GPT-2's GELU between two addmms per expert
    x = torch.randn(11, D, dtype=torch.float64)
    _, expert_index, weight = layer.choose_experts(x)
    rows, _, kept = layer.assign(expert_index, len(x))
    token, row_weight = rows // layer.top_k, weight.reshape(-1)[rows]
    old = torch.zeros_like(x)
    for e, (start, n) in enumerate(zip((torch.cumsum(kept, 0) - kept).tolist(), kept.tolist())):
        tok, w = token[start : start + n], row_weight[start : start + n, None]
        h = F.gelu(torch.addmm(layer.b_in[e], x[tok], layer.w_in[e]), approximate="tanh")
        old.index_add_(0, tok, torch.addmm(layer.b_out[e], h, layer.w_out[e]) * w)
    assert torch.equal(layer(x), old)


@pytest.mark.parametrize("shared_experts", [0, 2], ids=["routed", "shared"])
@pytest.mark.parametrize("kind", **KINDS)
def test_active_parameters_and_flops_count_what_a_token_uses(kind, shared_experts):
    layer = routed_and_shared(shared_experts, impl="loop", **kind)
    total = sum(p.numel() for p in layer.parameters())
    routed = sum(p.numel() for p in (layer.w_in, layer.b_in, layer.w_out, layer.b_out))
    assert layer.w_in.shape[-1] == (8 if kind else 4)  # a GLU's gate and up columns
    assert layer.active_parameters() == total - routed + routed * layer.top_k // E
    assert routed_and_shared(shared_experts, top_k=E, **kind).active_parameters() == total
    # FLOPs: the matmuls a token goes through (router, k experts, the shared ones), counted
    # by torch on the loop path, where each runs as its own matmul
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(10, D, dtype=torch.float64))
    assert counter.get_total_flops() == 10 * layer.flops_per_token()


def test_tiny_swiglu_and_shared_expert_shapes_match_tiny_moe():
    """The shapes for the grid's tiny baselines (d = 192) against tiny-moe's layer (8 of 192,
    top-4): SwiGLU experts at d_hidden 1024, and 4 shared + 28 routed experts of 48, top-12,
    hold as many weight-matrix entries, in total and active; biases and router rows differ
    by under 2%."""
    def matrices(layer: TopKMoE) -> tuple[int, int]:
        routed = layer.w_in.numel() + layer.w_out.numel()
        shared = 0
        if layer.shared_experts:
            shared = layer.shared_in.weight.numel() + layer.shared_out.weight.numel()
        return routed + shared, routed * layer.top_k // layer.n_experts + shared

    with torch.device("meta"):
        moe = TopKMoE(192, 1536, n_experts=8, top_k=4)
        swiglu = TopKMoE(192, 1024, n_experts=8, top_k=4, glu=True)
        fine = TopKMoE(192, 1536, n_experts=28, top_k=12, shared_experts=4)
    assert matrices(moe) == matrices(swiglu) == matrices(fine) == (8 * 2 * 192 * 192, 4 * 2 * 192 * 192)
    for layer in (swiglu, fine):
        total = sum(p.numel() for p in layer.parameters())
        assert total == pytest.approx(sum(p.numel() for p in moe.parameters()), rel=0.02)
        assert layer.active_parameters() == pytest.approx(moe.active_parameters(), rel=0.02)


# --- the static plan (CUDA's, run on CPU tensors) -----------------------------------------

PLAN_OPTIONS = dict(argvalues=[{}, dict(capacity_factor=0.5),
                               dict(capacity_factor=0.5, glu=True, shared_experts=2, d_hidden=48)],
                    ids=["dropless", "capacity", "swiglu-shared"])


def static_layer(dtype=torch.float32, **kw) -> TopKMoE:
    """d = 16, B = 8: 16-byte aligned rows in bf16, so the grouped kernel takes them."""
    torch.manual_seed(0)
    layer = TopKMoE(16, kw.pop("d_hidden", 32), n_experts=4, top_k=2, **kw).to(dtype)
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


@pytest.mark.parametrize("options", PLAN_OPTIONS["argvalues"][1:], ids=PLAN_OPTIONS["ids"][1:])
def test_static_plan_compiles_whole_with_backward(options):
    """fullgraph (no graph break) forward and backward, dropping over capacity; equals eager."""
    layer = static_layer(**options)
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
