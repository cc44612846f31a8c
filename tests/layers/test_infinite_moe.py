import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import infmoe
from infmoe import GLU, ConfigError, DenseMLP, InfiniteMoE, sampling
from infmoe.layers.adaptive import adaptive_select
from infmoe.layers.routing import Route

D, H, DZ = 8, 24, 4


def make(**kw) -> InfiniteMoE:
    torch.manual_seed(0)
    opts = dict(d_z=DZ) | kw
    return InfiniteMoE(opts.pop("d_model", D), opts.pop("d_hidden", H), **opts).double()


def hidden_units(layer: InfiniteMoE, x: torch.Tensor) -> torch.Tensor:
    """x (d,) → the H hidden units before the mask, unit by unit: GELU(w_in[u] · x + b_in[u]);
    for the GLU, unit j of block b reads w_in's rows 2Bb + j (gate) and 2Bb + B + j (up)."""
    if not layer.glu:
        return F.gelu(layer.w_in @ x + layer.b_in, approximate="tanh")
    act = {"silu": F.silu, "gelu": lambda a: F.gelu(a, approximate="tanh")}[layer.activation]
    b = layer.units_per_block
    gate_row = [2 * b * (u // b) + u % b for u in range(layer.d_hidden)]
    up_row = [r + b for r in gate_row]
    pre = layer.w_in @ x + layer.b_in
    return act(pre[gate_row]) * pre[up_row]


def reference(layer: InfiniteMoE, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Slow per-token, per-sample, per-unit ∞-MoE written from the paper's formulas."""
    out = torch.empty_like(x)
    k_samples = noise.shape[0]
    for t in range(x.shape[0]):
        router = layer.router.weight @ x[t] + layer.router.bias
        mu, sigma = router[: layer.d_z], F.softplus(router[layer.d_z :]) + layer.sigma_min
        unit_weight = torch.zeros(layer.d_hidden, dtype=x.dtype)
        for k in range(k_samples):
            z = mu + sigma * noise[k, t]
            scores = layer.score.weight @ z + layer.score.bias
            kept = sorted(range(layer.n_blocks), key=lambda b: -scores[b].item())[: layer.n_kept]
            kept_scores = scores[kept]
            gates = {
                "sigmoid": torch.sigmoid(kept_scores),
                "softmax": torch.exp(kept_scores) / torch.exp(kept_scores).sum() * len(kept),
                "constant": torch.ones(len(kept), dtype=x.dtype),
            }[layer.gate]
            for b, gate in zip(kept, gates):
                for u in range(b * layer.units_per_block, (b + 1) * layer.units_per_block):
                    unit_weight[u] += gate / k_samples
        out[t] = layer.w_out.T @ (unit_weight * hidden_units(layer, x[t])) + layer.b_out
    return out


@pytest.mark.parametrize(
    "d_hidden,units_per_block,fraction",
    [(24, 1, 0.5), (24, 4, 0.5), (24, 3, 0.3), (10, 1, 0.3), (24, 1, 1.0), (24, 6, 0.01), (24, 2, 0.7)],
)
def test_keeps_exactly_ceil_fraction_of_blocks_per_sample(d_hidden, units_per_block, fraction):
    layer = make(d_hidden=d_hidden, units_per_block=units_per_block, active_fraction=fraction)
    n_blocks = d_hidden // units_per_block
    expected = math.ceil(Fraction(fraction).limit_denominator(1000) * n_blocks)
    assert layer.n_kept == expected
    x = torch.randn(50, D, dtype=torch.float64)
    index, gate = layer.select(x, torch.randn(3, 50, DZ, dtype=torch.float64))
    assert index.shape == (3, 50, expected)
    # distinct blocks within each sample, so the mask of one sample has exactly n_kept blocks
    assert (index.sort(dim=-1).values.diff(dim=-1) > 0).all()
    one_sample = layer.mean_mask(index[:1], gate[:1] * 3)
    assert ((one_sample != 0).sum(dim=-1) == expected).all()


def test_float_noise_does_not_inflate_the_kept_count():
    # 0.3 * 10 == 3.0000000000000004 in floating point; a naive ceil keeps 4 blocks.
    assert make(d_hidden=10, active_fraction=0.3).n_kept == 3


def test_k_sample_output_is_mean_of_one_sample_outputs_with_same_noise():
    layer = make(d_hidden=H, units_per_block=2)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    noise = torch.randn(4, 2, 7, DZ, dtype=torch.float64)
    together = layer(x, noise)
    separate = torch.stack([layer(x, noise[k : k + 1]) for k in range(4)]).mean(0)
    torch.testing.assert_close(together, separate, rtol=0, atol=1e-12)


# The large FFN: the paper's GELU MLP (the default), SwiGLU, GEGLU.
FFN_OPTIONS = dict(argvalues=[{}, dict(glu=True), dict(glu=True, activation="gelu")],
                   ids=["mlp", "swiglu", "geglu"])


@pytest.mark.parametrize("options", **FFN_OPTIONS)
@pytest.mark.parametrize("impl", ["sparse", "masked"])
@pytest.mark.parametrize("gate", ["sigmoid", "softmax", "constant"])
@pytest.mark.parametrize("units_per_block", [1, 4])
@pytest.mark.parametrize("k", [1, 3])
def test_matches_slow_per_unit_reference(units_per_block, k, gate, impl, options):
    layer = make(units_per_block=units_per_block, gate=gate, impl=impl, **options)
    assert layer.uses_sparse(k) == (impl == "sparse")
    x = torch.randn(6, D, dtype=torch.float64)
    noise = torch.randn(k, 6, DZ, dtype=torch.float64)
    torch.testing.assert_close(layer(x, noise), reference(layer, x, noise), rtol=0, atol=1e-12)


def test_constant_gate_reference_and_full_fraction_equals_dense_mlp_of_width_h():
    layer = make(active_fraction=1.0, gate="constant", n_samples=3)
    dense = DenseMLP(D, H).double()
    with torch.no_grad():
        dense.c_fc.weight.copy_(layer.w_in)
        dense.c_fc.bias.copy_(layer.b_in)
        dense.c_proj.weight.copy_(layer.w_out.T)
        dense.c_proj.bias.copy_(layer.b_out)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=1e-12)
    noise = torch.randn(2, 4, DZ, dtype=torch.float64)
    torch.testing.assert_close(layer(x[0, :4], noise), reference(layer, x[0, :4], noise), rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_glu_with_every_block_kept_and_a_constant_gate_is_the_dense_glu_of_width_h(activation):
    """The layout, checked against `GLU` (gate rows, then up rows, over all of H): block b's
    2B rows of w_in are its B gate rows, then its B up rows."""
    layer = make(active_fraction=1.0, gate="constant", units_per_block=4, glu=True, activation=activation)
    dense = GLU(D, H, activation=activation).double()
    with torch.no_grad():  # the init leaves the biases zero, which would hide their layout
        layer.b_in.normal_(0.0, 0.5)
    rows = layer.w_in.view(layer.n_blocks, 2, 4, D)  # (block, gate/up, unit, d)
    biases = layer.b_in.view(layer.n_blocks, 2, 4)
    with torch.no_grad():
        dense.c_fc.weight.copy_(torch.cat([rows[:, 0].reshape(H, D), rows[:, 1].reshape(H, D)]))
        dense.c_fc.bias.copy_(torch.cat([biases[:, 0].flatten(), biases[:, 1].flatten()]))
        dense.c_proj.weight.copy_(layer.w_out.T)
        dense.c_proj.bias.copy_(layer.b_out)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    for impl in ("masked", "full", "sparse"):
        layer.impl = impl
        torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=1e-12, msg=impl)


@pytest.mark.parametrize("options", **FFN_OPTIONS)
def test_active_parameters_and_flops_count_a_built_layers_parameters(options):
    """Exact accounting: with every block kept a token touches every parameter; at N a
    unit costs its rows of w_in and w_out and their biases, 2 d + 1 numbers (3 d + 2 for
    the GLU), and its matrices 2 · (2 or 3) · d FLOPs."""
    whole = make(active_fraction=1.0, units_per_block=4, **options)
    assert whole.active_parameters() == sum(p.numel() for p in whole.parameters())
    layer = make(units_per_block=4, **options)  # 6 blocks, 3 kept
    unit = (layer.w_in.numel() + layer.b_in.numel() + layer.w_out.numel()) / H
    assert unit == (3 * D + 2 if layer.glu else 2 * D + 1)
    rest = sum(p.numel() for p in layer.parameters()) - H * unit
    assert layer.active_parameters() == rest + 0.5 * H * unit
    assert layer.active_parameters(2) == pytest.approx(rest + 0.75 * H * unit)  # the union bound
    router, scores = 2 * D * 2 * DZ, 2 * DZ * 6
    matrices = 3 if layer.glu else 2
    assert layer.flops_per_token(1) == router + scores + 0.5 * 2 * matrices * D * H
    union = router + 2 * scores + 0.6 * 2 * matrices * D * H
    assert layer.flops_per_token(2, union=0.6) == pytest.approx(union)


def test_default_tiny_infmoe_layer_is_todays_layer():
    """Defaults unchanged: the named config's layer keeps today's parameters (names and
    shapes) and computes today's formula, y = W_out (m̄ ⊙ GELU(W_in x + b_in)) + b_out,
    written out here without the library's paths."""
    torch.manual_seed(0)
    layer = infmoe.build_model("tiny-infmoe", n_layer=1).ffn_layers()[0].double()
    d, h = layer.d_model, layer.d_hidden
    assert (layer.glu, layer.activation, layer.glu_activation) == (False, "gelu", None)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"router.weight": (2 * layer.d_z, d), "router.bias": (2 * layer.d_z,),
                      "score.weight": (layer.n_blocks, layer.d_z), "score.bias": (layer.n_blocks,),
                      "w_in": (h, d), "b_in": (h,), "w_out": (h, d), "b_out": (d,)}
    x = torch.randn(9, d, dtype=torch.float64)
    noise = torch.randn(1, 9, layer.d_z, dtype=torch.float64)
    mu, sigma = layer.router_distribution(x)
    scores = layer.score(mu + sigma * noise[0])
    top = scores.topk(layer.n_kept, dim=-1)
    mask = torch.zeros_like(scores).scatter(1, top.indices, torch.sigmoid(top.values))
    hidden = F.gelu(x @ layer.w_in.T + layer.b_in, approximate="tanh")
    expected = (mask.repeat_interleave(layer.units_per_block, 1) * hidden) @ layer.w_out + layer.b_out
    for impl in ("auto", "masked", "full", "sparse"):
        layer.impl = impl
        torch.testing.assert_close(layer(x, noise), expected, rtol=0, atol=1e-12, msg=impl)


def test_gradients_reach_mu_sigma_and_score_map():
    layer = make(units_per_block=3, n_samples=2)
    layer(torch.randn(10, D, dtype=torch.float64)).square().sum().backward()
    mu_rows, sigma_rows = layer.router.weight.grad[:DZ], layer.router.weight.grad[DZ:]
    for name, grad in [("mu", mu_rows), ("sigma", sigma_rows), ("score.weight", layer.score.weight.grad),
                       ("score.bias", layer.score.bias.grad), ("w_in", layer.w_in.grad), ("w_out", layer.w_out.grad)]:
        assert grad is not None and grad.abs().sum() > 0, name


def test_constant_gate_sends_no_gradient_to_router_without_kl():
    layer = make(gate="constant")
    layer(torch.randn(10, D, dtype=torch.float64)).sum().backward()
    assert layer.router.weight.grad is None or layer.router.weight.grad.abs().sum() == 0


def test_mean_mode_is_deterministic_and_sample_mode_is_not_unless_seeded():
    layer = make(n_samples=2)
    x = torch.randn(16, D, dtype=torch.float64)
    assert not torch.equal(layer(x), layer(x))
    torch.manual_seed(5)
    first = layer(x)
    torch.manual_seed(5)
    assert torch.equal(first, layer(x))
    layer.mode = "mean"
    assert torch.equal(layer(x), layer(x))
    # mean mode uses z = mu: identical to a sample with zero noise
    layer.mode = "sample"
    torch.testing.assert_close(layer(x, torch.zeros(1, 16, DZ, dtype=torch.float64)),
                               make(n_samples=2, mode="mean")(x), rtol=0, atol=1e-12)


def test_n_samples_and_mode_change_on_a_built_layer_and_context_manager_restores():
    layer = make()
    weights = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.n_samples = 4
    x = torch.randn(5, D, dtype=torch.float64)
    layer(x)
    assert layer.aux.stats["union_fraction"] > layer.n_kept / layer.n_blocks  # 4 masks, bigger union
    module = torch.nn.Sequential(layer)
    with sampling(module, n_samples=8, mode="mean"):
        assert (layer.n_samples, layer.mode) == (8, "mean")
    assert (layer.n_samples, layer.mode) == (4, "sample")
    with pytest.raises(ConfigError, match="n_samples"):
        with sampling(module, n_samples=0):
            pass
    assert layer.n_samples == 4
    for k, v in layer.state_dict().items():
        assert torch.equal(v, weights[k])


def test_kl_term_matches_torch_distributions():
    layer = make(kl_weight=0.25)
    x = torch.randn(9, D, dtype=torch.float64)
    layer(x)
    mu, sigma = layer.router_distribution(x)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)
    ).sum(-1).mean()
    torch.testing.assert_close(layer.aux.loss, 0.25 * expected)
    assert make(kl_weight=0.0).aux.loss is None


