"""Shared by the tests that hold a fast path to its reference: one forward+backward of a
layer with a chosen impl, compared output by output and gradient by gradient."""

import torch

from infmoe import InfiniteMoE

D, DZ, T = 16, 4, 37  # T prime: per-block token counts divide into nothing convenient
TOL = {torch.float64: 1e-8, torch.float32: 1e-5}
# The large FFN of ∞-MoE: today's GELU MLP, and the gated one (SwiGLU by default), as
# ``@pytest.mark.parametrize("glu", **GLU)``.
GLU = dict(argvalues=[False, True], ids=["mlp", "glu"])


def run(layer: torch.nn.Module, impl: str, x: torch.Tensor, dy: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    """Output, input gradient and parameter gradients of one forward+backward with `impl`."""
    layer.impl = impl
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = layer(x, **kw)
    y.backward(dy)
    grads = {f"grad {n}": p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return {"y": y.detach(), "grad x": x.grad} | grads


def assert_same(fast: dict, ref: dict, tol: float) -> None:
    assert fast.keys() == ref.keys()
    for key, expected in ref.items():
        torch.testing.assert_close(fast[key], expected, rtol=tol, atol=tol, msg=key)


def infmoe(dtype, device="cpu", **kw) -> InfiniteMoE:
    torch.manual_seed(0)
    layer = InfiniteMoE(D, kw.pop("d_hidden", 48), d_z=DZ, **kw).to(device, dtype)
    layer.reset_parameters(std=0.3)  # O(1) activations, so the tolerances mean something
    with torch.no_grad():  # the init leaves the biases zero; a path that drops one must show it
        for bias in (layer.b_in, layer.b_out, layer.router.bias, layer.score.bias):
            bias.normal_(0.0, 0.3)
    return layer


def inputs(dtype, k: int, t: int = T, repeat_noise: bool = False, device="cpu"):
    """x, dy (t, D) and noise (k, t, DZ), drawn on the CPU (the same numbers on any device)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, D, generator=g, dtype=dtype)
    dy = torch.randn(t, D, generator=g, dtype=dtype)
    noise = torch.randn(k, t, DZ, generator=g, dtype=dtype)
    if repeat_noise:  # the first half of the tokens draw the same z K times: nothing new
        noise[:, : t // 2] = noise[:1, : t // 2]
    return x.to(device), dy.to(device), noise.to(device)


def assert_mean_mode_with_leading_shapes_match(impl: str, units_per_block: int, **kw) -> None:
    """`impl` equals the masked reference in mode "mean" on (2, 5, D) inputs, fp64; kw: more
    layer options."""
    layer = infmoe(torch.float64, units_per_block=units_per_block, mode="mean", **kw)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    dy = torch.randn(2, 5, D, dtype=torch.float64)
    assert_same(run(layer, impl, x, dy), run(layer, "masked", x, dy), 1e-8)
