"""Parameter and FLOP accounting per token, without allocating any weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from infmoe.layers import InfiniteMoE
from infmoe.models import GPT, GPTConfig


@dataclass
class ParamReport:
    """Counts for one config. `active` and `flops` map K (routing samples) to the value.

    active: parameters one token touches (embeddings included, as in GPT-2's 124M).
    flops:  forward FLOPs per token: 2 × multiply-adds of every matmul the token goes
            through, attention over a full n_ctx context included; training ≈ 3 ×.
    exact:  False where K > 1 values are upper bounds (∞-MoE: expected union of masks).
    """

    name: str
    ffn: str
    total: int
    active: dict[int, float]
    flops: dict[int, float]
    exact: dict[int, bool]


def model_flops_per_token(model: GPT, n_samples: int = 1, executed: bool = False) -> float:
    """Forward FLOPs per token of `model` (2 × multiply-adds of every matmul): the LM head,
    and per block attention over a full n_ctx context plus the FFN's own
    `FFNLayer.flops_per_token` (``executed``: what its chosen path runs, see there)."""
    c = model.config
    attention = 2 * 4 * c.d_model**2 + 2 * 2 * c.d_model * c.n_ctx  # qkv + proj; scores + weighted values
    lm_head = 2 * c.d_model * c.vocab_size
    blocks = (attention + f.flops_per_token(n_samples, executed=executed) for f in model.ffn_layers())
    return lm_head + sum(blocks)


def parameter_report(config: GPTConfig, name: str = "", samples: Sequence[int] = (1, 2, 4)) -> ParamReport:
    with torch.device("meta"):
        model = GPT(config)
    total = model.num_parameters()
    active, flops, exact = {}, {}, {}
    for k in samples:
        inactive = sum(sum(p.numel() for p in f.parameters()) - f.active_parameters(k) for f in model.ffn_layers())
        active[k] = total - inactive
        flops[k] = model_flops_per_token(model, k)
        exact[k] = k == 1 or not any(isinstance(f, InfiniteMoE) for f in model.ffn_layers())
    return ParamReport(name, config.ffn, total, active, flops, exact)