def chosen_by_sets(index: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(T, n_blocks) float: 1 where any of a token's K samples kept the block, from the
    selection's index (K, T, n_kept) one token at a time with Python sets."""
    rows = []
    for t in range(index.shape[1]):
        union = set(index[:, t].flatten().tolist())
        rows.append([float(b in union) for b in range(n_blocks)])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3])
def test_stats_describe_the_last_call(k):
    layer = make(units_per_block=2, n_samples=k)
    x = torch.randn(40, D, dtype=torch.float64)
    noise = torch.randn(k, 40, DZ, dtype=torch.float64)
    layer(x, noise)
    stats = layer.aux.stats
    chosen = chosen_by_sets(layer.select(x, noise).index, layer.n_blocks)
    assert stats["union_fraction"].item() == pytest.approx(chosen.mean().item(), abs=1e-7)
    torch.testing.assert_close(stats["block_usage"], chosen.mean(0).float(), rtol=0, atol=1e-7)
    assert stats["used_fraction"].item() == pytest.approx((chosen.sum(0) > 0).double().mean().item())
    assert (k > 1) == (stats["union_fraction"] > layer.n_kept / layer.n_blocks)  # K masks overlap only partly
    assert stats["sigma_mean"] > layer.sigma_min
    assert not any(v.requires_grad for v in stats.values())


