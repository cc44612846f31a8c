"""The export folder itself: what it holds, safe overwriting, one-line errors, and
tiktoken's GPT-2 converted with the same ids."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from infmoe.checkpoint import save_checkpoint
from infmoe.data import Tokenizer
from infmoe.errors import CheckpointError, InfmoeError
from infmoe.hf import export_hf, is_hf_export, load_hf_dir
from infmoe.hf.tokenizer import tiktoken_to_tokenizers
from infmoe.io import OutputError
from infmoe.loading import load_model_and_tokenizer
from infmoe.models import GPT, GPTConfig

EXPECTED = {"config.json", "generation_config.json", "model.safetensors", "configuration_infmoe.py",
            "modeling_infmoe.py", "tokenizer.json", "tokenizer_config.json"}


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, InfmoeError)
    return message


def test_export_contents(exported):
    folder = exported("infmoe")
    assert EXPECTED <= {p.name for p in folder.iterdir()}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left behind
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "infmoe" and config["architectures"] == ["InfmoeForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_infmoe.InfmoeForCausalLM"
    assert (config["ffn"], config["ffn_options"], config["n_samples"], config["mode"]) == ("infmoe", {"d_z": 8}, 1, "sample")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert is_hf_export(folder) and not is_hf_export(folder / "config.json")


def test_reexport_overwrites_an_export_and_refuses_anything_else(exported, checkpoint, tmp_path):
    folder = export_hf(checkpoint("dense"), tmp_path / "out")
    export_hf(checkpoint("infmoe"), folder)  # over an earlier export: allowed
    assert load_hf_dir(folder)[0].config.ffn == "infmoe"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError) as error:
        export_hf(checkpoint("dense"), foreign)
    assert "not empty and not an infmoe export" in one_line(error)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    with pytest.raises(OutputError) as error:
        export_hf(checkpoint("dense"), foreign / "notes.txt")
    assert "is a file" in one_line(error)


def test_not_an_export_gives_one_line(exported, tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_hf_dir(tmp_path / "missing")
    assert "does not exist" in one_line(error)
    with pytest.raises(CheckpointError) as error:
        load_hf_dir(tmp_path)
    assert "no config.json" in one_line(error)

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as error:
        load_hf_dir(tmp_path)
    assert "not readable JSON" in one_line(error)

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError) as error:
        load_hf_dir(tmp_path)
    assert "'llama' model, not an infmoe export" in one_line(error)

    config = json.loads((exported("dense") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_hf_dir(tmp_path)
    assert "no model.safetensors" in one_line(error)

    (tmp_path / "model.safetensors").write_bytes((exported("dense") / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError) as error:
        load_hf_dir(tmp_path)
    assert "not a readable safetensors file" in one_line(error)

    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 0}))
    with pytest.raises(CheckpointError) as error:
        load_hf_dir(tmp_path)
    assert "invalid model config" in one_line(error)


def test_load_model_and_tokenizer_takes_checkpoints_and_exports(checkpoint, exported):
    from_file, _ = load_model_and_tokenizer(checkpoint("moe"))
    from_folder, tokenizer = load_model_and_tokenizer(exported("moe"))
    assert from_file.config == from_folder.config and tokenizer.vocab_size == from_file.config.vocab_size


GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def small_tiktoken():
    """A tiktoken encoding named "gpt2" with GPT-2's split pattern and a few merges (the
    real one is downloaded, which these tests may not do)."""
    import tiktoken

    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"th", b"the", b" t", b" the", b"in", b"ing", b" a", b"an", b" an", b"and", b" and",
                  b"er", b"he", b" he", b"re", b"ere", b"here", b" here", b"  ", b"   ", b"12", b"123"):
        ranks[token] = len(ranks)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


@pytest.mark.parametrize("text", ["the thing and here   there", "  The  end\n\n here<|endoftext|>and the  ",
                                  "héllo wörld ∞-MoE 1234567 'll've", "anding thhere\t\t x"])
def test_tiktoken_converts_with_equal_ids(text):
    encoding = small_tiktoken()
    converted = tiktoken_to_tokenizers(encoding)
    assert converted.encode(text).ids == encoding.encode(text, allowed_special={"<|endoftext|>"})
    assert converted.decode(converted.encode(text).ids, skip_special_tokens=False) == text


def test_tiktoken_checkpoint_exports(monkeypatch, tmp_path):
    import tiktoken
    from transformers import AutoTokenizer

    encoding = small_tiktoken()
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: encoding)  # what Tokenizer.gpt2() reads
    tokenizer = Tokenizer.gpt2()
    tokenizer.save(tmp_path / "tok")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, d_model=16, n_head=2, n_ctx=32))
    files = {p.name: p.read_text() for p in (tmp_path / "tok").iterdir()}
    save_checkpoint(tmp_path / "ckpt.safetensors", model, tokenizer_files=files)
    folder = export_hf(tmp_path / "ckpt.safetensors", tmp_path / "export")
    text = "here and there, the thing<|endoftext|>"
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id
    loaded_model, loaded = load_hf_dir(folder)
    assert loaded.encode(text) == tokenizer.encode(text)
    assert torch.equal(loaded_model.wte.weight, model.wte.weight)


def test_every_public_name_loads_from_its_module_and_import_runs_none():
    """infmoe.hf's names load on first use (`infmoe.lazy`): `import infmoe.hf` imports no
    module of the package, so infmoe.loading can import the reader without the writer."""
    import subprocess
    import sys

    import infmoe.hf

    for name in infmoe.hf.__all__:
        assert callable(getattr(infmoe.hf, name)), name
    code = "import sys, infmoe.hf; print(sorted(m for m in sys.modules if m.startswith('infmoe.hf.')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
