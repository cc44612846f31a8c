"""`InfmoeConfig`: the transformers config of an infmoe model.

It holds every field of `infmoe.models.GPTConfig` under the same name, plus the ∞-MoE
inference knobs ``n_samples`` (K) and ``mode`` ("sample" | "mean") at the top level (None
for dense and top-k MoE models). The model reads those two on every forward, so any of

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, n_samples=4)
    model.config.mode = "mean"
    editing "n_samples" in config.json

changes how the ∞-MoE layers sample. In an export this file is generated from infmoe's
source (`infmoe.hf.standalone`) and imports only torch and transformers.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from infmoe.hf.fields import MODEL_TYPE, gpt_config
from infmoe.models import GPTConfig


class InfmoeConfig(PretrainedConfig):
    """transformers config wrapping a `GPTConfig`; see the module docstring."""

    model_type = MODEL_TYPE
    # transformers' standard names, read by generic code (lm-evaluation-harness reads
    # max_position_embeddings to learn the context length).
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_ctx",
    }

    def __init__(
        self,
        n_samples: int | None = None,
        mode: str | None = None,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        # GPTConfig's fields, defaults from GPTConfig itself so the two never drift apart.
        fields = {name: kwargs.pop(name, default) for name, default in GPTConfig().to_dict().items()}
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)  # GPT-2 ties the head to wte
        for name, value in fields.items():
            setattr(self, name, value)
        self.n_samples = n_samples
        self.mode = mode
        self.use_cache = use_cache  # set after: transformers' init drops generation settings
        self.to_gpt_config()  # validate now: a bad field fails here with one line

    def to_gpt_config(self) -> GPTConfig:
        """The `GPTConfig` these fields describe (K and mode folded into ffn_options)."""
        return gpt_config(self.__dict__)
