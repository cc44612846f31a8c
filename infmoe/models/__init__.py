"""Models and their named configs."""

from infmoe.models.configs import CONFIGS, build_model, config_names, get_config
from infmoe.models.gpt2 import GPT, CausalLMOutput, GPTConfig

__all__ = ["CONFIGS", "GPT", "GPTConfig", "CausalLMOutput", "build_model", "config_names", "get_config"]
