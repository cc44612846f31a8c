"""infmoe: ∞-MoE (mixture of experts with a continuous expert index) for PyTorch."""

from infmoe.errors import ConfigError, InfmoeError
from infmoe.layers import DenseMLP, FFNAux, FFNLayer, InfiniteMoE, TopKMoE, sampling
from infmoe.models import CONFIGS, GPT, CausalLMOutput, GPTConfig, KVCache, build_model, config_names, get_config

__version__ = "0.1.0"

__all__ = [
    "CONFIGS", "GPT", "CausalLMOutput", "ConfigError", "DenseMLP", "FFNAux", "FFNLayer",
    "GPTConfig", "InfiniteMoE", "InfmoeError", "KVCache", "TopKMoE", "build_model", "config_names",
    "get_config", "sampling", "__version__",
]