def test_sample_disagreement_is_the_share_of_blocks_two_samples_do_not_share():
    layer = make(units_per_block=2)
    x = torch.randn(40, D, dtype=torch.float64)
    layer(x)
    stats = layer.aux.stats
    # the same draws from the statistic's own generator, through `select` (topk indices)
    noise = torch.randn((2, 40, DZ), generator=torch.Generator().manual_seed(0)).double()
    index = layer.select(x, noise).index
    shared = [len(set(index[0, t].tolist()) & set(index[1, t].tolist())) for t in range(40)]
    expected = 1 - sum(shared) / (40 * layer.n_kept)
    assert stats["sample_disagreement"].item() == pytest.approx(expected, abs=1e-6)
    assert 0 < expected < 1
    mu, sigma = layer.router_distribution(x)
    assert stats["sigma_over_mu"].item() == pytest.approx((sigma.mean() / mu.square().mean().sqrt()).item())


def test_sample_disagreement_spans_collapsed_to_unrelated_samples():
    layer = make(d_hidden=128, units_per_block=1)
    mu = torch.randn(200, DZ, dtype=torch.float64)
    collapsed = Route.gaussian(mu, torch.full_like(mu, 1e-9))
    assert layer.sample_disagreement(collapsed).item() == 0  # σ collapsed: K buys nothing
    noise_only = layer.sample_disagreement(Route.gaussian(torch.zeros_like(mu), torch.full_like(mu, 1e3)))
    noise_only = noise_only.item()
    assert noise_only == pytest.approx(1 - layer.n_kept / layer.n_blocks, abs=0.03)  # two unrelated masks


