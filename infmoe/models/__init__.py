"""Models and their named configs."""

from infmoe.models.configs import CONFIGS, build_model, config_names, get_config
from infmoe.models.gpt2 import GPT, CausalLMOutput, GPTConfig, KVCache

__all__ = ["CONFIGS", "GPT", "GPTConfig", "CausalLMOutput", "KVCache", "build_model", "config_names", "get_config"]
