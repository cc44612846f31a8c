"""∞-MoE: a mixture of experts whose expert index z is continuous (arXiv 2601.17680).

A Gaussian router gives p(z | x) = N(μ(x), diag σ(x)²). Each sample z_k = μ + σ ⊙ ε_k
scores the H/B blocks of one large FFN (s = A z + c); the top ceil(N · H/B) blocks are kept
and gated by g(s), the others are exactly zero. The K samples are averaged into one mask
m̄ = mean_k m(z_k), applied once: y = W_out (m̄ ⊙ GELU(W_in x + b_in)) + b_out.

Two execution paths compute the same y (option ``impl``):

- "masked", the reference: the whole large FFN for every token, then m̄. Costs the full
  width H whatever N and K are.
- "sparse": only the (token, block) pairs in the union of the token's K masks, as grouped
  matmuls over the pairs sorted by block (`infmoe.layers.grouped`), forward and backward.
  Costs the union fraction of H, plus gathering each token's row once per kept block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from infmoe.errors import choose, divisor, flag, invalid, positive_int, real
from infmoe.layers.base import FFNAux, FFNLayer, count_kept, gelu, init_normal_, routing_linear
from infmoe.layers.full_width import full_width_ffn, gate_scores, top_n_mask
from infmoe.layers.grouped import grouped_ffn
from infmoe.layers.rows import rows_ffn

MODES = ("sample", "mean", "adaptive")
GATES = ("sigmoid", "softmax", "constant")
IMPLS = ("auto", "full", "sparse", "rows", "masked")
# Without gradients "auto" reads rows for one token, and for more when tokens × union
# fraction is at most this; beyond it one pass over every row (the full path) is cheaper.
ROWS_LIMIT = 0.8
# Tokens (spread over the batch) on which `sample_disagreement` draws its two samples: enough
# for a mean over tokens (and over the steps between two log lines), few enough to cost
# little next to the layer at any B.
DISAGREEMENT_TOKENS = 128


class Route(NamedTuple):
    """The router's p(z | x) = Σ_c π_c N(μ_c, diag σ_c²) for T tokens.

    mu, sigma (T, C, d_z): each component's Gaussian, in at least fp32.
    log_pi (T, C): the log mixture weights; None for the paper's single Gaussian (C = 1).
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    log_pi: torch.Tensor | None

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and standard deviation of p(z | x), each (T, d_z)."""
        if self.log_pi is None:
            return self.mu[:, 0], self.sigma[:, 0]
        pi = self.log_pi.exp().unsqueeze(-1)
        mean = (pi * self.mu).sum(1)
        second = (pi * (self.sigma.square() + self.mu.square())).sum(1)
        return mean, (second - mean.square()).clamp_min(0).sqrt()

    def kl(self) -> torch.Tensor:
        """(T,) KL(p(z | x) || N(0, I)) per token. For a mixture, the KL of the joint
        p(c, z | x) from a uniform p(c) times N(0, I), which bounds the mixture's own KL
        (no closed form) from above: KL(π || uniform) + Σ_c π_c KL(N_c || N(0, I))."""
        mu, sigma = self.mu, self.sigma
        per_component = 0.5 * (sigma.square() + mu.square() - 1 - 2 * sigma.log()).sum(-1)  # (T, C)
        if self.log_pi is None:
            return per_component[:, 0]
        pi = self.log_pi.exp()
        return (pi * (self.log_pi + math.log(pi.shape[1]))).sum(-1) + (pi * per_component).sum(-1)

    def sample(self, noise: torch.Tensor, generator: torch.Generator | None = None,
               relaxed: bool = False) -> torch.Tensor:
        """noise ε (K, T, d_z) → z (K, T, d_z). One Gaussian: z = μ + σ ε. A mixture: each
        sample first draws its component c ~ π (Gumbel-max, from `generator` if given), then
        z = μ_c + σ_c ε. relaxed: the straight-through Gumbel-softmax estimator (Jang et al.
        2017, arXiv 1611.01144), so that π gets a gradient; z's value is unchanged."""
        if self.log_pi is None:
            return self.mu[:, 0] + self.sigma[:, 0] * noise
        k, (t, c) = noise.shape[0], self.log_pi.shape
        uniform = torch.rand((k, t, c), generator=generator, device=noise.device, dtype=noise.dtype)
        perturbed = self.log_pi - torch.log(-torch.log(uniform.clamp_min(1e-20)))  # (K, T, C)
        weight = F.one_hot(perturbed.argmax(-1), c).to(noise.dtype)
        if relaxed:
            soft = perturbed.softmax(-1)
            weight = weight + soft - soft.detach()
        components = self.mu + self.sigma * noise.unsqueeze(2)  # (K, T, C, d_z)
        return (weight.unsqueeze(-1) * components).sum(2)

    def rows(self, index: torch.Tensor) -> Route:
        """The distributions of the tokens `index` (1-D)."""
        return Route(self.mu[index], self.sigma[index], None if self.log_pi is None else self.log_pi[index])

    def mode_mean(self) -> torch.Tensor:
        """(T, d_z): z for mode "mean", μ of the most probable component."""
        if self.log_pi is None:
            return self.mu[:, 0]
        return self.mu.gather(1, self.log_pi.argmax(-1)[:, None, None].expand(-1, 1, self.mu.shape[-1]))[:, 0]