def test_sample_disagreement_leaves_the_random_stream_alone():
    layer = make()
    x = torch.randn(500, D, dtype=torch.float64)  # more tokens than it measures on
    layer(x)
    state = torch.get_rng_state()
    assert 0 < layer.aux.stats["sample_disagreement"].item() < 1
    assert torch.equal(torch.get_rng_state(), state)


def test_mu_norm_routes_with_mu_at_the_priors_scale():
    plain, normed = make(units_per_block=2), make(units_per_block=2, mu_norm=True)  # same weights
    x = torch.randn(30, D, dtype=torch.float64) * 50  # a large μ, as trained routers grow
    raw_mu, raw_sigma = F.linear(x, plain.router.weight, plain.router.bias).chunk(2, dim=-1)
    mu, sigma = plain.router_distribution(x)
    assert torch.equal(mu, raw_mu)  # off: the paper's router, untouched
    mu_n, sigma_n = normed.router_distribution(x)
    torch.testing.assert_close(mu_n.square().mean(-1), torch.ones(30, dtype=torch.float64), rtol=1e-4, atol=0)
    torch.testing.assert_close(mu_n, mu / mu.square().mean(-1, keepdim=True).sqrt(), rtol=1e-4, atol=0)
    assert torch.equal(sigma_n, sigma)
    noise = torch.randn(2, 30, DZ, dtype=torch.float64)
    scores = normed.score(mu_n + sigma_n * noise)
    expected = scores.topk(normed.n_kept, dim=-1).indices.sort(-1).values
    assert torch.equal(normed.select(x, noise).index.sort(-1).values, expected)
    # relative to μ, the same σ is now far more noise: two samples disagree more
    assert normed.sample_disagreement(Route.gaussian(mu_n, sigma_n)) > plain.sample_disagreement(
        Route.gaussian(mu, sigma))
    with pytest.raises(ConfigError, match="mu_norm"):
        make(mu_norm=1)


