"""Conventional top-k mixture of experts, the baseline ∞-MoE is compared against.

E experts, each a GPT-2 MLP of width d_hidden_total / E, stored as stacked tensors. A linear
router scores the experts; each token goes to its top-k, weighted by the softmax of the
router logits renormalised over those k. Switch load balancing and router z-loss are the
auxiliary losses. Dropless unless a capacity factor is given.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from infmoe.errors import divisor, invalid, positive_int, real
from infmoe.layers.base import FFNAux, FFNLayer, at_least_fp32, gelu, init_normal_


class TopKMoE(FFNLayer):
    """Top-k MoE feed-forward layer: x (..., d_model) → (..., d_model).

    Args:
        d_model: model width d.
        d_hidden: total hidden width over all experts; each expert has d_hidden / n_experts.
        n_experts: E.
        top_k: experts per token, 1 <= k <= E.
        capacity_factor: None for dropless; else each expert takes at most
            ceil(capacity_factor · T · k / E) of the T·k assignments, in token order, and
            drops the rest (a dropped assignment contributes zero).
        load_balance_weight: weight of the Switch loss E · Σ_i f_i P_i (1 when balanced).
        z_loss_weight: weight of the router z-loss mean_t logsumexp(logits_t)².
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        *,
        n_experts: int = 8,
        top_k: int = 2,
        capacity_factor: float | None = None,
        load_balance_weight: float = 0.01,
        z_loss_weight: float = 0.001,
    ) -> None:
        super().__init__(positive_int("d_model", d_model), positive_int("d_hidden", d_hidden))
        self.n_experts = divisor("n_experts", n_experts, d_hidden, "d_hidden")
        self.top_k = positive_int("top_k", top_k)
        if top_k > n_experts:
            raise invalid("top_k", top_k, f"must be <= n_experts={n_experts}")
        self.d_expert = d_hidden // n_experts
        self.capacity_factor = capacity_factor
        if capacity_factor is not None:
            self.capacity_factor = real("capacity_factor", capacity_factor, low=0, open_low=True)
        self.load_balance_weight = real("load_balance_weight", load_balance_weight, low=0)
        self.z_loss_weight = real("z_loss_weight", z_loss_weight, low=0)

        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, self.d_expert))
        self.b_in = nn.Parameter(torch.empty(n_experts, self.d_expert))
        self.w_out = nn.Parameter(torch.empty(n_experts, self.d_expert, d_model))
        self.b_out = nn.Parameter(torch.empty(n_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        init_normal_(self.router.weight, std)
        init_normal_(self.w_in, std)
        init_normal_(self.w_out, std if out_std is None else out_std)
        nn.init.zeros_(self.b_in)
        nn.init.zeros_(self.b_out)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, d) → logits (T, E), chosen experts (T, k), their weights (T, k) summing to 1."""
        logits = self.router(x)
        top_logit, expert = logits.topk(self.top_k, dim=-1)
        weight = at_least_fp32(top_logit).softmax(dim=-1).to(x.dtype)
        return logits, expert, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)
        t = x2.shape[0]
        logits, expert, weight = self.route(x2)

        # Group the T·k (token, expert) assignments by expert: one contiguous run each.
        flat_expert = expert.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token = order // self.top_k
        counts = torch.bincount(flat_expert, minlength=self.n_experts)
        kept = counts
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * t * self.top_k / self.n_experts)
            kept = counts.clamp(max=capacity)
        starts = (torch.cumsum(counts, 0) - counts).tolist()

        y = torch.zeros_like(x2)
        for e, (start, n) in enumerate(zip(starts, kept.tolist())):
            if n == 0:
                continue
            rows = order[start : start + n]
            tok = token[start : start + n]
            h = gelu(torch.addmm(self.b_in[e], x2[tok], self.w_in[e]))
            out = torch.addmm(self.b_out[e], h, self.w_out[e])
            y.index_add_(0, tok, out * weight.reshape(-1)[rows].unsqueeze(-1))

        self.aux = self._report(logits, counts, kept, t)
        return y.reshape(*lead, self.d_model)

    def load_balance_loss(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Switch Transformer: E · Σ_i f_i · P_i with f_i the share of the T·k assignments
        routed to expert i and P_i its mean router probability. 1 when perfectly balanced."""
        probs = at_least_fp32(logits).softmax(dim=-1)
        share = counts.to(probs.dtype) / counts.sum()
        return self.n_experts * (share * probs.mean(0)).sum()

    @staticmethod
    def z_loss(logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(at_least_fp32(logits), dim=-1).square().mean()

    def _report(self, logits: torch.Tensor, counts: torch.Tensor, kept: torch.Tensor, t: int) -> FFNAux:
        balance = self.load_balance_loss(logits, counts)
        z = self.z_loss(logits)
        load = counts.float() / (t * self.top_k)
        stats = {
            "load_balance": balance.detach(),
            "z_loss": z.detach(),
            "expert_load": load,  # share of assignments per expert
            "used_fraction": (counts > 0).float().mean(),
            "dropped_fraction": 1 - kept.sum().float() / (t * self.top_k),
        }
        loss = self.load_balance_weight * balance + self.z_loss_weight * z
        return FFNAux(loss=loss if self.load_balance_weight or self.z_loss_weight else None, stats=stats)

    def active_parameters(self, n_samples: int = 1) -> float:
        per_expert = (self.w_in[0].numel() + self.b_in[0].numel()
                      + self.w_out[0].numel() + self.b_out[0].numel())
        return self.router.weight.numel() + self.top_k * per_expert

    def flops_per_token(self, n_samples: int = 1) -> float:
        router = 2 * self.d_model * self.n_experts
        return router + self.top_k * 2 * 2 * self.d_model * self.d_expert
