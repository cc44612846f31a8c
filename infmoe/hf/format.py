"""What an export directory holds, and how its config.json maps to our `GPTConfig`.

Nothing here imports `transformers`: reading an export back into our own model
(`infmoe.hf.load_hf_dir`) works without it.

config.json carries every `GPTConfig` field under its own name, except that the ∞-MoE
inference knobs ``n_samples`` (K) and ``mode`` are lifted out of ``ffn_options`` to the top
level, so that ``AutoConfig.from_pretrained(DIR, n_samples=4)``, setting
``model.config.n_samples`` or editing config.json changes K. They are ``null`` for the
other FFN types.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from infmoe.data.text import one_line
from infmoe.errors import CheckpointError
from infmoe.layers import InfiniteMoE
from infmoe.models import GPTConfig

MODEL_TYPE = "infmoe"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"
CODE_FILES = ("configuration_infmoe.py", "modeling_infmoe.py")
# The HF wrapper holds our GPT as `self.transformer`, so its weights carry this prefix.
WEIGHT_PREFIX = "transformer."
TIED_WEIGHT = "lm_head.weight"  # stored once, as the token embedding wte.weight
ARCHITECTURE = "InfmoeForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_infmoe.InfmoeConfig",
    "AutoModelForCausalLM": "modeling_infmoe.InfmoeForCausalLM",
}
SAMPLING_KEYS = ("n_samples", "mode")


def sampling_defaults() -> dict[str, Any]:
    """InfiniteMoE's own defaults for K and mode (1, "sample")."""
    params = inspect.signature(InfiniteMoE).parameters
    return {key: params[key].default for key in SAMPLING_KEYS}


def config_fields(config: GPTConfig) -> dict[str, Any]:
    """`GPTConfig` → the model fields of config.json (``n_samples``/``mode`` at the top)."""
    fields = config.to_dict()
    options = dict(fields.pop("ffn_options"))
    if config.ffn == "infmoe":
        sampling = {key: options.pop(key, default) for key, default in sampling_defaults().items()}
    else:
        sampling = dict.fromkeys(SAMPLING_KEYS)
    return {**fields, "ffn_options": options, **sampling}


def gpt_config(data: Mapping[str, Any]) -> GPTConfig:
    """config.json's fields (or `InfmoeConfig.to_dict()`) → a validated `GPTConfig`; keys
    that are not ours (transformers' own) are ignored. Raises a one-line `ConfigError`."""
    fields = {f.name: data[f.name] for f in dataclasses.fields(GPTConfig) if f.name in data}
    options = dict(fields.pop("ffn_options", None) or {})
    defaults = sampling_defaults()
    # Defaults stay implicit, so exporting and reading back gives an equal GPTConfig.
    options.update({key: data[key] for key in SAMPLING_KEYS if data.get(key) not in (None, defaults[key])})
    return GPTConfig.from_dict({**fields, "ffn_options": options})


def read_config(folder: Path) -> dict[str, Any]:
    """The mapping in `folder`/config.json; a one-line `CheckpointError` when the folder or
    the file is missing or does not parse."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise CheckpointError(f"{folder} {what}: give a Hugging Face model folder (one with {CONFIG_FILE})")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}, so it is not a Hugging Face model folder: "
                              f"give a folder written by infmoe export --hf")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({one_line(err, 120)}): restore or re-create the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object: restore or re-create the file")
    return data


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors file `path`; a one-line `CheckpointError` when it is
    missing, truncated or not safetensors."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}: the folder is incomplete; write it again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({one_line(err, 120)}): "
                              f"it may be truncated; write it again") from None
