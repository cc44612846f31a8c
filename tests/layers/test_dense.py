import pytest
import torch
import torch.nn.functional as F

from infmoe import ConfigError, DenseMLP


def test_is_gpt2_mlp():
    torch.manual_seed(0)
    mlp = DenseMLP(8, 32).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    h = 0.5 * (x @ mlp.c_fc.weight.T + mlp.c_fc.bias)
    h = h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (2 * h + 0.044715 * (2 * h) ** 3)))  # GELU (tanh)
    torch.testing.assert_close(mlp(x), F.linear(h, mlp.c_proj.weight, mlp.c_proj.bias))
    assert mlp.aux.loss is None and mlp.aux.stats == {}


def test_accounting():
    mlp = DenseMLP(8, 32)
    assert mlp.active_parameters() == sum(p.numel() for p in mlp.parameters()) == 8 * 32 * 2 + 32 + 8
    assert mlp.flops_per_token() == 2 * 2 * 8 * 32


def test_rejects_bad_width():
    with pytest.raises(ConfigError, match="d_hidden=0"):
        DenseMLP(8, 0)
