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


def parameter_report(config: GPTConfig, name: str = "", samples: Sequence[int] = (1, 2, 4)) -> ParamReport:
    with torch.device("meta"):
        model = GPT(config)
    total = model.num_parameters()
    d, t = config.d_model, config.n_ctx
    attention = 2 * 4 * d * d + 2 * 2 * d * t  # qkv + proj; scores + weighted values
    lm_head = 2 * d * config.vocab_size
    active, flops, exact = {}, {}, {}
    for k in samples:
        inactive = sum(sum(p.numel() for p in f.parameters()) - f.active_parameters(k) for f in model.ffn_layers())
        active[k] = total - inactive
        flops[k] = lm_head + sum(attention + f.flops_per_token(k) for f in model.ffn_layers())
        exact[k] = k == 1 or not any(isinstance(f, InfiniteMoE) for f in model.ffn_layers())
    return ParamReport(name, config.ffn, total, active, flops, exact)
