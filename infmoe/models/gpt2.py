"""GPT-2 (pre-LN, learned positions, GELU, tied embeddings) with a pluggable FFN.

`GPTConfig` and `GPT` live side by side, as in Hugging Face modeling files. The FFN of each
block comes from `infmoe.layers` by the config's ``ffn`` name; the model only composes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from infmoe.errors import ConfigError, choose, divisor, invalid, positive_int, real
from infmoe.layers import FFN_TYPES, FFNLayer, build_ffn, current_option_names, ffn_option_names
from infmoe.layers.base import at_least_fp32


@dataclass
class GPTConfig:
    """Plain data describing a model; every field is checked on construction.

    d_hidden: hidden width of the configured FFN. None means GPT-2's 4 · d_model for
        "dense", 2/3 of that for "glu" (its three matrices then hold as many parameters
        as the MLP's two), and the paper's 2 × 4 · d_model for "moe" and "infmoe".
    ffn_every: the configured FFN sits in blocks n-1, 2n-1, ...; the others keep a dense
        MLP of width 4 · d_model. 1 means every block.
    ffn_options: keyword options of the FFN class (e.g. d_z, n_experts); see
        `infmoe.layers.ffn_option_names`. A renamed option's old name (block_size, now
        units_per_block) is read as the new one, so configs and checkpoints written before
        the rename load; the config then holds the new name.

    Fields and FFN options share one flat namespace of overrides (`replace`, ``--key
    value``): a key that is a field sets the field, any other key must be an option of the
    FFN. No FFN option may be named like a field (or a training setting), which
    tests/models/test_configs.py checks for every variant: that is why the GLU switch of
    the routed layers is ``glu``, not ``ffn``.
    """

    vocab_size: int = 50257
    n_ctx: int = 1024
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    ffn: str = "dense"
    d_hidden: int | None = None
    ffn_every: int = 1
    ffn_options: dict[str, Any] = field(default_factory=dict)
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "d_model", "ffn_every"):
            positive_int(name, getattr(self, name))
        divisor("n_head", self.n_head, self.d_model, "d_model")
        choose("ffn", self.ffn, FFN_TYPES)
        if self.d_hidden is not None:
            positive_int("d_hidden", self.d_hidden)
        if not isinstance(self.ffn_options, dict):
            raise invalid("ffn_options", self.ffn_options, "must be a mapping of option: value")
        self.ffn_options = current_option_names(self.ffn, self.ffn_options)
        real("dropout", self.dropout, low=0, high=0.99)
        real("init_std", self.init_std, low=0, open_low=True)
        with torch.device("meta"):  # validates every FFN option at no memory cost
            build_ffn(self.ffn, self.d_model, self.ffn_hidden, self.ffn_options)

    @property
    def ffn_hidden(self) -> int:
        if self.d_hidden is not None:
            return self.d_hidden
        if self.ffn == "glu":
            return 8 * self.d_model // 3
        return 4 * self.d_model * (1 if self.ffn == "dense" else 2)

    def uses_ffn(self, block: int) -> bool:
        """Whether block `block` (0-based) holds the configured FFN rather than a dense MLP."""
        return (block + 1) % self.ffn_every == 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build from plain data; keys may also be FFN options (see `replace`)."""
        return cls().replace(**data)

    def replace(self, **overrides: Any) -> GPTConfig:
        """A copy with fields overridden. A key that is not a field but an option of the
        (possibly new) FFN goes into ``ffn_options``; anything else is a `ConfigError`."""
        fields = {f.name for f in dataclasses.fields(self)}
        ffn = overrides.get("ffn", self.ffn)
        choose("ffn", ffn, FFN_TYPES)
        options = dict(self.ffn_options) if ffn == self.ffn else {}
        given = overrides.pop("ffn_options", None) or {}
        if not isinstance(given, dict):
            raise invalid("ffn_options", given, "must be a mapping of option: value")
        options.update(current_option_names(ffn, given))
        allowed = ffn_option_names(ffn)
        not_fields = current_option_names(ffn, {k: v for k, v in overrides.items() if k not in fields})
        for key, value in not_fields.items():
            if key not in allowed:
                raise ConfigError(
                    f"unknown config key {key!r}: use one of {', '.join(sorted(fields - {'ffn_options'}))}"
                    f" or an option of ffn={ffn!r} ({', '.join(allowed) or 'none'})"
                )
            options[key] = value
        fields_given = {k: v for k, v in overrides.items() if k in fields}
        return dataclasses.replace(self, **fields_given, ffn_options=options)