def test_train_samples_draw_k_for_each_training_forward_only():
    layer = make(units_per_block=2, train_samples=[1, 4])
    x = torch.randn(50, D, dtype=torch.float64)
    unions = set()
    for _ in range(30):
        layer(x)
        unions.add(round(layer.aux.stats["union_fraction"].item(), 6))
    assert 0.5 in unions and max(unions) > 0.5  # K = 1 keeps exactly N = 50%; K = 4 more
    assert len(unions) > 2  # K = 4's unions vary from call to call, K = 1's never
    layer.eval()
    for _ in range(5):
        layer(x)
        # inference: n_samples = 1 keeps exactly N; fp32 rounds the mean of 12 per-block shares
        assert layer.aux.stats["union_fraction"].item() == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ConfigError, match="n_samples=0 is invalid"):
        layer.n_samples = 0
    with pytest.raises(ConfigError, match="train_samples"):
        make(train_samples=[1, 0])
    with pytest.raises(ConfigError, match="n_samples=0 is invalid"):
        layer.n_samples = 0
    with pytest.raises(ConfigError, match="train_samples"):
        make(train_samples="1,2")


def test_recipes_off_change_nothing_bit_for_bit():
    x = torch.randn(50, D, dtype=torch.float64)
    outputs = []
    for options in ({}, dict(mu_norm=False, train_samples=(), kl_free=0.0, n_components=1)):
        layer = make(units_per_block=2, n_samples=2, **options)
        torch.manual_seed(1)
        y = layer(x)
        y.sum().backward()
        outputs.append((y, layer.router.weight.grad, torch.get_rng_state()))
    (y0, g0, rng0), (y1, g1, rng1) = outputs
    assert torch.equal(y0, y1) and torch.equal(g0, g1) and torch.equal(rng0, rng1)


def test_flops_per_token_counts_router_scores_and_the_blocks_computed():
    layer = make(units_per_block=4)  # 6 blocks, 3 kept per sample
    router, scores, whole = 2 * D * 2 * DZ, 2 * DZ * 6, 2 * 2 * D * H
    assert layer.flops_per_token(1) == router + scores + 0.5 * whole
    assert layer.flops_per_token(2) == pytest.approx(router + 2 * scores + 0.75 * whole)  # the union bound
    assert layer.flops_per_token(2, union=0.6) == pytest.approx(router + 2 * scores + 0.6 * whole)
    layer.impl = "sparse"  # runs the union
    assert layer.flops_per_token(2, union=0.6, executed=True) == pytest.approx(
        router + 2 * scores + 0.6 * whole)
    layer.impl = "masked"  # runs all of H
    assert layer.flops_per_token(2, union=0.6, executed=True) == pytest.approx(router + 2 * scores + whole)
    assert layer.flops_per_token(2, union=0.6) == pytest.approx(router + 2 * scores + 0.6 * whole)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("impl", ["masked", "full", "sparse"])
