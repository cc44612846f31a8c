"""Export → transformers: equal logits, generate(), K and mode through the config,
AutoTokenizer, register(), and reading an export back into our own model.

`theirs` loads with trust_remote_code, i.e. the code generated into the export (a copy of
our source that imports only torch and transformers), not the infmoe package: each
comparison with `ours` compares two separately loaded copies of the model code.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from infmoe.checkpoint import load_checkpoint
from infmoe.generation import generate
from infmoe.hf import load_hf_dir, register
from infmoe.layers import sampling
from infmoe.models import GPT

TOL = 1e-5


def ours(checkpoint):
    return load_checkpoint(checkpoint).build_model().eval()


def theirs(folder, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()
    for cls in (type(model), type(model.transformer), *(type(ffn) for ffn in model.transformer.ffn_layers())):
        assert cls.__module__.startswith("transformers_modules."), cls  # the export's code, not infmoe's
    assert not isinstance(model.transformer, GPT)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def logits_seeded(model, ids, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_logits_equal(ffn, checkpoint, exported, ids):
    model = theirs(exported(ffn))
    assert type(model).__name__ == "InfmoeForCausalLM"
    assert max_diff(logits_seeded(ours(checkpoint(ffn)), ids), logits_seeded(model, ids)) <= TOL


def test_infmoe_logits_equal_in_mean_and_sample_mode(checkpoint, exported, ids):
    model, reference = theirs(exported("infmoe")), ours(checkpoint("infmoe"))
    assert model.config.n_samples == 1 and model.config.mode == "sample"
    assert max_diff(logits_seeded(reference, ids, 1), logits_seeded(model, ids, 1)) <= TOL
    assert max_diff(logits_seeded(model, ids, 1), logits_seeded(model, ids, 2)) > 1e-3  # sampling is on
    model.config.mode = "mean"
    with sampling(reference, mode="mean"):
        assert max_diff(logits_seeded(reference, ids, 1), logits_seeded(model, ids, 2)) <= TOL


def test_n_samples_and_mode_through_the_config(checkpoint, exported, ids):
    folder = exported("infmoe")
    reference = ours(checkpoint("infmoe"))
    k4 = theirs(folder, n_samples=4)
    assert k4.config.n_samples == 4
    with sampling(reference, n_samples=4):
        assert max_diff(logits_seeded(reference, ids), logits_seeded(k4, ids)) <= TOL
    assert max_diff(logits_seeded(k4, ids), logits_seeded(theirs(folder), ids)) > 1e-3
    assert AutoConfig.from_pretrained(folder, trust_remote_code=True, mode="mean").mode == "mean"
    with pytest.raises(ValueError, match="n_samples=0"):
        logits_seeded(theirs(folder, n_samples=0), ids)


def test_editing_config_json_changes_k(checkpoint, exported, ids, tmp_path):
    from infmoe.hf import export_hf

    folder = export_hf(exported("infmoe"), tmp_path / "copy")  # an export re-exports
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "n_samples": 3}))
    model = theirs(folder)
    assert model.config.n_samples == 3
    reference = ours(checkpoint("infmoe"))
    with sampling(reference, n_samples=3):
        assert max_diff(logits_seeded(reference, ids), logits_seeded(model, ids)) <= TOL
    assert load_hf_dir(folder)[0].ffn_layers()[0].n_samples == 3


def test_a_config_json_written_before_the_rename_loads(checkpoint, exported, ids, tmp_path, monkeypatch):
    """Exports written before block_size was renamed units_per_block hold the old name in
    config.json's ffn_options (docs/configs.md): the export's code and ours both read it."""
    from infmoe.deprecation import RenamedWarning
    from infmoe.hf import export_hf

    monkeypatch.setattr("infmoe.deprecation._warned", set())
    folder = export_hf(exported("infmoe"), tmp_path / "old")
    data = json.loads((folder / "config.json").read_text())
    data["ffn_options"] = {**data["ffn_options"], "block_size": 1}  # the exported model's own B
    (folder / "config.json").write_text(json.dumps(data))
    reference = ours(checkpoint("infmoe"))
    # the export's own copy of RenamedWarning, a FutureWarning too
    with pytest.warns(FutureWarning, match="block_size is now units_per_block"):
        assert max_diff(logits_seeded(reference, ids), logits_seeded(theirs(folder), ids)) <= TOL
    with pytest.warns(RenamedWarning, match="block_size is now units_per_block"):
        model = load_hf_dir(folder)[0]
    assert model.config.ffn_options["units_per_block"] == 1
    assert max_diff(logits_seeded(reference, ids), logits_seeded(model, ids)) <= TOL


@pytest.mark.parametrize("ffn", ["dense", "glu", "moe", "moe-glu-shared", "infmoe"])
def test_greedy_generate_equals_ours(ffn, checkpoint, exported, ids):
    model = theirs(exported(ffn))
    torch.manual_seed(7)  # ∞-MoE in sample mode draws the same noise as our generate(seed=7)
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    expected = list(generate(ours(checkpoint(ffn)), ids[0].tolist(), max_new_tokens=8, temperature=0, seed=7))
    assert out[0, ids.shape[1]:].tolist() == expected
    assert len(set(expected)) > 1  # the check means something


def test_generate_cache_equals_recomputation_and_samples(exported, ids):
    from transformers import DynamicCache

    model = theirs(exported("infmoe"), mode="mean")
    cache = DynamicCache()
    with torch.no_grad():  # a prompt, then one token at a time through the cache
        steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, i:i + 1], cache=cache).logits
                                                            for i in range(5, ids.shape[1])]
        assert max_diff(torch.cat(steps, 1), model(ids, use_cache=False).logits) <= TOL
    cached = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False))
    torch.manual_seed(0)
    sampled = model.generate(ids.repeat(3, 1), max_new_tokens=6, do_sample=True, top_k=50)
    assert sampled.shape == (3, ids.shape[1] + 6) and int(sampled.max()) < model.config.vocab_size


def test_loss_is_shifted_like_transformers(exported, ids):
    model = theirs(exported("dense"))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    # 1e-5, about 20 float32 ulps at this loss (~7.4): the two means reduce over T and T - 1
    # rows, which another CPU's kernels may sum in another order; a shift off by one, or
    # labels of -100 counted, moves the loss by 0.025 or more here.
    assert abs(out.loss.item() - expected.item()) <= 1e-5


def test_padding_right_is_fine_left_raises(exported, ids):
    model = theirs(exported("dense"))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with torch.no_grad():
        assert max_diff(model(ids, attention_mask=mask).logits, model(ids).logits) == 0
        with pytest.raises(ValueError, match="only right padding"):
            model(ids, attention_mask=mask.flip(1))


def test_auto_tokenizer_round_trips(exported, tokenizer, text):
    hf_tokenizer = AutoTokenizer.from_pretrained(exported("infmoe"), trust_remote_code=True)
    text += " ∞-MoE héllo<|endoftext|>"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    assert hf_tokenizer.eos_token == hf_tokenizer.bos_token == "<|endoftext|>"
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id


def test_register_loads_without_trust_remote_code(checkpoint, exported, ids, tokenizer, text):
    from infmoe.hf.modeling_infmoe import InfmoeForCausalLM

    register()
    register()  # idempotent
    folder = exported("moe")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model) is InfmoeForCausalLM
    assert max_diff(logits_seeded(ours(checkpoint("moe")), ids), logits_seeded(model, ids)) <= TOL
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == tokenizer.encode(text)


@pytest.mark.parametrize("ffn", ["dense", "infmoe"])
def test_load_hf_dir_round_trip(ffn, checkpoint, exported, tokenizer, text):
    reference = load_checkpoint(checkpoint(ffn))
    model, loaded_tokenizer = load_hf_dir(exported(ffn))
    assert model.config == reference.config
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in reference.weights.items())
    assert model.lm_head.weight is model.wte.weight
    assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded_tokenizer.eot_id == tokenizer.eot_id