class Selection(NamedTuple):
    """The blocks each routing sample keeps, from `InfiniteMoE.select`.

    index (K, T, n_kept): the kept blocks of each sample (distinct within a sample).
    gate (K, T, n_kept): their weights, already divided by K.
    mu, sigma (T, d_z): the router's Gaussian p(z | x).
    All floating tensors are at least fp32, whatever autocast is on.
    """

    index: torch.Tensor
    gate: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor


class InfiniteMoE(FFNLayer):
    """∞-MoE feed-forward layer: x (..., d_model) → (..., d_model).

    Args:
        d_model: model width d.
        d_hidden: width H of the one large FFN (the paper uses 2 × the dense width).
        d_z: dimension of the continuous expert index z.
        active_fraction: N, the fraction of blocks each sample keeps, in (0, 1].
        block_size: B, hidden units per block; H must be divisible by B. 1 = per unit.
        n_samples: K, samples of z averaged per token (mode "sample"); changeable later.
        mode: "sample" draws z ~ p(z|x); "mean" uses z = μ(x) (deterministic, one mask);
            "adaptive" lets each token choose its own K up to n_samples (`adaptive_keep`).
        gate: weight of a kept block from its score s: "sigmoid" σ(s); "softmax" over the
            kept scores, scaled so the gates sum to the number kept; "constant" 1 (no
            gradient reaches the router through the output).
        sigma_min: floor added to σ = softplus(·) so sampling never collapses to a point.
        kl_weight: weight of KL(p(z|x) || N(0, I)) (mean over tokens) in ``aux.loss``.
        kl_free: free bits (Kingma et al. 2016, arXiv 1606.04934), a noise target instead of
            a penalty: each token's KL is penalised only beyond this many nats, so the
            router may spend up to kl_free on token-dependent routing and no more; μ cannot
            outgrow σ without paying kl_weight per nat. 0 (the default): the plain KL term.
        n_components: C, Gaussians in the router's mixture p(z|x) = Σ_c π_c(x) N(μ_c(x),
            diag σ_c(x)²) (the paper's future work), so a token's K samples can land in
            different modes. Training passes π a gradient by the straight-through Gumbel-
            softmax; mode "mean" uses the most probable component's μ. 1 (the default): the
            paper's single Gaussian.
        mu_norm: scale-free routing: μ is divided by its RMS over d_z (each token's μ then
            has the prior's scale, |μ|² = d_z), so σ is noise relative to μ and a growing μ
            cannot outgrow it. Off by default (the paper's router).
        train_samples: training that rewards averaging: each training forward draws its K
            uniformly from these (e.g. (1, 2, 4)), so the model learns to use one sample and
            to gain from several. Inference and `eval()` use n_samples. Empty (the default):
            training uses n_samples too.
        impl: how the FFN is computed; every choice gives the same y (tests hold each to
            "masked"). "full": every unit, then the gates, routing fused in (for small
            blocks: `infmoe.layers.full_width`). "sparse": only the chosen blocks, as grouped
            matmuls (`infmoe.layers.grouped`). "rows": inference only, reads just the chosen
            rows (decoding: `infmoe.layers.rows`). "masked": the plain-autograd reference.
            "auto" picks per call, see `plan`.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        *,
        d_z: int,
        active_fraction: float = 0.5,
        block_size: int = 1,
        n_samples: int = 1,
        mode: str = "sample",
        gate: str = "sigmoid",
        sigma_min: float = 0.01,
        kl_weight: float = 0.0,
        kl_free: float = 0.0,
        n_components: int = 1,
        mu_norm: bool = False,
        train_samples: tuple[int, ...] | list[int] = (),
        impl: str = "auto",
    ) -> None:
        super().__init__(positive_int("d_model", d_model), positive_int("d_hidden", d_hidden))
        self.d_z = positive_int("d_z", d_z)
        self.block_size = divisor("block_size", block_size, d_hidden, "d_hidden")
        self.n_blocks = d_hidden // block_size
        self.active_fraction = real("active_fraction", active_fraction, low=0, high=1, open_low=True)
        self.n_kept = count_kept(active_fraction, self.n_blocks)
        self.gate = choose("gate", gate, GATES)
        self.sigma_min = real("sigma_min", sigma_min, low=0)
        self.kl_weight = real("kl_weight", kl_weight, low=0)
        self.kl_free = real("kl_free", kl_free, low=0)
        self.n_components = positive_int("n_components", n_components)
        self.mu_norm = flag("mu_norm", mu_norm)
        if not isinstance(train_samples, (tuple, list)):
            raise invalid("train_samples", train_samples, "must be a list of sample counts, e.g. [1, 2, 4]")
        self.train_samples = tuple(positive_int("train_samples", k) for k in train_samples)
        self.impl = choose("impl", impl, IMPLS)
        self.n_samples = n_samples
        self.mode = mode

        # → (μ, pre-softplus σ) per component, then C mixture logits (none for C = 1)
        c = self.n_components
        self.router = nn.Linear(d_model, c * 2 * d_z + (c if c > 1 else 0))
        self.score = nn.Linear(d_z, self.n_blocks)  # z → one score per block
        # Both projections stored (H, d) so a block is a contiguous slice of rows.
        self.w_in = nn.Parameter(torch.empty(d_hidden, d_model))
        self.b_in = nn.Parameter(torch.empty(d_hidden))
        self.w_out = nn.Parameter(torch.empty(d_hidden, d_model))
        self.b_out = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    # K and mode are validated on every assignment, so a built model can be retuned safely.
    @property
    def n_samples(self) -> int:
        return self._n_samples

    @n_samples.setter
    def n_samples(self, value: int) -> None:
        self._n_samples = positive_int("n_samples", value)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = choose("mode", value, MODES)

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        init_normal_(self.router.weight, std)
        nn.init.zeros_(self.router.bias)
        # Unit-variance scores for unit-variance z, so sampling noise moves the masks.
        init_normal_(self.score.weight, self.d_z**-0.5)
        nn.init.zeros_(self.score.bias)
        init_normal_(self.w_in, std)
        init_normal_(self.w_out, std if out_std is None else out_std)
        nn.init.zeros_(self.b_in)
        nn.init.zeros_(self.b_out)

    def route(self, x: torch.Tensor) -> Route:
        """x (T, d) → the router's p(z | x), in at least fp32."""
        out = routing_linear(x, self.router)
        c, t = self.n_components, x.shape[0]
        log_pi = out[:, -c:].log_softmax(-1) if c > 1 else None
        mu, pre_sigma = out[:, : c * 2 * self.d_z].view(t, c, 2 * self.d_z).chunk(2, dim=-1)
        if self.mu_norm:
            mu = mu * torch.rsqrt(mu.square().mean(-1, keepdim=True) + 1e-6)
        return Route(mu, F.softplus(pre_sigma) + self.sigma_min, log_pi)

    def router_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, d) → μ, σ of p(z | x), each (T, d_z), in at least fp32: the Gaussian's, or
        the mixture's mean and standard deviation."""
        return self.route(x).moments()

    def sample_z(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, Route]:
        """x (T, d) → z (K, T, d_z) and p(z | x): K samples z = μ + σ ε (ε standard normal,
        or `noise` (K, T, d_z); a mixture draws each sample's component first), or z = μ in
        mode "mean"; in at least fp32, autocast off."""
        with torch.autocast(x.device.type, enabled=False):
            route = self.route(x)
            if self.mode == "mean":
                if noise is not None:
                    raise invalid("noise", "tensor", 'mode="mean" draws no noise; pass None')
                return route.mode_mean().unsqueeze(0), route
            mu = route.mu
            if noise is None:
                noise = torch.randn((self.n_samples, x.shape[0], self.d_z), dtype=mu.dtype, device=mu.device)
            relaxed = torch.is_grad_enabled() and self.training
            return route.sample(noise.to(mu.dtype), relaxed=relaxed), route

    def select(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> Selection:
        """The blocks each of K samples z ~ p(z | x) keeps, and their gates. x (T, d).

        noise (K, T, d_z) replaces the standard-normal draw ε; K is then noise.shape[0].
        Routing runs in at least fp32 with autocast off (ε drawn in fp32 too): in bf16,
        near-equal scores at the top-N boundary tie or swap, and the kept blocks would
        change with the precision setting.
        """
        return self._select(x, noise)[0]

    def _select(self, x: torch.Tensor, noise: torch.Tensor | None
                ) -> tuple[Selection, Route, torch.Tensor | None]:
        """`select`, with p(z | x) and, in mode "adaptive", the (K, T) samples each token kept."""
        if self.mode == "adaptive":
            return self._adaptive_select(x, noise)
        z, route = self.sample_z(x, noise)
        mu, sigma = route.moments()
        index, gate = self._top_blocks(z)
        return Selection(index, gate / z.shape[0], mu, sigma), route, None

    def _top_blocks(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., d_z) → the kept blocks and their gates (not yet divided by K), each (..., n_kept)."""
        with torch.autocast(z.device.type, enabled=False):
            top_score, index = routing_linear(z, self.score).topk(self.n_kept, dim=-1, sorted=False)
            if self.gate == "sigmoid":
                gate = torch.sigmoid(top_score)
            elif self.gate == "softmax":
                gate = top_score.softmax(dim=-1) * self.n_kept
            else:
                gate = torch.ones_like(top_score)
        return index, gate

    def _adaptive_select(self, x: torch.Tensor, noise: torch.Tensor | None
                         ) -> tuple[Selection, Route, torch.Tensor]:
        """Mode "adaptive", in rounds over samples (not over tokens): samples 0 and 1 for every
        token, then sample k only for the tokens whose sample k − 1 still grew their union, so
        the routing costs the samples actually drawn. The rule is `adaptive_keep`'s, the
        reference this is tested against. noise (K_max, T, d_z) fixes the draws. Returns the
        selection as (K, T, n_kept) for the K rounds run (a token's samples after it stopped
        repeat its first sample's blocks with gate 0, so the union and the mean mask are
        those of the samples it kept), p(z | x), and the (K, T) bool samples kept."""
        t, k_max = x.shape[0], noise.shape[0] if noise is not None else self.n_samples
        relaxed = torch.is_grad_enabled() and self.training
        with torch.autocast(x.device.type, enabled=False):
            route = self.route(x)

            def draw(k: int, rows: torch.Tensor | None, count: int) -> tuple[torch.Tensor, torch.Tensor]:
                part = route if rows is None else route.rows(rows)
                eps = (noise[k:k + count] if rows is None else noise[k:k + 1, rows]) if noise is not None else None
                if eps is None:
                    eps = torch.randn((count, part.mu.shape[0], self.d_z), device=x.device, dtype=part.mu.dtype)
                return self._top_blocks(part.sample(eps.to(part.mu.dtype), relaxed=relaxed))

            first = min(k_max, 2)
            index, gate = draw(0, None, first)  # (first, T, n_kept)
            indices, gates = list(index.unbind(0)), list(gate.unbind(0))
            keep = [torch.ones(t, dtype=torch.bool, device=x.device)] * first
            union = torch.zeros(t, self.n_blocks, dtype=torch.bool, device=x.device).scatter_(1, index[0], True)
            active = torch.arange(t, device=x.device)
            for k in range(1, k_max):
                if k >= 2:  # the tokens still drawing get sample k
                    if active.numel() == 0:
                        break
                    sub_index, sub_gate = (v[0] for v in draw(k, active, 1))
                    indices.append(indices[0].index_copy(0, active, sub_index))
                    gates.append(gates[0].new_zeros(t, self.n_kept).index_copy(0, active, sub_gate))
                    keep.append(torch.zeros_like(keep[0]).index_fill_(0, active, True))
                new = torch.zeros(active.numel(), self.n_blocks, dtype=torch.bool, device=x.device)
                new.scatter_(1, indices[k][active], True)
                grew = (new & ~union[active]).any(-1)
                union[active] |= new
                active = active[grew]
        kept = torch.stack(keep)  # (K, T)
        gate = torch.stack(gates) * (kept / kept.sum(0)).unsqueeze(-1)
        mu, sigma = route.moments()
        return Selection(torch.stack(indices), gate, mu, sigma), route, kept

    @torch.no_grad()
    def adaptive_keep(self, index: torch.Tensor) -> torch.Tensor:
        """index (K, T, n_kept) → (K, T) bool: the samples each token averages in mode
        "adaptive". A token keeps drawing while each new sample still adds blocks to the union
        of its masks; the first sample that adds none is averaged in too (its blocks are all
        computed already, so it costs nothing on the sparse path) and ends the token's draw.
        A token whose first two samples agree thus averages 2 samples over 1 sample's blocks;
        one whose samples keep differing runs to K. Decided for every token at once from all K
        samples: the reference for the rounds `_adaptive_select` runs."""
        k, t, _ = index.shape
        masks = torch.zeros(k, t, self.n_blocks, dtype=torch.bool, device=index.device).scatter_(2, index, True)
        union = masks.cumsum(0, dtype=torch.int32) > 0  # (K, T, n_blocks): after samples 0..k
        grew = (masks[1:] & ~union[:-1]).any(-1)  # (K - 1, T): sample k + 1 added a block
        # sample 0 always; sample k >= 1 while every sample before it (from 1 on) grew the union
        still = torch.cat([grew.new_ones(1, t), grew[:-1]]).int().cumprod(0).bool()
        return torch.cat([grew.new_ones(1, t), still])[:k]

    @torch.no_grad()
    def threshold_masks(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (K, T, d_z) → (m̄, chosen), each (T, n_blocks): `mean_mask` and `union` (as
        float 0/1) by the score threshold of `infmoe.layers.full_width` instead of indices:
        the same blocks, for the inference paths (no gradient)."""
        k, t, _ = z.shape
        with torch.autocast(z.device.type, enabled=False):
            gates, keep = gate_scores(z, self.score.weight.to(z.dtype), self.score.bias.to(z.dtype), self.n_kept,
                                      sigmoid=self.gate == "sigmoid")
        if k == 1:
            return gates, keep
        return gates.view(k, t, -1).mean(0), keep.view(k, t, -1).amax(0)

    def mean_mask(self, index: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """index, gate (K, T, n_kept) → m̄ (T, n_blocks): the K gated masks summed (gates
        already carry 1/K), zero outside the union of kept blocks."""
        k, t, n = index.shape
        flat_index = index.transpose(0, 1).reshape(t, k * n)
        flat_gate = gate.transpose(0, 1).reshape(t, k * n)
        zeros = flat_gate.new_zeros(t, self.n_blocks)
        return zeros.scatter_add(1, flat_index, flat_gate)

    def masked_ffn(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reference path: the whole large FFN, then the mask. x (T, d), mask (T, n_blocks)."""
        h = gelu(F.linear(x, self.w_in, self.b_in))
        # The fp32 mask would promote a bf16 h (under autocast) to a second, fp32 (T, H).
        h = (h.view(-1, self.n_blocks, self.block_size) * mask.to(h.dtype).unsqueeze(-1)).flatten(1)
        return h @ self.w_out + self.b_out

    def sparse_ffn(self, x: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Fast path, equal to `masked_ffn`: only the (token, block) pairs with chosen[t, b].

        x (T, d); mask (T, n_blocks) the summed gates m̄; chosen (T, n_blocks) bool, the
        union of the K masks. A block several samples of a token chose is one pair whose
        gate is the sum of theirs (`mean_mask` adds them), so later samples that choose
        nothing new cost nothing. Pairs are kept by `chosen`, not by m̄ != 0, so a gate that
        underflows to zero still gets its gradient. ``nonzero`` on the block-major view
        yields the pairs sorted by block, then token: no argsort needed, and the dense
        (T, n_blocks) scan is cheaper than sorting the K · T · n_kept choices for K >= 2.
        """
        block, token = chosen.T.nonzero(as_tuple=True)
        gate = mask[token, block]
        b = self.block_size
        w_in = self.w_in.view(self.n_blocks, b, self.d_model).transpose(1, 2)  # (n_blocks, d, B)
        w_out = self.w_out.view(self.n_blocks, b, self.d_model)
        counts = chosen.sum(0)
        y = grouped_ffn(x, token, counts, gate, w_in, self.b_in.view(self.n_blocks, b), w_out)
        return y + self.b_out

    def sparse_pays(self, n_samples: int) -> bool:
        """Whether, in training, the sparse path costs less than the full one at K samples.

        Sparse computes u · H units (u: `union_fraction_bound`) but gathers each token's row
        once per block and scatters its result back, an overhead that grows as blocks shrink;
        the full path computes all of H as a dense MLP would. Modelled as sparse / full =
        u · (1.05 + 37 / B), chosen when at most 1: at N = 50%, B >= 64 for K = 1, B >= 256
        for K = 2, never for K >= 4. Fitted to these fwd+bwd times, sparse / full, on 2
        CPU threads, fp32, d = 768, H = 6144, N = 50%, 2048 tokens (`infmoe bench --grid`, the
        run docs/speed.md shows; unions about 0.50, 0.70, 0.85, 0.94 for K = 1, 2, 4, 8; the
        machine's noise ~±10%):

            B      K=1    K=2    K=4    K=8
            16     1.59   2.21   3.37   2.65
            32     1.13   1.37   1.69   1.97
            64     0.88   0.98   1.23   1.45
            128    0.63   0.84   1.12   1.14
            256    0.56   0.75   0.85   0.94
            512    0.55   0.72   0.94   1.03

        u is the bound 1 - (1 - N)^K of independent samples, known before routing; measured
        unions are smaller, so the rule errs towards the full path at K >= 2 (B = 128 with
        K = 2 and B = 256 with K = 4 would be ~15% faster sparse).
        """
        return self._sparse_pays_at(self.union_fraction_bound(n_samples))

    def _sparse_pays_at(self, union: float) -> bool:
        """`sparse_pays` for a union fraction u: u · (1.05 + 37 / B) <= 1."""
        return union * (1.05 + 37 / self.block_size) <= 1

    def plan(self, tokens: int, n_samples: int, grad: bool) -> str:
        """The impl a call takes: the fixed `impl`, or under "auto" "rows" for inference on
        one token or on few (tokens × u <= `ROWS_LIMIT`), else "sparse" where `sparse_pays`,
        else "full"."""
        if self.impl != "auto":
            return self.impl
        if not grad and (tokens == 1 or tokens * self.union_fraction_bound(n_samples) <= ROWS_LIMIT):
            return "rows"
        return "sparse" if self.sparse_pays(n_samples) else "full"

    def uses_sparse(self, n_samples: int | None = None) -> bool:
        """Whether training at K = n_samples (default: the current K, or 1 in mode "mean")
        takes the sparse path."""
        if n_samples is None:
            n_samples = 1 if self.mode == "mean" else self.n_samples
        return self.plan(tokens=2**31, n_samples=n_samples, grad=True) == "sparse"

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., d_model) → (..., d_model). noise (K, ..., d_z) fixes the draws ε."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)
        if noise is not None:
            noise = noise.reshape(noise.shape[0], -1, self.d_z)
        if noise is None and self.mode == "sample" and self.training and self.train_samples:
            k = self.train_samples[int(torch.randint(len(self.train_samples), ()))]
            noise = torch.randn((k, x2.shape[0], self.d_z), device=x2.device)
        k = 1 if self.mode == "mean" else (noise.shape[0] if noise is not None else self.n_samples)
        grad = torch.is_grad_enabled() and (x2.requires_grad or self.w_in.requires_grad)
        if self.mode == "adaptive":
            return self._adaptive_forward(x2, noise, grad).reshape(*lead, self.d_model)
        impl = self.plan(x2.shape[0], k, grad)
        if impl == "rows" and grad:
            raise invalid("impl", impl, "reads rows without gradients (inference only); use 'auto' to train")
        if impl in ("full", "rows") and self.gate != "softmax":  # selected by a threshold
            z, route = self.sample_z(x2, noise)
            if impl == "full":
                y, usage = full_width_ffn(x2, z, self.score, self.w_in, self.b_in, self.w_out, self.b_out,
                                          self.n_kept, sigmoid=self.gate == "sigmoid")
            else:
                mask, chosen = self.threshold_masks(z)
                y = rows_ffn(x2, mask, chosen, self.w_in, self.b_in, self.w_out, self.b_out)
                usage = lambda: chosen.mean(0)  # noqa: E731 - read lazily, with the other statistics
        else:  # selected by `select`'s indices; the softmax gate always takes this way
            (index, gate, _, _), route, _ = self._select(x2, noise)
            mask, chosen = self.mean_mask(index, gate), self.union(index)
            y = self._ffn_by_mask(impl, x2, mask, chosen)
            usage = lambda: chosen.float().mean(0)  # noqa: E731
        self.aux = self._report(usage, route)
        return y.reshape(*lead, self.d_model)

    def _adaptive_forward(self, x2: torch.Tensor, noise: torch.Tensor | None, grad: bool) -> torch.Tensor:
        """Mode "adaptive": routing first, then the path its measured union pays for, as
        `plan` would with the union known ("full" computes every unit, as the masked
        reference does: the fused full path cannot average a different K per token)."""
        (index, gate, _, _), route, keep = self._select(x2, noise)
        mask, chosen = self.mean_mask(index, gate), self.union(index)
        union = chosen.float().mean().item() if x2.shape[0] else 0.0
        impl = self.impl
        if impl == "auto":
            if not grad and x2.shape[0] * union <= ROWS_LIMIT:
                impl = "rows"
            else:
                impl = "sparse" if self._sparse_pays_at(union) else "masked"
        if impl == "rows" and grad:
            raise invalid("impl", impl, "reads rows without gradients (inference only); use 'auto' to train")
        y = self._ffn_by_mask(impl, x2, mask, chosen)
        self.aux = self._report(lambda: chosen.float().mean(0), route, samples_used=keep.sum(0).float())
        return y

    def _ffn_by_mask(self, impl: str, x2: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """y (T, d) from the summed gates m̄ and the union `chosen` (T, n_blocks), by `impl`."""
        if impl == "sparse":
            return self.sparse_ffn(x2, mask, chosen)
        if impl == "rows":
            return rows_ffn(x2, mask, chosen, self.w_in, self.b_in, self.w_out, self.b_out)
        return self.masked_ffn(x2, mask)

    @torch.no_grad()
    def sample_disagreement(self, mu: torch.Tensor | Route, sigma: torch.Tensor | None = None,
                            score: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """mu, sigma (T, d_z) of one Gaussian, or a `Route` (mu alone) → scalar:
        1 − |m₁ ∩ m₂| / |m₁| for two independent samples of the same token, averaged over
        tokens. Whether K can matter at all: 0 when a token's samples keep the same blocks
        (averaging K of them changes nothing), 1 − N for two unrelated masks. Measured on at
        most `DISAGREEMENT_TOKENS` tokens spread over the batch, with draws from a generator
        of its own, so the run's random stream and its results do not change. score: the
        score map's (weight, bias), default this layer's."""
        route = mu if isinstance(mu, Route) else Route(mu.unsqueeze(1), sigma.unsqueeze(1), None)
        t = route.mu.shape[0]
        if t == 0:
            return route.mu.new_zeros(())
        device = route.mu.device
        rows = torch.linspace(0, t - 1, min(t, DISAGREEMENT_TOKENS), device=device).long()
        route = Route(route.mu[rows], route.sigma[rows], None if route.log_pi is None else route.log_pi[rows])
        generator = torch.Generator(device=device).manual_seed(0)
        noise = torch.randn((2, rows.numel(), self.d_z), generator=generator, device=device).to(route.mu.dtype)
        z = route.sample(noise, generator).reshape(2 * rows.numel(), self.d_z)
        weight, bias = (self.score.weight, self.score.bias) if score is None else score
        with torch.autocast(device.type, enabled=False):
            scores = torch.addmm(bias.to(z.dtype), z, weight.to(z.dtype).t())
        keep = top_n_mask(scores, self.n_kept).view(2, rows.numel(), self.n_blocks)
        return 1 - (keep[0] * keep[1]).sum(-1).mean() / self.n_kept

    def union(self, index: torch.Tensor) -> torch.Tensor:
        """index (K, T, n_kept) → (T, n_blocks) bool: blocks kept by any of a token's samples."""
        k, t, n = index.shape
        chosen = torch.zeros(t, self.n_blocks, dtype=torch.bool, device=index.device)
        return chosen.scatter_(1, index.transpose(0, 1).reshape(t, k * n), True)

    def _report(self, usage: torch.Tensor | Callable[[], torch.Tensor], route: Route,
                samples_used: torch.Tensor | None = None) -> FFNAux:
        """usage (n_blocks,), or a function giving it: the share of tokens whose union of masks
        holds each block; samples_used (T,): each token's K in mode "adaptive". The KL is
        computed now where it is a loss term, the statistics when first read."""
        loss = None
        if self.kl_weight > 0:
            kl = route.kl()
            loss = self.kl_weight * (kl if self.kl_free == 0 else (kl - self.kl_free).clamp_min(0)).mean()
        route = Route(*(None if part is None else part.detach() for part in route))
        mu, sigma = route.moments()
        # The disagreement needs the score map, whose weights FSDP holds whole only during
        # the forward: training keeps a copy (d_z × H/B numbers) for when it is read.
        score = (self.score.weight.detach().clone(), self.score.bias.detach().clone()) if self.training else None

        @torch.no_grad()
        def stats() -> dict[str, torch.Tensor]:
            used = (usage() if callable(usage) else usage).float()
            return {
                "sigma_mean": sigma.mean(),
                # σ against μ's own scale: noise a growing μ can outgrow shows here, not in σ
                "sigma_over_mu": sigma.mean() / mu.square().mean().sqrt().clamp_min(1e-12),
                "sample_disagreement": self.sample_disagreement(route, score=score),
                "kl": route.kl().mean(),
                "union_fraction": used.mean(),  # blocks a token uses, over its K samples
                "used_fraction": (used > 0).float().mean(),  # blocks some token used
                "block_usage": used,
            } | ({} if samples_used is None else {
                "samples_used": samples_used.mean(),  # mode "adaptive": the mean K a token averaged
            }) | ({} if route.log_pi is None else {
                # 0 when each token puts all its weight on one component: its samples share a mode
                "component_entropy": -(route.log_pi.exp() * route.log_pi).sum(-1).mean(),
            })

        return FFNAux(loss=loss, stats=stats)

    def union_fraction_bound(self, n_samples: int) -> float:
        """Upper bound on the expected fraction of blocks in the union of K masks.

        Each block is kept with probability p_b(x) per sample, and Σ_b E[p_b] = n_kept, so
        by Jensen E[1 - (1 - p)^K] <= 1 - (1 - n_kept / n_blocks)^K; equality for
        independent, uniform masks. K = 1 (and mode "mean") is exact.
        """
        return 1 - (1 - self.n_kept / self.n_blocks) ** n_samples

    def active_parameters(self, n_samples: int = 1) -> float:
        per_unit = 2 * self.d_model + 1  # a row of w_in, its bias, a row of w_out
        dense_part = sum(p.numel() for p in (self.router.weight, self.router.bias, self.b_out))
        dense_part += self.score.weight.numel() + self.score.bias.numel()
        return dense_part + self.union_fraction_bound(n_samples) * self.d_hidden * per_unit

    def flops_per_token(self, n_samples: int = 1, union: float | None = None,
                        executed: bool = False) -> float:
        """Router (d → 2 d_z), K score maps (d_z → H/B), and both projections of the
        blocks computed: the union fraction of H, or all of H where ``executed`` and
        training at K = n_samples takes a path that computes every unit (full or masked)."""
        router = 2 * self.d_model * 2 * self.d_z
        scores = n_samples * 2 * self.d_z * self.n_blocks
        fraction = self.union_fraction_bound(n_samples) if union is None else union
        if executed and not self.uses_sparse(n_samples):
            fraction = 1.0
        return router + scores + fraction * 2 * 2 * self.d_model * self.d_hidden


@contextlib.contextmanager
def sampling(
    module: nn.Module, n_samples: int | None = None, mode: str | None = None
) -> Iterator[nn.Module]:
    """Temporarily set K and/or mode on every ∞-MoE layer in `module`; weights untouched.

    >>> with sampling(model, n_samples=4):
    ...     logits = model(idx).logits
    """
    layers = [m for m in module.modules() if isinstance(m, InfiniteMoE)]
    saved = [(m.n_samples, m.mode) for m in layers]
    try:
        for m in layers:
            if n_samples is not None:
                m.n_samples = n_samples
            if mode is not None:
                m.mode = mode
        yield module
    finally:
        for m, (k, md) in zip(layers, saved):
            m.n_samples, m.mode = k, md