def test_flops_per_token_is_what_the_matmuls_of_a_forward_do(impl, glu):
    """Against torch's count of the matmuls a training forward runs, with a mixture router
    (C = 3 components: C · (2 d_z + 1) router outputs) and K = 2: all of H on the masked and
    full paths, the measured union on the sparse one."""
    layer = make(units_per_block=4, n_components=3, glu=glu, n_samples=2, impl=impl)
    x = torch.randn(10, D, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    union = float(layer.aux.stats["union_fraction"])
    computed = union if impl == "sparse" else 1.0
    assert layer.aux.path == impl
    assert counter.get_total_flops() == pytest.approx(10 * layer.flops_per_token(2, union=computed))
    assert counter.get_total_flops() == pytest.approx(10 * layer.flops_per_token(2, union=union, executed=True))


def test_any_leading_shape():
    layer = make()
    for shape in [(D,), (3, D), (2, 3, D), (2, 1, 3, D)]:
        assert layer(torch.randn(shape, dtype=torch.float64)).shape == shape


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(units_per_block=5), "units_per_block"),
        (dict(units_per_block=0), "units_per_block"),
        (dict(active_fraction=0.0), "active_fraction"),
        (dict(active_fraction=1.5), "active_fraction"),
        (dict(active_fraction=-0.1), "active_fraction"),
        (dict(n_samples=0), "n_samples"),
        (dict(n_samples=2.5), "n_samples"),
        (dict(mode="median"), "mode"),
        (dict(gate="relu6"), "gate"),
        (dict(d_z=0), "d_z"),
        (dict(sigma_min=-1.0), "sigma_min"),
        (dict(kl_weight=-1.0), "kl_weight"),
        (dict(impl="fast"), "impl"),
        (dict(glu="yes"), "glu"),
        (dict(activation="silu"), "activation"),  # the MLP is GELU's
        (dict(glu=True, activation="relu"), "activation"),
    ],
)
def test_bad_options_raise_one_clear_error_at_construction(kwargs, field):
    with pytest.raises(ConfigError) as err:
        make(**kwargs)
    message = str(err.value)
    assert message.startswith(field + "=") and "\n" not in message


def test_bad_values_rejected_on_a_built_layer():
    layer = make()
    with pytest.raises(ConfigError, match="'sample', 'mean'"):
        layer.mode = "greedy"
    with pytest.raises(ConfigError, match="n_samples"):
        layer.n_samples = -1
    assert (layer.n_samples, layer.mode) == (1, "sample")


def test_kl_free_penalises_each_tokens_kl_only_beyond_the_allowance():
    x = torch.randn(40, D, dtype=torch.float64) * 3
    plain, free = make(kl_weight=0.5), make(kl_weight=0.5, kl_free=0.5)  # same weights
    plain(x), free(x)
    mu, sigma = plain.router_distribution(x)
    per_token = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)).sum(-1)
    assert (per_token < 0.5).any() and (per_token > 0.5).any()  # the case has tokens on both sides
    torch.testing.assert_close(plain.aux.loss, 0.5 * per_token.mean())
    torch.testing.assert_close(free.aux.loss, 0.5 * (per_token - 0.5).clamp_min(0).mean())
    # a token under its allowance gets no gradient from the term
    xs = x.clone().requires_grad_()
    free(xs)
    free.aux.loss.backward()
    below = per_token < 0.5
    assert (xs.grad[below] == 0).all() and (xs.grad[~below] != 0).any()
    with pytest.raises(ConfigError, match="kl_free"):
        make(kl_free=-1.0)


def two_mode_layer(pi: tuple[float, ...], **kw) -> InfiniteMoE:
    """A mixture router whose components do not depend on x: component c has μ_c = 4 e_c
    (far apart), a tiny σ, and weight pi[c]."""
    c = len(pi)
    layer = make(d_hidden=32, units_per_block=1, n_components=c, sigma_min=0.0, **kw)
    with torch.no_grad():
        layer.router.weight.zero_()
        bias = torch.full((c, 2, DZ), -30.0, dtype=torch.float64)  # pre-softplus σ → σ ≈ 1e-13
        bias[:, 0] = 0
        for i in range(c):
            bias[i, 0, i] = 4.0
        layer.router.bias.copy_(torch.cat([bias.flatten(), torch.tensor(pi, dtype=torch.float64).log()]))
    return layer


def test_mixture_router_draws_each_samples_component_with_probability_pi():
    layer = two_mode_layer((0.6, 0.3, 0.1))
    assert layer.router.out_features == 3 * 2 * DZ + 3
    x = torch.randn(4000, D, dtype=torch.float64)
    route = layer.route(x)
    z = layer.sample_z(route, 1)
    nearest = torch.cdist(z[0], route.mu[0]).argmin(-1)  # which component each sample came from
    share = torch.bincount(nearest, minlength=3).double() / 4000
    torch.testing.assert_close(share, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(z[0], route.mu[0][nearest], atol=1e-9, rtol=0)  # z = μ_c + σ_c ε, σ tiny
    mean, std = layer.router_distribution(x[:1])
    torch.testing.assert_close(mean[0], (torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)[:, None]
                                         * route.mu[0]).sum(0))
    torch.testing.assert_close(mean[0], z[0].mean(0), atol=0.1, rtol=0)
    torch.testing.assert_close(std[0], z[0].std(0), atol=0.05, rtol=0)
    layer.mode = "mean"
    torch.testing.assert_close(layer.sample_z(layer.route(x[:5]), 1)[0], route.mu[:5, 0])  # the most probable mode
    with pytest.raises(ConfigError, match="n_components"):
        make(n_components=0)


