import pytest
import torch
import torch.nn.functional as F

from infmoe import GLU, ConfigError, build_model, get_config


@pytest.mark.parametrize("activation, act", [("silu", F.silu), ("gelu", lambda h: F.gelu(h, approximate="tanh"))])
def test_is_the_gated_unit_of_shazeer_2020(activation, act):
    torch.manual_seed(0)
    glu = GLU(8, 12, activation=activation).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    w, b = glu.c_fc.weight, glu.c_fc.bias
    gate = x @ w[:12].T + b[:12]  # the first H rows gate, the next H rows carry
    up = x @ w[12:].T + b[12:]
    torch.testing.assert_close(glu(x), F.linear(act(gate) * up, glu.c_proj.weight, glu.c_proj.bias))
    assert glu.aux.loss is None and glu.aux.stats == {}


def test_accounting():
    glu = GLU(8, 32)
    assert glu.active_parameters() == sum(p.numel() for p in glu.parameters()) == 3 * 8 * 32 + 2 * 32 + 8
    assert glu.flops_per_token() == 2 * 3 * 8 * 32


def test_rejects_bad_options():
    with pytest.raises(ConfigError, match="activation='relu'"):
        GLU(8, 32, activation="relu")
    with pytest.raises(ConfigError, match="d_hidden=0"):
        GLU(8, 0)


@pytest.mark.parametrize("size", ["tiny", "gpt2-small"])
def test_glu_configs_hold_the_dense_models_parameters(size):
    glu, dense = get_config(f"{size}-glu"), get_config(f"{size}-dense")
    assert glu.ffn_hidden * 3 == dense.ffn_hidden * 2  # 2/3 of the width, three matrices
    with torch.device("meta"):
        n_glu, n_dense = (sum(p.numel() for p in build_model(c).parameters()) for c in (glu, dense))
    assert abs(n_glu / n_dense - 1) < 0.001  # only the gate's extra biases differ


def test_tiny_glu_trains_a_step():
    torch.manual_seed(0)
    model = build_model("tiny-glu", n_layer=1, vocab_size=64, n_ctx=16)
    idx = torch.randint(64, (2, 16))
    loss = model(idx, targets=idx).loss
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].ffn.c_fc.weight.grad.abs().sum() > 0
