import pytest

from infmoe import get_config
from infmoe.params import parameter_report


def test_infmoe_active_is_total_minus_unselected_units_and_k_bounds_grow():
    config = get_config("tiny-infmoe")
    r = parameter_report(config, samples=(1, 2, 4))
    d, h, layers = config.d_model, config.ffn_hidden, config.n_layer
    per_unit = 2 * d + 1  # a row of W_in, its bias, a row of W_out
    assert r.total - r.active[1] == layers * (h // 2) * per_unit
    assert r.total - r.active[2] == pytest.approx(layers * h * 0.25 * per_unit)  # 1 - (1 - 1/2)^2
    assert r.active[1] < r.active[2] < r.active[4] < r.total
    assert r.flops[1] < r.flops[2] < r.flops[4]
    assert r.exact == {1: True, 2: False, 4: False}


def test_dense_flops_per_token_formula():
    config = get_config("tiny-dense")
    r = parameter_report(config, samples=(1, 8))
    d, t, v, layers = config.d_model, config.n_ctx, config.vocab_size, config.n_layer
    per_layer = 2 * 4 * d * d + 2 * 2 * d * t + 2 * 2 * d * 4 * d
    assert r.flops[1] == r.flops[8] == 2 * d * v + layers * per_layer
    assert r.active[1] == r.total and r.exact[8]


def test_moe_active_counts_top_k_experts():
    config = get_config("tiny-moe")
    r = parameter_report(config, samples=(1,))
    e, k = config.ffn_options["n_experts"], config.ffn_options["top_k"]
    d, width = config.d_model, config.ffn_hidden // e
    per_expert = 2 * d * width + width + d
    assert r.total - r.active[1] == config.n_layer * (e - k) * per_expert