def test_mixture_samples_of_one_token_disagree_where_one_gaussian_cannot():
    mixture = two_mode_layer((0.5, 0.5))
    x = torch.randn(100, D, dtype=torch.float64)
    mixture(x)
    stats = mixture.aux.stats
    # σ ≈ 0, so one Gaussian's two samples are one mask; the mixture's differ in half the tokens
    moments = Route.gaussian(*mixture.router_distribution(x))
    assert mixture.sample_disagreement(moments).item() > 0  # its moments are wide
    single = make(d_hidden=32, units_per_block=1, sigma_min=0.0)
    with torch.no_grad():
        single.router.weight.zero_()
        single.router.bias.copy_(mixture.router.bias[: 2 * DZ])
    single(x)
    assert single.aux.stats["sample_disagreement"].item() == 0
    assert 0.1 < stats["sample_disagreement"].item() < 0.9
    assert stats["component_entropy"].item() == pytest.approx(math.log(2))
    assert "component_entropy" not in single.aux.stats


def test_mixture_kl_is_the_joint_kl_from_a_uniform_component_prior():
    layer = make(n_components=3, kl_weight=1.0)
    x = torch.randn(20, D, dtype=torch.float64)
    layer(x)
    route = layer.route(x)
    pi = route.log_pi.exp()
    normal = torch.distributions.kl_divergence(
        torch.distributions.Normal(route.mu, route.sigma), torch.distributions.Normal(0.0, 1.0)).sum(-1)
    categorical = torch.distributions.kl_divergence(
        torch.distributions.Categorical(probs=pi), torch.distributions.Categorical(probs=torch.full_like(pi, 1 / 3)))
    torch.testing.assert_close(layer.aux.loss, (categorical + (pi * normal).sum(-1)).mean())


def test_mixture_weights_learn_in_training_only():
    layer = make(n_components=2, units_per_block=2)
    x = torch.randn(30, D, dtype=torch.float64)
    logits_rows = slice(2 * 2 * DZ, None)
    layer(x).square().sum().backward()
    assert layer.router.weight.grad[logits_rows].abs().sum() > 0  # straight-through Gumbel-softmax
    layer.zero_grad()
    layer.eval()
    layer(x).square().sum().backward()
    assert layer.router.weight.grad[logits_rows].abs().sum() == 0  # hard draws only


@pytest.mark.parametrize("impl", ["full", "sparse", "masked"])
def test_mixture_router_takes_every_path_alike(impl):
    layer = make(n_components=3, units_per_block=2, n_samples=3)
    x = torch.randn(25, D, dtype=torch.float64)
    noise = torch.randn(3, 25, DZ, dtype=torch.float64)
    outputs = []
    for which in ("masked", impl):
        layer.impl = which
        torch.manual_seed(5)  # the component draws
        outputs.append(layer(x, noise))
    torch.testing.assert_close(outputs[1], outputs[0])


def test_adaptive_keep_draws_while_samples_still_grow_the_union():
    layer = make(d_hidden=6, units_per_block=1, active_fraction=1 / 3)  # 6 blocks, 2 kept
    index = torch.tensor([  # (K = 4, T = 3, 2)
        [[0, 1], [0, 1], [0, 1]],
        [[1, 0], [2, 3], [1, 2]],  # token 0 repeats itself; tokens 1 and 2 grow
        [[0, 1], [4, 5], [2, 0]],  # token 2 adds nothing: averaged in, and it stops
        [[2, 3], [5, 4], [3, 4]],  # token 1 adds nothing only now
    ])
    keep = layer.adaptive_keep(index)
    assert keep.T.tolist() == [[True, True, False, False], [True, True, True, True], [True, True, True, False]]
    assert layer.adaptive_keep(index[:1]).tolist() == [[True, True, True]]  # K = 1: one sample each


