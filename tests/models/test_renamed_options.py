"""Old option names (`InfiniteMoE.RENAMED_OPTIONS`, docs/configs.md): accepted wherever a
config comes from, warned about once, and stored under the new name. Checkpoints written
before the rename hold the old name in their config and must still load."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from infmoe import ConfigError, GPTConfig, build_model, get_config
from infmoe.checkpoint import load_checkpoint, save_checkpoint
from infmoe.deprecation import RenamedWarning
from infmoe.layers import sampling

# A model config exactly as `save_checkpoint` stored it before block_size was renamed
# units_per_block (GPTConfig.to_dict() of tiny-infmoe, one layer, 512-token vocabulary).
CONFIG_BEFORE_THE_RENAME = {
    "vocab_size": 512, "n_ctx": 128, "n_layer": 1, "n_head": 6, "d_model": 192, "ffn": "infmoe",
    "d_hidden": None, "ffn_every": 1, "ffn_options": {"d_z": 16, "block_size": 256}, "dropout": 0.0,
    "init_std": 0.02,
}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the first use of an old name in its process."""
    monkeypatch.setattr("infmoe.deprecation._warned", set())


def test_block_size_is_read_as_units_per_block_and_warns_once():
    with pytest.warns(RenamedWarning, match="block_size is now units_per_block"):
        config = get_config("tiny-infmoe", block_size=16)
    assert config.ffn_options == {"d_z": 16, "units_per_block": 16}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        model = build_model("tiny-infmoe", n_layer=1, block_size=16)
        assert model.config.ffn_options["units_per_block"] == 16
        nested = GPTConfig.from_dict({"ffn": "infmoe", "ffn_options": {"d_z": 4, "block_size": 8}})
        assert nested.to_dict()["ffn_options"] == {"d_z": 4, "units_per_block": 8}  # stored: the new name
        # an override under the old name replaces the config's value under the new one
        assert get_config("tiny-infmoe", ffn_options={"block_size": 32}).ffn_options["units_per_block"] == 32


def test_both_names_at_once_are_one_clear_error():
    with pytest.raises(ConfigError, match="block_size and units_per_block are one option.*give only "):
        GPTConfig(ffn="infmoe", ffn_options={"d_z": 4, "block_size": 8, "units_per_block": 8})
    with pytest.raises(ConfigError, match="give only units_per_block"):
        get_config("tiny-infmoe", block_size=8, units_per_block=8)


def test_a_checkpoint_written_before_the_rename_loads(tmp_path):
    torch.manual_seed(0)
    renamed = {"ffn_options": {"d_z": 16, "units_per_block": 256}}
    model = build_model(CONFIG_BEFORE_THE_RENAME | renamed).eval()
    new = save_checkpoint(tmp_path / "new.safetensors", model)
    with safe_open(str(new), framework="pt") as f:  # the same file with the old header
        meta, tensors = json.loads(f.metadata()["infmoe"]), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["config"]["ffn_options"] == {"d_z": 16, "units_per_block": 256}
    meta["config"] = CONFIG_BEFORE_THE_RENAME
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"infmoe": json.dumps(meta)})

    with pytest.warns(RenamedWarning, match="block_size is now units_per_block"):
        loaded = load_checkpoint(old)
    assert loaded.config == model.config and loaded.config.ffn_options["units_per_block"] == 256
    rebuilt = loaded.build_model().eval()
    idx = torch.randint(0, 512, (1, 16))
    with torch.no_grad(), sampling(model, mode="mean"), sampling(rebuilt, mode="mean"):
        assert torch.equal(rebuilt(idx).logits, model(idx).logits)
