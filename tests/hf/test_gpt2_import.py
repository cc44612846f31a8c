"""Importing a transformers GPT-2: equal logits, the named config, one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from infmoe.errors import CheckpointError
from infmoe.hf import config_name, import_gpt2
from infmoe.hf.gpt2 import gpt2_config
from infmoe.loading import load_model_and_tokenizer
from infmoe.models import get_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=300, n_positions=64,
                                     bos_token_id=299, eos_token_id=299)
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return folder, model


def test_import_gives_equal_logits(gpt2_folder):
    folder, reference = gpt2_folder
    model = import_gpt2(folder).eval()
    assert model.config.ffn == "dense" and model.config.ffn_hidden == 4 * 64
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5


def test_pickled_weights_import_too(gpt2_folder, tmp_path):
    folder, reference = gpt2_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    model = import_gpt2(tmp_path)
    assert torch.equal(model.blocks[0].ffn.c_fc.weight, reference.transformer.h[0].mlp.c_fc.weight.T)


def test_gpt2_small_shape_is_named(tmp_path):
    config = gpt2_config(tmp_path, {"model_type": "gpt2"})  # transformers' GPT-2 defaults are GPT-2 small
    assert config == get_config("gpt2-small-dense") and config_name(config) == "gpt2-small-dense"
    assert config_name(get_config("tiny-dense", n_layer=3)) is None


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "relu"}, "activation_function='relu'"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
    ({"model_type": "llama"}, "not GPT-2"),
])
def test_non_standard_gpt2_refused(gpt2_folder, tmp_path, change, message):
    folder, _ = gpt2_folder
    data = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, **change}))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=message) as error:
        import_gpt2(tmp_path)
    assert "\n" not in str(error.value)


def test_gpt2_folder_without_tokenizer_is_one_line(gpt2_folder):
    folder, _ = gpt2_folder
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_model_and_tokenizer(folder)
