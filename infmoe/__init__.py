"""infmoe: ∞-MoE (mixture of experts with a continuous expert index) for PyTorch.

The public names load on first use, so that `import infmoe.launch` (the command's entry
point) does not import torch before it has made Ctrl-C quiet.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "infmoe.errors": ("ConfigError", "InfmoeError"),
    "infmoe.layers": ("DenseMLP", "FFNAux", "FFNLayer", "GLU", "InfiniteMoE", "TopKMoE", "draw_train_samples", "sampling"),
    "infmoe.models": ("CONFIGS", "GPT", "CausalLMOutput", "GPTConfig", "KVCache", "build_model", "config_names",
                      "get_config"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_HOME) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'infmoe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
