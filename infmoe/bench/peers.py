"""The peer the bench times our layers against: HF transformers' Mixtral MoE block, at the
parameters of an ∞-MoE FFN, where transformers imports."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from infmoe.layers import FFNLayer
from infmoe.layers.base import init_normal_


def _mixtral() -> tuple[type, type] | None:
    """(MixtralConfig, MixtralSparseMoeBlock), or None where transformers does not import."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    return MixtralConfig, MixtralSparseMoeBlock


def transformers_version() -> str | None:
    if _mixtral() is None:
        return None
    import transformers

    return transformers.__version__


class MixtralPeer(FFNLayer):
    """HF transformers' `MixtralSparseMoeBlock`, x (T, d) → (T, d), at the total and active
    parameters of an ∞-MoE of width H at N = 50%: 8 SwiGLU experts of width H/8 · 2/3
    (three matrices where a GELU MLP has two), 4 per token. HF takes (batch, T, d).

    `flops_per_token` counts the router and the three matmuls of each of the top-k experts
    (tests hold it to the matmuls seen at dispatch)."""

    n_experts, top_k = 8, 4

    def __init__(self, d_model: int, d_hidden: int, experts_implementation: str) -> None:
        super().__init__(d_model, d_hidden)
        config_cls, block_cls = _mixtral()
        config = config_cls(hidden_size=d_model, intermediate_size=(d_hidden // self.n_experts) * 2 // 3,
                            num_local_experts=self.n_experts, num_experts_per_tok=self.top_k)
        config._experts_implementation = experts_implementation
        self.block = block_cls(config)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        # HF initialises in `PreTrainedModel.post_init`; the block alone holds torch.empty.
        for p in self.block.parameters():
            init_normal_(p, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.unsqueeze(0)).squeeze(0)

    def active_parameters(self, n_samples: int = 1) -> float:
        experts = self.block.experts
        per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) / self.n_experts
        return self.block.gate.weight.numel() + self.top_k * per_expert

    def flops_per_token(self, n_samples: int = 1, union: float | None = None,
                        executed: bool = False) -> float:
        router = 2 * self.d_model * self.n_experts
        return router + self.top_k * 3 * 2 * self.d_model * self.block.experts.intermediate_dim


def peer_label(experts_implementation: str) -> str:
    return f"HF Mixtral block 4 of 8, {experts_implementation}"


PEER_IMPLEMENTATIONS = ("eager", "grouped_mm")


def peer_variants(d_model: int, d_hidden: int) -> dict[str, Callable[[], nn.Module]]:
    """The HF Mixtral peers (name → constructor) at the widths of an ∞-MoE (d_model, d_hidden),
    where transformers imports; else none."""
    if _mixtral() is None:
        return {}
    return {peer_label(impl): (lambda impl=impl: MixtralPeer(d_model, d_hidden, impl))
            for impl in PEER_IMPLEMENTATIONS}
