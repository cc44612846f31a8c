"""`InfmoeForCausalLM`: infmoe's GPT as a transformers causal LM.

A thin wrapper: the network is our GPT itself (`infmoe.models.GPT`, held as
``self.transformer``). In an export this file and the modules it imports are generated from
infmoe's source (`infmoe.hf.standalone`): the same code, importing only torch and
transformers, so loading an export does not need infmoe. What the wrapper adds:

- forward(input_ids, attention_mask, cache, labels, use_cache) → `CausalLMOutputWithPast`
  with logits (B, T, vocab), the loss when labels are given (shifted inside, as in every
  transformers causal LM: position t predicts labels[t + 1]; -100 ignored; plus the FFN's
  auxiliary loss, as in our training objective, which is 0 for ∞-MoE at kl_weight 0), and
  the cache.
- `generate()` through `GenerationMixin` with transformers' own `DynamicCache`: GPT's
  attention writes into it through `CacheView`, so every decoding step feeds only the new
  token (no recomputation), and transformers can reorder or crop the cache (beam search).
- ∞-MoE's K and mode read from ``self.config.n_samples`` / ``.mode`` on every forward.

Limits, from GPT itself: learned absolute positions and no padding mask, so a batch may only
be padded on the right (left padding raises), and prompt + new tokens must fit in n_ctx.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from infmoe.errors import ConfigError
from infmoe.layers import sampling
from infmoe.models import GPT

from .configuration_infmoe import InfmoeConfig

# transformers 5.x renamed the output's `past_key_values` to `cache`; accept either release.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class CacheView:
    """Our `KVCache` interface (``length``, ``append``) over a transformers `Cache`.

    ``length`` is the number of cached positions when the forward starts; GPT reads it in
    every block and advances it once at the end, so it must not follow the cache as block 0
    appends to it.
    """

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.length = cache.get_seq_length()

    def append(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, n_head, T, head_dim) → all keys and values of block `block` so far."""
        return self.cache.update(k, v, block)


def check_right_padded(attention_mask: torch.Tensor | None) -> None:
    """GPT has no padding mask; right padding is harmless (causal attention never looks
    ahead), any other mask (left padding, holes) would be silently ignored, so it raises."""
    if attention_mask is None or attention_mask.dim() != 2:
        return
    if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ConfigError(
            "attention_mask has padding before real tokens: infmoe's GPT supports only right "
            "padding; pad on the right (tokenizer.padding_side = 'right') or generate one prompt at a time"
        )


class InfmoeForCausalLM(PreTrainedModel, GenerationMixin):
    """infmoe GPT (dense, top-k MoE or ∞-MoE FFN) with transformers' causal-LM interface."""

    config_class = InfmoeConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _tied_weights_keys = {"transformer.lm_head.weight": "transformer.wte.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config: InfmoeConfig) -> None:
        super().__init__(config)
        self.transformer = GPT(config.to_gpt_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # GPT initialises itself on construction (GPT-2 init, ∞-MoE's score map scaled by
        # d_z^-1/2); transformers' generic init would undo that. A loaded export has every weight.
        pass

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.transformer.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids (B, T) the tokens after the ``cache.get_seq_length()`` cached ones;
        labels (B, T) as input_ids (not shifted), -100 ignored. Other transformers kwargs
        (output_attentions, position_ids, ...) are accepted and ignored."""
        if kwargs.get("inputs_embeds") is not None:
            raise ConfigError("inputs_embeds is not supported by infmoe's GPT: pass input_ids")
        check_right_padded(attention_mask)
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if getattr(cache, "is_compileable", False):  # static caches hand back padded, preallocated keys
            raise ConfigError("infmoe's GPT works with transformers' DynamicCache only: drop cache_implementation")
        view = CacheView(cache) if cache is not None else None
        targets = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=-100)
        with sampling(self.transformer, n_samples=self.config.n_samples, mode=self.config.mode):
            out = self.transformer(input_ids, targets, view)
        output = CausalLMOutputWithPast(loss=out.loss, logits=out.logits, **{_CACHE_FIELD: cache})
        return output if return_dict is not False else output.to_tuple()
