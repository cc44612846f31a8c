"""Conventional top-k mixture of experts, the baseline ∞-MoE is compared against.

E routed experts, each a feed-forward net of width B = d_hidden / (E + S), stored as
stacked tensors: GPT-2's GELU MLP, or a GLU (Mixtral's SwiGLU experts). A linear router
scores the routed experts; each token goes to its top-k, weighted by the softmax of the
router logits renormalised over those k (times ``routed_scale``). S shared experts
(DeepSeekMoE), of the same kind and width, take every token, unweighted. Switch load
balancing and router z-loss are the auxiliary losses. Dropless unless a capacity factor is
given.

The (token, expert) assignments are sorted by expert; option ``impl`` picks how the experts
then run: "grouped" (default) as grouped matmuls over the sorted assignments with a custom
backward (`infmoe.layers.grouped`, shared with ∞-MoE's sparse path), "loop" as one pair of
matmuls per expert in a Python loop with autograd (the reference). Same result, same aux
losses. The shared experts are one dense FFN of width S · B on both.

"grouped" follows the plan of its device (`infmoe.layers.dispatch`). On the host plan
(eager CPU) the kept assignments are counted on the host and only they are computed. On the
static plan (CUDA, and under `torch.compile`) nothing is read on the host and every shape
is fixed: all T·k assignments are rows, and an assignment dropped for capacity stays a row
with gate 0, computed and contributing exactly zero. "loop" is host-only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from infmoe.errors import choose, flag, invalid, positive_int, real
from infmoe.layers.activation import hidden, in_rows
from infmoe.layers.base import FFNAux, FFNLayer, at_least_fp32, init_normal_, routing_linear
from infmoe.layers.dispatch import planned_device, static_plan
from infmoe.layers.glu import ACTIVATIONS
from infmoe.layers.grouped import grouped_ffn, grouped_ffn_static

IMPLS = ("grouped", "loop")


class ExpertChoice(NamedTuple):
    """What `TopKMoE.choose_experts` decides for T tokens.

    logits (T, E): router logits, at least fp32 (the auxiliary losses read them).
    expert (T, k): the chosen experts, best first.
    weight (T, k): their weights, summing to routed_scale, in x's dtype.
    """

    logits: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor


class TopKMoE(FFNLayer):
    """Top-k MoE feed-forward layer: x (..., d_model) → (..., d_model).

    Args:
        d_model: model width d.
        d_hidden: total hidden width over all experts, routed and shared; each expert has
            B = d_hidden / (n_experts + shared_experts) hidden units. So the total
            parameters are set by d_hidden alone, as for a dense FFN of that width, and the
            active ones by (top_k + shared_experts) · B: with d_hidden = 2 H_dense, as the
            ∞-MoE configs have, equal active width means top_k + S = (E + S) / 2.
        n_experts: E, the routed experts (the router's outputs).
        top_k: routed experts per token, 1 <= k <= E.
        capacity_factor: None for dropless; else each expert takes at most
            ceil(capacity_factor · T · k / E) of the T·k assignments, in token order, and
            drops the rest (a dropped assignment contributes zero; on the static plan it is
            still computed, with gate 0, so that shapes stay fixed).
        load_balance_weight: weight of the Switch loss E · Σ_i f_i P_i (1 when balanced).
        z_loss_weight: weight of the router z-loss mean_t logsumexp(logits_t)².
        impl: "grouped" runs all experts as grouped matmuls; "loop" one expert at a time
            (the reference). Same result.
        routed_scale: multiplies the k routing weights (DeepSeek-V3's routed scaling
            factor). The renormalised weights sum to 1, so k narrow experts start out with
            a far smaller output than one wide MLP; ``routed_scale=top_k`` gives fine-grained
            experts about a dense MLP's output scale at initialisation.
        glu: the experts are gated FFNs W_out(act(W_gate x + b_gate) ⊙ (W_up x + b_up)) + b_out
            (`layers.glu`; with SiLU, Mixtral's experts), w_in (E, d, 2B) holding each
            expert's B gate columns, then its B up columns (`layers.activation`); False
            (default): GPT-2's GELU MLP, w_in (E, d, B). Three matrices instead of two: at
            the parameters of a GELU MoE, d_hidden is 2/3 of its (tiny: 8 experts of 128,
            d_hidden 1024, against tiny-moe's 1536). The same option as `InfiniteMoE`'s.
        activation: the GLU gate's activation, "silu" (SwiGLU, the default with glu) or
            "gelu" (GEGLU, GPT-2's tanh form). The MLP experts are GELU only (None or
            "gelu"), as `DenseMLP` and ∞-MoE's MLP are.
        shared_experts: S >= 0 experts every token uses (DeepSeekMoE), beside the routed
            ones: same kind and width B, added to the routed output unweighted by the
            router and outside the balance loss. Stored as one dense FFN of width S · B
            (shared_in, shared_out: their sum is exactly that FFN, as in DeepSeek's code),
            whose rows are the S experts' in order, with one output bias for all S.
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
        impl: str = "grouped",
        routed_scale: float = 1.0,
        glu: bool = False,
        activation: str | None = None,
        shared_experts: int = 0,
    ) -> None:
        super().__init__(positive_int("d_model", d_model), positive_int("d_hidden", d_hidden))
        if type(shared_experts) is not int or shared_experts < 0:  # bools excluded
            raise invalid("shared_experts", shared_experts, "must be an integer >= 0")
        self.shared_experts = shared_experts
        self.n_experts = positive_int("n_experts", n_experts)
        if d_hidden % (n_experts + shared_experts):
            raise invalid("n_experts", n_experts,
                          f"n_experts + shared_experts ({shared_experts}) must divide d_hidden={d_hidden}")
        self.top_k = positive_int("top_k", top_k)
        if top_k > n_experts:
            raise invalid("top_k", top_k, f"must be <= n_experts={n_experts}")
        self.d_expert = d_hidden // (n_experts + shared_experts)
        self.glu = flag("glu", glu)
        if not glu and activation not in (None, "gelu"):
            raise invalid("activation", activation,
                          "the MLP experts are GELU only ('gelu'); 'silu' needs glu=true")
        default = "silu" if glu else "gelu"
        self.activation = choose("activation", default if activation is None else activation, ACTIVATIONS)
        self.capacity_factor = capacity_factor
        if capacity_factor is not None:
            self.capacity_factor = real("capacity_factor", capacity_factor, low=0, open_low=True)
        self.load_balance_weight = real("load_balance_weight", load_balance_weight, low=0)
        self.z_loss_weight = real("z_loss_weight", z_loss_weight, low=0)
        self.impl = choose("impl", impl, IMPLS)
        self.routed_scale = real("routed_scale", routed_scale, low=0, open_low=True)

        self.router = nn.Linear(d_model, n_experts, bias=False)
        rows = in_rows(self.d_expert, self.glu_activation)
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, rows))
        self.b_in = nn.Parameter(torch.empty(n_experts, rows))
        self.w_out = nn.Parameter(torch.empty(n_experts, self.d_expert, d_model))
        self.b_out = nn.Parameter(torch.empty(n_experts, d_model))
        if shared_experts:
            self.shared_in = nn.Linear(d_model, shared_experts * rows)
            self.shared_out = nn.Linear(shared_experts * self.d_expert, d_model)
        self.reset_parameters()

    @property
    def glu_activation(self) -> str | None:
        """The GLU gate's activation, None for MLP experts: what `layers.activation` takes."""
        return self.activation if self.glu else None

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        out_std = std if out_std is None else out_std
        init_normal_(self.router.weight, std)
        init_normal_(self.w_in, std)
        init_normal_(self.w_out, out_std)
        nn.init.zeros_(self.b_in)
        nn.init.zeros_(self.b_out)
        if self.shared_experts:
            init_normal_(self.shared_in.weight, std)
            init_normal_(self.shared_out.weight, out_std)
            nn.init.zeros_(self.shared_in.bias)
            nn.init.zeros_(self.shared_out.bias)

    def choose_experts(self, x: torch.Tensor) -> ExpertChoice:
        """x (T, d) → the top-k experts of each token and their weights (`ExpertChoice`).

        The router runs in at least fp32 with autocast off: bf16 logits tie or swap order
        between near-equal experts, so the choice would depend on the precision setting.
        """
        logits = routing_linear(x, self.router)
        top_logit, expert = logits.topk(self.top_k, dim=-1)
        weight = top_logit.softmax(dim=-1)
        if self.routed_scale != 1.0:
            weight = weight * self.routed_scale
        weight = weight.to(x.dtype)  # the loop path adds weighted outputs into x's dtype
        return ExpertChoice(logits, expert, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)
        t = x2.shape[0]
        logits, expert, weight = self.choose_experts(x2)
        if self.impl == "grouped" and static_plan(planned_device(x.device)):
            y, counts, kept = self.static_experts(x2, expert, weight)
        else:
            rows, counts, kept = self.assign(expert, t)
            token, row_weight = rows // self.top_k, weight.reshape(-1)[rows]
            if self.impl == "grouped":
                y = self.grouped_experts(x2, token, expert.reshape(-1)[rows], row_weight, kept)
            else:
                y = self.loop_experts(x2, token, kept, row_weight)
        if self.shared_experts:
            y = y + self.shared_ffn(x2)
        self.aux = self._report(logits, counts, kept, t)
        return y.reshape(*lead, self.d_model)

    def shared_ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The S shared experts' summed output, x (T, d) → (T, d): one dense FFN of width S · B."""
        return self.shared_out(hidden(self.shared_in(x), self.d_expert, self.glu_activation))

    def assign(self, expert: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Group the T·k (token, expert) assignments by expert, dropping over capacity (host plan).

        expert (T, k) → rows, counts, kept: rows (n_kept,) indices into the flattened
        (T·k) assignments, sorted by expert and within one expert in token order; counts
        (E,) assignments per expert before dropping; kept (E,) after.
        """
        flat_expert = expert.reshape(-1)
        order = flat_expert.argsort(stable=True)
        counts = torch.bincount(flat_expert, minlength=self.n_experts)
        if self.capacity_factor is None:
            return order, counts, counts
        capacity = self.expert_capacity(t)
        return order[self._rank(flat_expert, order, counts) < capacity], counts, counts.clamp(max=capacity)

    def static_experts(self, x: torch.Tensor, expert: torch.Tensor,
                       weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fast path on the static plan: x (T, d), expert and weight (T, k) → y (T, d),
        counts (E,) and kept (E,) as `assign` gives them, with nothing read on the host.

        All T·k assignments are rows, in token order (fixed shape); one dropped for capacity
        keeps its row with gate 0: computed, contributing exactly zero to y and to every
        gradient, as on the host plan where it is absent.
        """
        flat_expert = expert.reshape(-1)
        # bincount's output shape depends on the values: count by adding ones instead
        ones = torch.ones_like(flat_expert)
        counts = flat_expert.new_zeros(self.n_experts).index_add_(0, flat_expert, ones)
        gate, kept = weight.reshape(-1), counts
        if self.capacity_factor is not None:
            capacity = self.expert_capacity(x.shape[0])
            order = flat_expert.argsort(stable=True)
            rank = torch.empty_like(order).scatter_(0, order, self._rank(flat_expert, order, counts))
            gate, kept = torch.where(rank < capacity, gate, 0), counts.clamp(max=capacity)
        token = torch.arange(flat_expert.numel(), device=x.device) // self.top_k
        return self.grouped_experts(x, token, flat_expert, gate), counts, kept

    def expert_capacity(self, t: int) -> int:
        """Assignments one expert keeps at most, of T tokens' T·k."""
        return math.ceil(self.capacity_factor * t * self.top_k / self.n_experts)

    @staticmethod
    def _rank(flat_expert: torch.Tensor, order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rank (T·k,) of each assignment of `order` (sorted by expert, stable) within its
        expert's run: 0 for the expert's first in token order."""
        starts = torch.cumsum(counts, 0) - counts
        return torch.arange(order.numel(), device=order.device) - starts[flat_expert[order]]

    def grouped_experts(self, x: torch.Tensor, token: torch.Tensor, row_expert: torch.Tensor,
                        row_weight: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        """Fast path. x (T, d); per row: token, expert and weight (rows,). kept (E,): the
        rows per expert, rows sorted by expert (host plan); None: rows in any order, nothing
        read on the host (static plan). → (T, d)."""
        if kept is None:
            y = grouped_ffn_static(x, token, row_expert, row_weight, self.w_in, self.b_in, self.w_out,
                                   glu=self.glu_activation)
        else:
            y = grouped_ffn(x, token, kept, row_weight, self.w_in, self.b_in, self.w_out,
                            glu=self.glu_activation)
        # Output biases: Σ over a token's assignments of weight · b_out[expert], as one matmul.
        combine = x.new_zeros(x.shape[0], self.n_experts).index_put((token, row_expert), row_weight)
        return y + combine.to(y.dtype) @ self.b_out.to(y.dtype)

    def loop_experts(self, x: torch.Tensor, token: torch.Tensor, kept: torch.Tensor,
                     row_weight: torch.Tensor) -> torch.Tensor:
        """Reference path, one expert at a time; arguments as `grouped_experts`."""
        y = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(kept.tolist()):
            tok, w = token[start : start + n], row_weight[start : start + n, None]
            start += n
            if n:
                a = torch.addmm(self.b_in[e], x[tok], self.w_in[e])
                h = hidden(a, self.d_expert, self.glu_activation)
                y.index_add_(0, tok, torch.addmm(self.b_out[e], h, self.w_out[e]) * w)
        return y

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
        """The router, the top_k routed experts a token uses and the shared experts."""
        per_expert = (self.w_in[0].numel() + self.b_in[0].numel()
                      + self.w_out[0].numel() + self.b_out[0].numel())
        shared = sum(p.numel() for name, p in self.named_parameters() if name.startswith("shared_"))
        return self.router.weight.numel() + self.top_k * per_expert + shared

    def flops_per_token(self, n_samples: int = 1, union: float | None = None,
                        executed: bool = False) -> float:
        # Both paths compute exactly the k chosen experts (fewer only where capacity drops, on
        # the host plan: the static plan computes dropped assignments too, with gate 0), and
        # the shared ones; each expert has two matrices of d × B, three for a GLU.
        router = 2 * self.d_model * self.n_experts
        matrices = 3 if self.glu else 2
        return router + (self.top_k + self.shared_experts) * 2 * matrices * self.d_model * self.d_expert
