import dataclasses
import json

import pytest
import torch

from infmoe import CONFIGS, ConfigError, GPTConfig, build_model, config_names, get_config
from infmoe.layers import FFN_TYPES, ffn_option_names
from infmoe.training import TrainConfig
from infmoe.params import parameter_report


def counts(name: str) -> tuple[int, float]:
    report = parameter_report(get_config(name), name, samples=(1,))
    return report.total, report.active[1]


def test_gpt2_small_infmoe_matches_the_paper_186m_total_129m_active():
    total, active = counts("gpt2-small-infmoe")
    assert total == pytest.approx(186e6, rel=0.02)
    assert active == pytest.approx(129e6, rel=0.02)


def test_dense_gpt2_sizes_match_the_released_models():
    # Hugging Face's gpt2 and gpt2-medium have exactly these counts (tied embeddings).
    assert counts("gpt2-small-dense") == (124_439_808, 124_439_808)
    total, _ = counts("gpt2-medium-dense")
    assert total == 354_823_168 and total == pytest.approx(350e6, rel=0.02)


@pytest.mark.parametrize("size", ["tiny", "gpt2-small"])
def test_moe_baseline_matches_infmoe_total_and_active_within_3_percent(size):
    inf_total, inf_active = counts(f"{size}-infmoe")
    moe_total, moe_active = counts(f"{size}-moe")
    assert moe_total == pytest.approx(inf_total, rel=0.03)
    assert moe_active == pytest.approx(inf_active, rel=0.03)


@pytest.mark.parametrize("size", ["tiny", "gpt2-small"])
def test_routed_configs_follow_the_paper_defaults(size):
    dense = get_config(f"{size}-dense")
    for ffn in ("infmoe", "moe"):
        config = get_config(f"{size}-{ffn}")
        assert config.ffn == ffn
        assert config.ffn_hidden == pytest.approx(2 * dense.ffn_hidden, rel=0.1)  # H = 2 x dense width
    inf = get_config(f"{size}-infmoe")
    assert inf.ffn_hidden == 2 * dense.ffn_hidden
    assert inf.ffn_options.get("active_fraction", 0.5) == 0.5
    moe = get_config(f"{size}-moe")
    assert moe.ffn_options["top_k"] / moe.ffn_options["n_experts"] == 0.5


def test_tiny_configs_are_a_few_million_parameters_and_run():
    idx = torch.randint(0, 100, (2, 32))
    for ffn in ("dense", "moe", "infmoe"):
        model = build_model(f"tiny-{ffn}")
        assert 1e6 < model.num_parameters() < 10e6
        assert model(idx, idx).loss.isfinite()


def test_every_named_config_builds():
    for name in config_names():
        with torch.device("meta"):
            assert build_model(name).config == get_config(name)
    assert set(CONFIGS) >= {f"{s}-{f}" for s in ("tiny", "gpt2-small") for f in ("dense", "moe", "infmoe")}


def test_overrides_reach_fields_and_ffn_options():
    config = get_config("tiny-infmoe", n_layer=2, d_z=8, units_per_block=4)
    assert config.n_layer == 2 and config.ffn_options == {"d_z": 8, "units_per_block": 4}
    assert get_config("tiny-infmoe").ffn_options == {"d_z": 16, "units_per_block": 64}  # the named config is untouched
    switched = get_config("tiny-infmoe", ffn="moe", n_experts=4, top_k=1)
    assert switched.ffn_options == {"n_experts": 4, "top_k": 1}  # old ffn's options dropped


def test_no_ffn_option_is_named_like_a_field_or_a_training_setting():
    """Overrides are one flat namespace (`GPTConfig.replace`, ``--key value``): an FFN option
    named like a model field or a training setting could never be set."""
    taken = {f.name for f in dataclasses.fields(GPTConfig)} | TrainConfig.fields()
    for ffn, cls in FFN_TYPES.items():
        names = set(ffn_option_names(ffn)) | set(cls.RENAMED_OPTIONS) | set(cls.RENAMED_OPTIONS.values())
        assert not names & taken, f"ffn={ffn!r} options {sorted(names & taken)} are also fields or settings"


def test_unknown_key_and_name_raise_clear_errors():
    with pytest.raises(ConfigError, match="unknown config key 'n_layers'"):
        get_config("tiny-dense", n_layers=3)
    with pytest.raises(ConfigError, match="unknown config key 'd_z'.*ffn='dense'"):
        get_config("tiny-dense", d_z=3)
    with pytest.raises(ConfigError, match="unknown config 'gpt3'.*tiny-dense"):
        get_config("gpt3")


def test_config_files(tmp_path):
    data = dict(CONFIGS["tiny-infmoe"], n_layer=1)
    (tmp_path / "m.json").write_text(json.dumps(data))
    (tmp_path / "m.yaml").write_text("ffn: infmoe\nd_model: 32\nn_head: 2\nffn_options: {d_z: 4}\n")
    assert get_config(tmp_path / "m.json") == GPTConfig.from_dict(data)
    assert get_config(tmp_path / "m.yaml", n_layer=3).d_model == 32
    (tmp_path / "bad.yaml").write_text("ffn: [unclosed\n")
    with pytest.raises(ConfigError, match="does not parse"):
        get_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        get_config(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        get_config(tmp_path / "list.json")


def test_to_dict_round_trip():
    config = get_config("gpt2-small-moe")
    assert GPTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
