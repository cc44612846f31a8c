"""Upcycling a dense GPT into ∞-MoE: H = 2 × width, first half copied, exact where it can be."""

from __future__ import annotations

import pytest
import torch

from infmoe.errors import ConfigError
from infmoe.hf import upcycle_to_infmoe
from infmoe.layers import sampling
from infmoe.models import GPT, GPTConfig

DENSE = GPTConfig(vocab_size=100, n_ctx=32, n_layer=2, n_head=2, d_model=32, init_std=0.1)


@pytest.fixture(scope="module")
def dense() -> GPT:
    torch.manual_seed(0)
    return GPT(DENSE).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))


def test_shapes_and_copied_weights(dense):
    model = upcycle_to_infmoe(dense, d_z=8)
    assert model.config.ffn == "infmoe" and model.config.ffn_hidden == 2 * 4 * 32
    assert model.config.ffn_options == {"d_z": 8}
    for old, new in zip(dense.ffn_layers(), model.ffn_layers()):
        assert torch.equal(new.w_in[:128], old.c_fc.weight) and torch.equal(new.w_out[:128], old.c_proj.weight.T)
        assert torch.equal(new.b_in[:128], old.c_fc.bias) and torch.equal(new.b_out, old.c_proj.bias)
        assert not torch.equal(new.w_in[128:], new.w_in[:128])  # second half fresh
    assert torch.equal(model.blocks[1].attn.c_attn.weight, dense.blocks[1].attn.c_attn.weight)
    assert torch.equal(model.wte.weight, dense.wte.weight) and model.lm_head.weight is model.wte.weight


def test_equals_dense_with_all_units_constant_gates_and_silent_second_half(dense):
    model = upcycle_to_infmoe(dense, d_z=8, active_fraction=1.0, gate="constant").eval()
    with torch.no_grad():
        for layer in model.ffn_layers():
            layer.w_out[layer.d_hidden // 2:].zero_()
        assert (model(ids()).logits - dense(ids()).logits).abs().max().item() <= 1e-5


def test_default_start_is_not_the_dense_model(dense):
    model = upcycle_to_infmoe(dense, d_z=8).eval()
    with torch.no_grad(), sampling(model, mode="mean"):
        assert (model(ids()).logits - dense(ids()).logits).abs().max().item() > 1e-3


def test_only_dense_models_upcycle(dense):
    with pytest.raises(ConfigError, match="needs a dense model"):
        upcycle_to_infmoe(upcycle_to_infmoe(dense, d_z=8), d_z=8)
