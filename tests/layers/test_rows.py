"""The decoding path (`infmoe.layers.rows`) equals the masked reference, for the GELU MLP
and the gated FFN, and is refused where gradients are needed."""

import pytest
import torch

from infmoe import ConfigError
from paths import D, GLU, TOL, infmoe, inputs


def forward(layer, impl, x, **kw):
    layer.impl = impl
    with torch.no_grad():
        return layer(x, **kw)


@pytest.mark.parametrize("glu", **GLU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gate", ["sigmoid", "softmax", "constant"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("units_per_block", [1, 4])
@pytest.mark.parametrize("tokens", [1, 3])
def test_rows_equal_masked(dtype, gate, k, units_per_block, tokens, glu):
    layer = infmoe(dtype, units_per_block=units_per_block, gate=gate, glu=glu)
    x, _, noise = inputs(dtype, k, t=tokens)
    ref = forward(layer, "masked", x, noise=noise)
    stats = dict(layer.aux.stats)
    fast = forward(layer, "rows", x, noise=noise)
    torch.testing.assert_close(fast, ref, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(layer.aux.stats["block_usage"], stats["block_usage"])


@pytest.mark.parametrize("glu", **GLU)
def test_rows_in_mean_mode_with_leading_shapes(glu):
    layer = infmoe(torch.float64, units_per_block=1, mode="mean", glu=glu)
    x = torch.randn(1, 1, D, dtype=torch.float64)
    torch.testing.assert_close(forward(layer, "rows", x), forward(layer, "masked", x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("glu", **GLU)
def test_rows_under_bf16_autocast_run_in_the_weights_dtype(glu):
    layer = infmoe(torch.float32, units_per_block=1, glu=glu)
    x, _, noise = inputs(torch.float32, 2, t=1)
    ref = forward(layer, "masked", x, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = forward(layer, "rows", x, noise=noise)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_rows_refuse_to_train():
    layer = infmoe(torch.float32, units_per_block=1, impl="rows")
    with pytest.raises(ConfigError, match="inference only"):
        layer(torch.randn(1, D))
