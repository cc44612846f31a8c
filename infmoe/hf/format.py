"""What an export directory holds, and reading its config.json and weights.

Nothing here imports `transformers`: reading an export back into our own model
(`infmoe.hf.load_hf_dir`) works without it. How config.json's fields map to `GPTConfig` is
`infmoe.hf.fields`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from infmoe.data.text import one_line
from infmoe.errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"
# The HF wrapper holds our GPT as `self.transformer`, so its weights carry this prefix.
WEIGHT_PREFIX = "transformer."
TIED_WEIGHT = "lm_head.weight"  # stored once, as the token embedding wte.weight
ARCHITECTURE = "InfmoeForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_infmoe.InfmoeConfig",
    "AutoModelForCausalLM": "modeling_infmoe.InfmoeForCausalLM",
}
# The code files auto_map names; `infmoe.hf.standalone` writes the modules they need beside them.
CODE_FILES = tuple(sorted({reference.split(".")[0] + ".py" for reference in AUTO_MAP.values()}))


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
