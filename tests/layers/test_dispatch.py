"""The one dispatch rule (`infmoe.layers.dispatch.choose_path`): what it picks on each plan,
that the path it names is the path that runs, that what cannot run raises, and that every
path it can name gives the reference's output and gradients on either plan."""

import pytest
import torch

from infmoe import ConfigError, InfiniteMoE
from infmoe.layers.dispatch import MAX_GROUPS, PATHS, choose_path, plan_device
from paths import GLU, TOL, assert_same, infmoe, inputs, run


def rule(layer: InfiniteMoE, plan: str, *, grad=True, tokens=4096, k=1, dtype=torch.float32) -> str:
    with plan_device(plan):
        return choose_path(layer, device=torch.device("cpu"), dtype=dtype, grad=grad, tokens=tokens, n_samples=k)


def wide(units_per_block: int, **kw) -> InfiniteMoE:
    return InfiniteMoE(64, 6144, d_z=8, units_per_block=units_per_block, **kw)


@pytest.mark.parametrize("units_per_block,k,host,static", [
    (1, 1, "full", "full"),  # per unit: at N = 50% the dense matmuls over all of H win
    (64, 1, "sparse", "grouped"),  # blocks: only the chosen ones
    (256, 2, "sparse", "full"),  # the host computes the union (0.75 of H); the static plan K · N = all of H
    (64, 4, "full", "full"),
])
def test_training_paths_per_plan(units_per_block, k, host, static):
    layer = wide(units_per_block)
    assert rule(layer, "cpu", k=k) == host
    assert rule(layer, "cuda", k=k, dtype=torch.bfloat16) == static


def test_decoding_reads_rows_on_the_host_and_gathers_on_the_static_plan():
    layer = wide(1)
    assert rule(layer, "cpu", grad=False, tokens=1) == "rows"
    assert rule(layer, "cuda", grad=False, tokens=1) == "gather"
    assert rule(layer, "cuda", grad=False, tokens=1, k=2) == "full"  # K · N of H is all of it
    assert rule(layer, "cpu", grad=False, tokens=512) == "full"


def test_the_softmax_gate_never_takes_the_fused_path():
    layer = wide(1, gate="softmax")
    assert rule(layer, "cpu") == rule(layer, "cuda") == "masked"
    layer.impl = "full"
    with pytest.raises(ConfigError, match="impl='full' is invalid"):
        rule(layer, "cpu")


def test_forced_paths_that_cannot_run_raise_instead_of_being_remapped():
    layer = wide(1, impl="rows")
    with pytest.raises(ConfigError, match="inference only"):
        rule(layer, "cpu")
    layer.impl = "sparse"  # 6144 groups: more than one grouped matmul may take
    assert rule(layer, "cpu") == "sparse"  # the host chunks them
    with pytest.raises(ConfigError, match=f"at most {MAX_GROUPS} groups") as err:
        rule(layer, "cuda", dtype=torch.bfloat16)
    assert "\n" not in str(err.value)
    assert rule(wide(64, impl="sparse"), "cuda") == "grouped"
    assert rule(wide(64, impl="rows"), "cuda", grad=False) == "gather"


def test_auto_never_plans_more_groups_than_a_grouped_matmul_takes():
    # 2048 blocks of 3 units, K = 1: sparse would pay by the cost model, but not in one call
    layer = InfiniteMoE(64, 6144, d_z=8, units_per_block=3, active_fraction=0.05)
    assert rule(layer, "cpu") == "sparse"
    assert rule(layer, "cuda") == "full"


@pytest.mark.parametrize("plan", ["cpu", "cuda"])
@pytest.mark.parametrize("units_per_block,k,grad", [(1, 1, True), (4, 1, True), (4, 2, True), (1, 1, False),
                                               (4, 3, False)])
def test_the_path_named_is_the_path_that_ran(plan, units_per_block, k, grad):
    layer = infmoe(torch.float32, units_per_block=units_per_block)
    x, _, noise = inputs(torch.float32, k, t=1 if not grad else 37)
    with plan_device(plan), torch.set_grad_enabled(grad):
        named = choose_path(layer, device=x.device, dtype=x.dtype, grad=grad, tokens=x.shape[0], n_samples=k)
        layer(x.requires_grad_(grad), noise=noise)
    assert layer.aux.path == named and named in PATHS


@pytest.mark.parametrize("glu", **GLU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("impl", ["full", "sparse"])
def test_cudas_plan_equals_the_reference_on_any_device(device, dtype, impl, k, glu):
    """The static plan's paths, forced, against "masked": the same numbers as the host's."""
    layer = infmoe(dtype, device, units_per_block=4, glu=glu)
    x, dy, noise = inputs(dtype, k, repeat_noise=True, device=device)
    ref = run(layer, "masked", x, dy, noise=noise)
    with plan_device("cuda"):
        fast = run(layer, impl, x, dy, noise=noise)
    assert layer.aux.path == {"full": "full", "sparse": "grouped"}[impl]
    assert_same(fast, ref, TOL[dtype])


@pytest.mark.parametrize("glu", **GLU)
@pytest.mark.parametrize("k", [1, 4])
def test_static_decoding_gathers_the_references_output(device, k, glu):
    layer = infmoe(torch.float64, device, units_per_block=4, glu=glu)
    x, _, noise = inputs(torch.float64, k, t=3, device=device)
    with torch.no_grad():
        layer.impl = "masked"
        ref = layer(x, noise=noise)
        layer.impl = "rows"
        with plan_device("cuda"):
            fast = layer(x, noise=noise)
    assert layer.aux.path == "gather"
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


def test_executed_flops_follow_the_path_of_the_device():
    layer = wide(256, n_samples=2)  # host: the union, 0.75 of H; static: K · N = all of H, the full path
    method = layer.flops_per_token(2)
    assert layer.flops_per_token(2, executed=True) == pytest.approx(method)
    full = layer.flops_per_token(2, union=1.0)
    assert layer.flops_per_token(2, executed=True, device="cuda", dtype=torch.bfloat16) == pytest.approx(full)


@pytest.mark.parametrize("glu", **GLU)
@pytest.mark.parametrize("k", [1, 3])
def test_static_decoding_reads_nothing_on_the_host(k, glu):
    """One decoding step of CUDA's plan: no per-token loop of `nonzero`s as the host's rows
    path has, nothing data-dependent at all; the host plan's rows path is seen reading."""
    from dispatch_count import count_data_dependent_ops

    layer = infmoe(torch.float32, units_per_block=4, n_samples=k, active_fraction=0.25, glu=glu).eval()  # K N < 1
    x = inputs(torch.float32, k, t=1)[0]
    with torch.no_grad(), plan_device("cuda"):
        assert not count_data_dependent_ops(lambda: layer(x))
    assert layer.aux.path == "gather"
    with torch.no_grad():
        assert count_data_dependent_ops(lambda: layer(x))
    assert layer.aux.path == "rows"
