"""How config.json's model fields map to our `GPTConfig` and back.

config.json carries every `GPTConfig` field under its own name, except that the ∞-MoE
inference knobs ``n_samples`` (K) and ``mode`` are lifted out of ``ffn_options`` to the top
level, so that ``AutoConfig.from_pretrained(DIR, n_samples=4)``, setting
``model.config.n_samples`` or editing config.json changes K. They are ``null`` for the
other FFN types.

Apart from `infmoe.hf.format` (which holds the file layout and reads files with
safetensors), because `InfmoeConfig` needs this mapping and an export's copy of it may
import only the standard library, torch and transformers (see `infmoe.hf.standalone`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from infmoe.layers import InfiniteMoE
from infmoe.models import GPTConfig

MODEL_TYPE = "infmoe"
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
