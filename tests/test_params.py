import runpy
import sys
from pathlib import Path

import pytest
import torch

from infmoe import get_config
from infmoe.models import GPT
from infmoe.params import model_flops_per_token, parameter_report


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


def test_executed_flops_count_the_whole_ffn_where_the_masked_path_runs():
    config = get_config("tiny-infmoe", units_per_block=1)  # per unit: the masked path
    with torch.device("meta"):
        model = GPT(config)
    assert not any(f.uses_sparse(1) for f in model.ffn_layers())
    needed, executed = model_flops_per_token(model, 1), model_flops_per_token(model, 1, executed=True)
    assert needed == parameter_report(config, samples=(1,)).flops[1]
    unselected_half = 0.5 * 2 * 2 * config.d_model * config.ffn_hidden
    assert executed - needed == pytest.approx(config.n_layer * unselected_half)


def test_gpu_estimate_uses_the_model_flop_count(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gpu_estimate.py"])
    runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "gpu_estimate.py"), run_name="__main__")
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 5
    for row in rows:
        name, *block = row[0].removeprefix("| ").split(" --units_per_block ")
        config = get_config(name, **({"units_per_block": int(block[0])} if block else {}))
        with torch.device("meta"):
            model = GPT(config)
        assert float(row[2]) == round(3 * model_flops_per_token(model, 1, executed=True) / 1e9, 2), row[0]
