"""Fixtures for the Hugging Face format tests: a BPE tokenizer trained in a blink and tiny
checkpoints of each FFN type, exported once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Read by huggingface_hub and transformers when first imported, so set before any test
# module imports them: no network, and remote-code modules cached in a throwaway folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "HF_MODULES_CACHE" not in os.environ:
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="infmoe-hf-modules-")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], True)

import pytest
import torch

from infmoe.checkpoint import save_checkpoint
from infmoe.data import Tokenizer
from infmoe.models import GPT, GPTConfig

# init_std well above GPT-2's 0.02 so a random model's next-token choice depends on the
# context, which makes "greedy decoding agrees" a real check.
SHAPE = dict(n_layer=2, d_model=32, n_head=2, n_ctx=64, init_std=0.3)
FFNS = {
    "dense": dict(ffn="dense"),
    "glu": dict(ffn="glu"),
    "moe": dict(ffn="moe", ffn_options=dict(n_experts=4, top_k=2)),
    "moe-glu-shared": dict(ffn="moe", ffn_options=dict(n_experts=3, top_k=2, shared_experts=1, glu=True)),
    "infmoe": dict(ffn="infmoe", ffn_options=dict(d_z=8)),
}
TEXT = "The quick brown fox jumps over the lazy dog. x = 1"


@pytest.fixture(scope="session")
def text() -> str:
    return TEXT


@pytest.fixture(scope="session")
def ids(tokenizer) -> torch.Tensor:
    """TEXT's token ids, (1, T)."""
    return torch.tensor([tokenizer.encode(TEXT)])


@pytest.fixture(scope="session")
def tokenizer(corpus) -> Tokenizer:
    documents = corpus.read_text(encoding="utf-8").split("\n\n")
    return Tokenizer.train_bpe(documents, 300, progress=False)


def tiny_model(ffn: str, vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, **SHAPE, **FFNS[ffn])).eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer):
    """checkpoint(ffn) → path of a saved tiny random checkpoint with the BPE tokenizer."""
    folder = tmp_path_factory.mktemp("checkpoints")

    def make(ffn: str):
        path = folder / f"{ffn}.safetensors"
        if not path.exists():
            save_checkpoint(path, tiny_model(ffn, tokenizer.vocab_size), tokenizer_files=tokenizer.files())
        return path

    return make


@pytest.fixture(scope="session")
def exported(tmp_path_factory, checkpoint):
    """exported(ffn) → an export folder of checkpoint(ffn), written once per session."""
    pytest.importorskip("transformers")
    from infmoe.hf import export_hf

    folders = {}

    def make(ffn: str):
        if ffn not in folders:
            folders[ffn] = export_hf(checkpoint(ffn), tmp_path_factory.mktemp("exports") / ffn)
        return folders[ffn]

    return make
