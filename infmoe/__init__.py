"""infmoe: ∞-MoE (mixture of experts with a continuous expert index) for PyTorch.

The public names load on first use, so that `import infmoe.launch` (the command's entry
point) does not import torch before it has made Ctrl-C quiet.
"""

from __future__ import annotations

from infmoe.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "infmoe.errors": ("ConfigError", "InfmoeError"),
    "infmoe.layers": ("DenseMLP", "FFNAux", "FFNLayer", "GLU", "InfiniteMoE", "TopKMoE", "draw_train_samples", "sampling"),
    "infmoe.models": ("CONFIGS", "GPT", "CausalLMOutput", "GPTConfig", "KVCache", "build_model", "config_names",
                      "get_config"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names) + ["__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
