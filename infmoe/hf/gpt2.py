"""Import a dense GPT-2 saved in Hugging Face format (``GPT2LMHeadModel.save_pretrained``,
or the ``gpt2`` weights in a local Hugging Face cache) into our own `GPT`.

Our GPT-2 is the same network: pre-LN blocks, learned positions, tanh GELU (transformers'
"gelu_new"), LayerNorm eps 1e-5 (torch's default), tied output head. Only the layout
differs: transformers' GPT-2 uses `Conv1D`, whose weight is stored (in, out), the transpose
of `nn.Linear`'s. Reading needs no `transformers`: config.json and model.safetensors (or
pytorch_model.bin) are read directly.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from infmoe.checkpoint import Checkpoint, check_weights
from infmoe.errors import CheckpointError, InfmoeError
from infmoe.hf.format import WEIGHTS_FILE, read_config, read_weights
from infmoe.models import CONFIGS, GPT, GPTConfig, get_config

# transformers' GPT-2 options that must hold for the network to be ours; the first allowed
# value is transformers' default.
_REQUIRED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
    "tie_word_embeddings": (True,),
}
# Conv1D weights, stored (in, out): transposed into nn.Linear's (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The causal-mask buffers that older transformers versions saved with the weights.
_BUFFERS = ("attn.bias", "attn.masked_bias")


def import_gpt2(path: str | os.PathLike) -> GPT:
    """The GPT-2 in the Hugging Face folder `path` as our dense `GPT` (ffn="dense"), with
    equal logits. Its config is the named ``gpt2-small-dense`` (see `config_name`) when the
    shapes are GPT-2 small's. One-line `CheckpointError` for anything else."""
    path = Path(path)
    config = gpt2_config(path, read_config(path))
    state = {name.removeprefix("transformer."): tensor for name, tensor in _read_gpt2_weights(path).items()}
    head = state.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, state.get("wte.weight", head)):
        raise CheckpointError(f"{path}: the output head differs from the token embedding; our GPT-2 ties them")
    weights = {}
    for name, tensor in state.items():
        if name.startswith("h."):
            block, _, rest = name[2:].partition(".")
            if rest in _BUFFERS:
                continue
            weights[f"blocks.{block}.{rest.replace('mlp.', 'ffn.')}"] = tensor.t().contiguous() if rest in _CONV1D else tensor
        else:
            weights[name] = tensor
    check_weights(path, config, weights)
    return Checkpoint(path, config, weights).build_model()


def gpt2_config(path: Path, data: dict[str, Any]) -> GPTConfig:
    """Our dense `GPTConfig` for transformers' GPT-2 config `data` (read from `path`)."""
    if data.get("model_type") != "gpt2":
        raise CheckpointError(f"{path} holds a {data.get('model_type')!r} model, not GPT-2: give a GPT-2 folder")
    for key, allowed in _REQUIRED.items():
        value = data.get(key, allowed[0])
        if value not in allowed:
            raise CheckpointError(f"{path}: GPT-2 with {key}={value!r} is not our network "
                                  f"(it needs {key}={allowed[0]!r}); only standard GPT-2 models can be imported")
    fields = dict(vocab_size=data.get("vocab_size", 50257), n_ctx=data.get("n_positions", 1024),
                  n_layer=data.get("n_layer", 12), n_head=data.get("n_head", 12), d_model=data.get("n_embd", 768),
                  ffn="dense", d_hidden=data.get("n_inner"))
    try:
        config = GPTConfig(**fields)
    except InfmoeError as err:
        raise CheckpointError(f"{path} holds a GPT-2 config we cannot build ({err})") from None
    name = config_name(config)
    return get_config(name) if name else config


def config_name(config: GPTConfig) -> str | None:
    """The name of the built-in config equal to `config` (e.g. "gpt2-small-dense"), if any.
    Fields left at their defaults (d_hidden=None) compare by the width they mean."""
    for name in CONFIGS:
        named = get_config(name)
        if named.replace(d_hidden=named.ffn_hidden) == config.replace(d_hidden=config.ffn_hidden):
            return name
    return None


def _read_gpt2_weights(path: Path) -> dict[str, torch.Tensor]:
    """{name: tensor} of the folder's model.safetensors, or else of its pytorch_model.bin;
    one-line `CheckpointError` when the pickle is unreadable, unsafe, or not such a dict."""
    if (path / WEIGHTS_FILE).is_file() or not (path / "pytorch_model.bin").is_file():
        return read_weights(path / WEIGHTS_FILE)
    pickled = path / "pytorch_model.bin"
    try:  # weights_only: a pickle from elsewhere may not run code
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the one line below says enough
            warnings.simplefilter("ignore")
            state = torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a bad pickle raises many kinds
        raise CheckpointError(f"{pickled} is not readable ({type(err).__name__}): "
                              f"save the model again with safe_serialization") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{pickled} holds a {type(state).__name__}, not a state dict of named tensors: "
                              "save the model again with save_pretrained")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{pickled} holds the entry {name!r}: {type(tensor).__name__}, not a state "
                                  "dict of named tensors: save the model again with save_pretrained")
    return state