@pytest.mark.parametrize("options", **FFN_OPTIONS)
def test_adaptive_mode_averages_each_tokens_own_k_on_every_path(options):
    layer = make(units_per_block=2, n_samples=6, sigma_min=0.3, **options)  # noise wide enough to move masks
    x = torch.randn(30, D, dtype=torch.float64)
    noise = torch.randn(6, 30, DZ, dtype=torch.float64)
    keep = layer.adaptive_keep(layer.select(x, noise).index)
    counts = keep.sum(0)
    assert counts.min() >= 2 and counts.max() > counts.min()  # tokens chose different K
    # token t in adaptive mode = token t alone in sample mode with its first K_t draws
    expected = torch.cat([layer(x[t:t + 1], noise[: int(counts[t]), t:t + 1]) for t in range(30)])
    layer.mode = "adaptive"
    # the rounds drawn only for the tokens still drawing keep what the all-at-once rule keeps
    rounds = adaptive_select(layer, x, noise)[3]
    assert rounds.shape[0] == counts.max() and torch.equal(rounds, keep[: rounds.shape[0]])
    assert not keep[rounds.shape[0]:].any()
    for impl in ("masked", "sparse", "rows", "auto"):
        layer.impl = impl
        with torch.no_grad():
            torch.testing.assert_close(layer(x, noise), expected)
        assert layer.aux.stats["samples_used"].item() == pytest.approx(counts.double().mean().item())
    layer.impl = "auto"
    y = layer(x, noise)  # trains, too
    y.sum().backward()
    assert layer.w_in.grad.abs().sum() > 0 and layer.score.weight.grad.abs().sum() > 0


def test_adaptive_mode_settles_at_one_samples_blocks_when_samples_agree():
    layer = make(d_hidden=64, units_per_block=1, n_samples=16, sigma_min=0.0, mode="adaptive")
    with torch.no_grad():
        layer.router.bias[DZ:] = -30.0  # σ ≈ 1e-13: a collapsed router
    x = torch.randn(40, D, dtype=torch.float64)
    layer(x)
    stats = layer.aux.stats
    assert stats["samples_used"].item() == 2  # the first check ends every draw
    assert stats["union_fraction"].item() == pytest.approx(0.5)  # at K = 1's cost
    with torch.no_grad():
        layer.router.bias[DZ:] = 30.0  # σ ≈ 30: unrelated masks, until their union holds every unit
    layer(x)
    assert layer.aux.stats["samples_used"].item() > 4
    assert layer.aux.stats["union_fraction"].item() > 0.9


def test_upcycling_refuses_a_gated_infmoe():
    """A dense GELU MLP's rows are not a GLU's gate and up rows: no silent nonsense."""
    from infmoe.hf import upcycle_to_infmoe
    from infmoe.models import GPT, GPTConfig

    dense = GPT(GPTConfig(vocab_size=50, n_ctx=8, n_layer=1, n_head=2, d_model=16))
    with pytest.raises(ConfigError) as err:
        upcycle_to_infmoe(dense, d_z=4, glu=True)
    assert str(err.value).startswith("glu=True") and "\n" not in str(err.value)


def test_block_size_is_the_old_name_of_units_per_block(monkeypatch):
    """`InfiniteMoE.RENAMED_OPTIONS`: the old keyword and attribute still work, each warning
    once; the signature (the options a config may set) has the new name only."""
    from infmoe.deprecation import RenamedWarning
    from infmoe.layers import ffn_option_names

    monkeypatch.setattr("infmoe.deprecation._warned", set())
    with pytest.warns(RenamedWarning, match="block_size is now units_per_block"):
        old = make(block_size=4)
    new, x = make(units_per_block=4), torch.randn(5, D, dtype=torch.float64)
    noise = torch.randn(1, 5, DZ, dtype=torch.float64)
    assert old.units_per_block == 4 and torch.equal(old(x, noise), new(x, noise))
    with pytest.warns(RenamedWarning, match="InfiniteMoE.block_size is now InfiniteMoE.units_per_block"):
        assert old.block_size == 4
    with pytest.raises(ConfigError, match="give only units_per_block"):
        make(block_size=4, units_per_block=4)
    assert "units_per_block" in ffn_option_names("infmoe") and "block_size" not in ffn_option_names("infmoe")


def test_k_is_bounded_on_the_layer_itself():
    from infmoe.layers.infinite_moe import MAX_SAMPLES

    layer = InfiniteMoE(8, 16, d_z=2, units_per_block=4)
    layer.n_samples = MAX_SAMPLES
    for bad in (MAX_SAMPLES + 1, 10**9):
        with pytest.raises(ConfigError, match=f"K must be >= 1 and at most {MAX_SAMPLES}"):
            layer.n_samples = bad
    with pytest.raises(ConfigError, match="n_samples=0 is invalid"):
        layer.n_samples = 0
    with pytest.raises(ConfigError, match="train_samples"):
        InfiniteMoE(8, 16, d_z=2, units_per_block=4, train_samples=[1, MAX_SAMPLES + 1])