@dataclass
class CausalLMOutput:
    """logits (B, T, vocab); loss = lm_loss + aux_loss when targets were given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class KVCache:
    """Keys and values of the tokens seen so far, preallocated for n_ctx positions.

    keys[i], values[i]: (B, n_head, n_ctx, head_dim) for block i; `length` positions filled.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device=None, dtype=None) -> None:
        shape = (batch_size, config.n_head, config.n_ctx, config.d_model // config.n_head)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0

    def append(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_head, T, head_dim) after the filled positions; return all so far."""
        end = self.length + k.shape[2]
        self.keys[block][:, :, self.length : end] = k
        self.values[block][:, :, self.length : end] = v
        return self.keys[block][:, :, :end], self.values[block][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)
        self.c_proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, block: int = 0) -> torch.Tensor:
        """x (B, T, d) → (B, T, d). With a cache, x holds the T tokens after cache.length."""
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (u.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for u in (q, k, v))
        mask, causal = None, True
        if cache is not None and cache.length > 0:
            start = cache.length
            k, v = cache.append(block, k, v)
            # query i sits at position start + i and sees keys 0 .. start + i
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
            causal = False
        elif cache is not None:
            cache.append(block, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, index: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        if config.uses_ffn(index):
            self.ffn = build_ffn(config.ffn, config.d_model, config.ffn_hidden, config.ffn_options)
        else:
            self.ffn = build_ffn("dense", config.d_model, 4 * config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, block: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), cache, block))
        return x + self.drop(self.ffn(self.ln_2(x)))


class GPT(nn.Module):
    """GPT-2 language model. forward(idx (B, T) int64) → `CausalLMOutput`."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.n_ctx, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, residual outputs scaled by
        1 / sqrt(2 · n_layer) so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layer)
        for emb in (self.wte, self.wpe):
            nn.init.normal_(emb.weight, 0.0, std)
        for block in self.blocks:
            for ln in (block.ln_1, block.ln_2):
                ln.reset_parameters()
            nn.init.normal_(block.attn.c_attn.weight, 0.0, std)
            nn.init.normal_(block.attn.c_proj.weight, 0.0, out_std)
            nn.init.zeros_(block.attn.c_attn.bias)
            nn.init.zeros_(block.attn.c_proj.bias)
            block.ffn.reset_parameters(std, out_std)
        self.ln_f.reset_parameters()

    def ffn_layers(self) -> list[FFNLayer]:
        return [block.ffn for block in self.blocks]

    def num_parameters(self) -> int:
        """Distinct parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> CausalLMOutput:
        """idx (B, T) token ids; targets (B, T) next-token ids, -100 ignored.

        With a `KVCache`, idx holds the tokens that follow the cached ones; the cache grows
        by T. Positions in use (cached + T) must not exceed n_ctx.
        """
        start = cache.length if cache is not None else 0
        t = idx.shape[1]
        if start + t > self.config.n_ctx:
            raise invalid("sequence length", start + t, f"must be <= n_ctx={self.config.n_ctx}")
        pos = torch.arange(start, start + t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += t
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return CausalLMOutput(logits)
        lm_loss = F.cross_entropy(at_least_fp32(logits.flatten(0, 1)), targets.flatten(), ignore_index=-100)
        aux = [ffn.aux.loss for ffn in self.ffn_layers() if ffn.aux.loss is not None]
        aux_loss = torch.stack(aux).sum() if aux else lm_loss.new_zeros(())
        return CausalLMOutput(logits, lm_loss + aux_loss, lm_loss, aux_loss)

    def routing_stats(self) -> dict[str, torch.Tensor]:
        """The last forward's routing statistics, keyed ``block{i}.{name}``."""
        return {
            f"block{i}.{name}": value
            for i, ffn in enumerate(self.ffn_layers())
            for name, value in ffn.aux.stats.items()
        }
