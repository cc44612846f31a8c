"""∞-MoE: a mixture of experts whose expert index z is continuous (arXiv 2601.17680).

    p(z | x) = N(μ(x), diag σ(x)²)                       the router (`routing.GaussianRouter`)
    z_k = μ + σ ⊙ ε_k,  ε_k ~ N(0, I),  k = 1..K         K samples, reparameterised
    s_k = A z_k + c                                      one score per block of B hidden units
    m_k = g(s_k) on the top ceil(N · H/B) blocks, else 0 a gated mask per sample
    m̄ = (1/K) Σ_k m_k                                    averaged, applied once:
    y = W_out (m̄ ⊙ GELU(W_in x + b_in)) + b_out                      the paper's MLP
    y = W_out (m̄ ⊙ act(W_gate x + b_gate) ⊙ (W_up x + b_up)) + b_out    glu=True: gated

This module states the method: router → z → scores → top-N → gates → mean over K → FFN.
How y is computed (every unit, or only the chosen blocks, on the host's plan or the static
one) is `layers.paths`; which path runs is the one rule `layers.dispatch.choose_path`;
adaptive K is `layers.adaptive`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from infmoe.deprecation import renamed, renamed_keywords
from infmoe.errors import InfmoeError, choose, divisor, flag, invalid, positive_int, real
from infmoe.layers.activation import in_rows
from infmoe.layers.adaptive import adaptive_keep, adaptive_select
from infmoe.layers.base import FFNAux, FFNLayer, count_kept, init_normal_
from infmoe.layers.dispatch import choose_path
from infmoe.layers.glu import ACTIVATIONS
from infmoe.layers.paths import mean_mask, run_full, run_selected, union
from infmoe.layers.routing import GaussianRouter, Route, kl_penalty, top_blocks

MODES = ("sample", "mean", "adaptive")
GATES = ("sigmoid", "softmax", "constant")
IMPLS = ("auto", "full", "sparse", "rows", "masked")
# Tokens (spread over the batch) on which `sample_disagreement` draws its two samples: enough
# for a mean over tokens (and over the steps between two log lines), few enough to cost
# little next to the layer at any B.
DISAGREEMENT_TOKENS = 128
# The largest K. A forward holds K draws and masks per token, so memory grows with K; the
# paper's K are at most 16, and 1024 samples of even 1% of the blocks cover all but 0.003%.
MAX_SAMPLES = 1024


class Selection(NamedTuple):
    """The blocks each of K routing samples keeps: index (K, T, n_kept), distinct within a
    sample, and gate (K, T, n_kept), their weights already divided by K; at least fp32."""

    index: torch.Tensor
    gate: torch.Tensor


class InfiniteMoE(FFNLayer):
    """∞-MoE feed-forward layer: x (..., d_model) → (..., d_model).

    Args:
        d_model: model width d.
        d_hidden: width H of the one large FFN (the paper uses 2 × the dense width): the
            hidden units the mask selects from (gated units where glu).
        d_z: dimension of the continuous expert index z.
        active_fraction: N, the fraction of blocks each sample keeps, in (0, 1].
        units_per_block: B, hidden units per block; H must be divisible by B. 1 = per
            unit. (Formerly block_size, which still works: `RENAMED_OPTIONS`.)
        n_samples: K, samples of z averaged per token (mode "sample"); changeable later.
        mode: "sample" draws z ~ p(z|x); "mean" uses z = μ(x) (deterministic, one mask);
            "adaptive" lets each token choose its own K up to n_samples (`layers.adaptive`).
        gate: weight g of a kept block from its score s: "sigmoid" σ(s); "softmax" over
            the kept scores, scaled so the gates sum to the number kept; "constant" 1 (no
            gradient reaches the router through the output).
        sigma_min: floor added to σ = softplus(·) so sampling never collapses to a point.
        kl_weight: weight of KL(p(z|x) || N(0, I)) (mean over tokens) in ``aux.loss``.
        kl_free: free bits: each token's KL is penalised only beyond this many nats (a
            noise target instead of a penalty). 0: the plain KL term.
        n_components: C, Gaussians in the router's mixture (the paper's future work), so a
            token's K samples can land in different modes. 1: the paper's single Gaussian.
        mu_norm: scale-free routing: μ divided by its RMS over d_z, so a growing μ cannot
            outgrow σ. Off by default (the paper's router).
        train_samples: each training forward draws its K uniformly from these (e.g.
            (1, 2, 4)), so the model learns to use one sample and to gain from several.
            Empty (the default): training uses n_samples too. See `draw_train_samples`.
        impl: how y is computed; every choice gives the same y. "auto" lets
            `dispatch.choose_path` pick per call; "full", "sparse", "rows" (inference
            only) and "masked" (the plain-autograd reference) force one (`layers.paths`).
        glu: the large FFN is gated (`layers.glu`): w_in (2H, d) and b_in (2H,) hold each
            block's B gate rows, then its B up rows (`layers.activation`), so a unit costs
            3 d + 2 parameters instead of 2 d + 1. False (the default): the paper's GELU
            MLP, w_in (H, d). The score gate g(s) still scales each kept block on top of
            the GLU's own gate: it is what carries the router's gradient.
        activation: the GLU gate's activation, "silu" (SwiGLU, the default with glu) or
            "gelu" (GEGLU, GPT-2's tanh form). The MLP is GELU only (None or "gelu"): its
            dense baseline (`DenseMLP`) is GELU, so a SiLU MLP would be compared with nothing.
    """

    # Options under their old names ({old: new}), still accepted with a one-line warning:
    # "block_size" read as the context length to anyone from nanoGPT.
    RENAMED_OPTIONS = {"block_size": "units_per_block"}

    @renamed_keywords(RENAMED_OPTIONS, "the ffn='infmoe' option")
    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        *,
        d_z: int,
        active_fraction: float = 0.5,
        units_per_block: int = 1,
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
        glu: bool = False,
        activation: str | None = None,
    ) -> None:
        super().__init__(positive_int("d_model", d_model), positive_int("d_hidden", d_hidden))
        self.d_z = positive_int("d_z", d_z)
        self.units_per_block = divisor("units_per_block", units_per_block, d_hidden, "d_hidden")
        self.n_blocks = d_hidden // units_per_block
        self.active_fraction = real("active_fraction", active_fraction, low=0, high=1, open_low=True)
        self.n_kept = count_kept(active_fraction, self.n_blocks)
        self.gate = choose("gate", gate, GATES)
        self.kl_weight = real("kl_weight", kl_weight, low=0)
        self.kl_free = real("kl_free", kl_free, low=0)
        if not isinstance(train_samples, (tuple, list)):
            raise invalid("train_samples", train_samples, "must be a list of sample counts, e.g. [1, 2, 4]")
        self.train_samples = tuple(sample_count("train_samples", k) for k in train_samples)
        self.impl = choose("impl", impl, IMPLS)
        self.glu = flag("glu", glu)
        if not glu and activation not in (None, "gelu"):
            raise invalid("activation", activation, "the MLP is GELU only ('gelu'); 'silu' needs glu=true")
        default = "silu" if glu else "gelu"
        self.activation = choose("activation", default if activation is None else activation, ACTIVATIONS)
        self.n_samples = n_samples
        self.mode = mode
        self.next_train_samples: int | None = None  # K of the next training forward (`draw_train_samples`)

        self.router = GaussianRouter(d_model, self.d_z, n_components=positive_int("n_components", n_components),
                                     sigma_min=real("sigma_min", sigma_min, low=0), mu_norm=flag("mu_norm", mu_norm))
        self.score = nn.Linear(d_z, self.n_blocks)  # z → one score per block
        # Both projections stored (rows, d) so a block is a contiguous slice of rows: w_in
        # (H, d), or (2H, d) for the GLU (a block's gate rows, then its up rows).
        self.w_in = nn.Parameter(torch.empty(self.in_rows, d_model))
        self.b_in = nn.Parameter(torch.empty(self.in_rows))
        self.w_out = nn.Parameter(torch.empty(d_hidden, d_model))
        self.b_out = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    @property
    def glu_activation(self) -> str | None:
        """The GLU gate's activation, None for the MLP: what the paths take (`layers.activation`)."""
        return self.activation if self.glu else None

    @property
    def in_rows(self) -> int:
        """Rows of w_in: H, or 2H for the GLU."""
        return in_rows(self.d_hidden, self.glu_activation)

    @property
    def matrices(self) -> int:
        """Weight rows a hidden unit owns: 2 (an input and an output row), 3 for the GLU."""
        return 3 if self.glu else 2

    @property
    def block_size(self) -> int:
        """The old name of `units_per_block` (warns once)."""
        renamed("InfiniteMoE.block_size", "InfiniteMoE.units_per_block")
        return self.units_per_block

    # The router's options, readable on the layer whose options they are.
    @property
    def sigma_min(self) -> float:
        return self.router.sigma_min

    @property
    def n_components(self) -> int:
        return self.router.n_components

    @property
    def mu_norm(self) -> bool:
        return self.router.mu_norm

    # K and mode are validated on every assignment, so a built model can be retuned safely.
    @property
    def n_samples(self) -> int:
        return self._n_samples

    @n_samples.setter
    def n_samples(self, value: int) -> None:
        self._n_samples = sample_count("n_samples", value)

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

    # --- the method, step by step -------------------------------------------------------

    def route(self, x: torch.Tensor) -> Route:
        """x (T, d) → the router's p(z | x), in at least fp32."""
        return self.router(x)

    def router_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, d) → μ, σ of p(z | x), each (T, d_z): the Gaussian's, or the mixture's moments."""
        return self.router(x).moments()

    def samples_now(self, noise: torch.Tensor | None = None) -> int:
        """K of this call: noise's, 1 in mode "mean", the drawn training K, or n_samples."""
        if self.mode == "mean":
            return 1
        if noise is not None:
            return noise.shape[0]
        if self.training and self.train_samples:
            if self.next_train_samples is None:
                if torch.compiler.is_compiling():  # a host draw would break the graph
                    raise InfmoeError("train_samples under torch.compile: call infmoe.draw_train_samples(model) "
                                      "before each training forward (infmoe's training loop does)")
                return self.train_samples[int(torch.randint(len(self.train_samples), ()))]
            return self.next_train_samples
        return self.n_samples

    def sample_z(self, route: Route, k: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """p(z | x) → z (K, T, d_z): K draws μ + σ ε (ε standard normal in fp32, or `noise`;
        a mixture draws each sample's component first), or z = μ in mode "mean"."""
        if self.mode == "mean":
            if noise is not None:
                raise invalid("noise", "tensor", 'mode="mean" draws no noise; pass None')
            return route.mode_mean().unsqueeze(0)
        mu = route.mu
        if noise is None:
            noise = torch.randn((k, mu.shape[0], self.d_z), dtype=mu.dtype, device=mu.device)
        return route.sample(noise.to(mu.dtype), relaxed=torch.is_grad_enabled() and self.training)

    def select(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> Selection:
        """The blocks each of K samples z ~ p(z | x) keeps, and their gates divided by K;
        x (T, d), noise (K, T, d_z) replaces the draw ε. The layer's own mode (adaptive K
        included) decides K."""
        if self.mode == "adaptive":
            index, gate, _, _ = adaptive_select(self, x, noise)
            return Selection(index, gate)
        k = self.samples_now(noise)
        index, gate = top_blocks(self.sample_z(self.router(x), k, noise), self.score, self.n_kept, self.gate)
        return Selection(index, gate / k)

    def union(self, index: torch.Tensor) -> torch.Tensor:
        """index (K, T, n_kept) → (T, n_blocks) bool: blocks kept by any of a token's samples."""
        return union(index, self.n_blocks)

    def mean_mask(self, index: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """index, gate (K, T, n_kept) → m̄ (T, n_blocks), zero outside the union."""
        return mean_mask(index, gate, self.n_blocks)

    def adaptive_keep(self, index: torch.Tensor) -> torch.Tensor:
        """index (K, T, n_kept) → (K, T) bool: the samples each token averages in mode
        "adaptive" (`layers.adaptive`)."""
        return adaptive_keep(index, self.n_blocks)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., d_model) → (..., d_model). noise (K, ..., d_z) fixes the draws ε."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)
        if noise is not None:
            noise = noise.reshape(noise.shape[0], -1, self.d_z)
        if self.mode == "adaptive":
            index, gate, route, kept = adaptive_select(self, x2, noise)
            path = self.path(x2, kept.shape[0], union=union(index, self.n_blocks).float().mean().item(),
                             fused=False)
            y, used = run_selected(path, self, x2, index, gate)
            self.aux = self._report(route, used, path, samples_used=kept.sum(0).float())
            return y.reshape(*lead, self.d_model)
        route = self.router(x2)
        k = self.samples_now(noise)
        z = self.sample_z(route, k, noise)
        path = self.path(x2, k)
        if path == "full":
            y, used = run_full(self, x2, z)
        else:
            index, gate = top_blocks(z, self.score, self.n_kept, self.gate)
            y, used = run_selected(path, self, x2, index, gate / k)
        self.aux = self._report(route, used, path)
        return y.reshape(*lead, self.d_model)

    # --- which path ---------------------------------------------------------------------

    def path(self, x: torch.Tensor, n_samples: int, union: float | None = None, fused: bool = True) -> str:
        """The path a call on x (T, d) at K = n_samples runs (`dispatch.choose_path`)."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        grad = torch.is_grad_enabled() and (x.requires_grad or self.w_in.requires_grad)
        return choose_path(self, device=x.device, dtype=dtype, grad=grad, tokens=x.shape[0], n_samples=n_samples,
                           union=union, fused=fused)

    def training_path(self, n_samples: int | None = None, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> str:
        """The path training at K = n_samples (default: the layer's K, 1 in mode "mean")
        takes on `device` in `dtype`, at a large number of tokens."""
        if n_samples is None:
            n_samples = 1 if self.mode == "mean" else self.n_samples
        return choose_path(self, device=torch.device(device), dtype=dtype, grad=True, tokens=2**31,
                           n_samples=n_samples)

    def uses_sparse(self, n_samples: int | None = None) -> bool:
        """Whether training at K = n_samples on the CPU computes only the chosen blocks."""
        return self.training_path(n_samples) in ("sparse", "grouped")

    # --- what a call reports ------------------------------------------------------------

    def _report(self, route: Route, used: torch.Tensor, path: str, samples_used: torch.Tensor | None = None
                ) -> FFNAux:
        """The KL as a loss term now; the statistics as tensors, turned into numbers when
        first read (outside any compiled graph). used: (n_blocks,) shares or the (T,
        n_blocks) union; samples_used (T,): each token's K in mode "adaptive"."""
        loss = kl_penalty(route, self.kl_weight, self.kl_free)
        # The disagreement needs the score map, whose weights FSDP holds whole only during
        # the forward: training keeps a copy (d_z × H/B numbers) for when it is read.
        score = (self.score.weight.detach().clone(), self.score.bias.detach().clone()) if self.training else None
        stats = functools.partial(self._statistics, route.detach(), used.detach(), score, samples_used)
        return FFNAux(loss=loss, stats=stats, path=path)

    @torch.no_grad()
    def _statistics(self, route: Route, used: torch.Tensor, score, samples_used) -> dict[str, torch.Tensor]:
        used = (used.float().mean(0) if used.dim() == 2 else used).float()
        mu, sigma = route.moments()
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

    @torch.no_grad()
    def sample_disagreement(self, route: Route, *,
                            score: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """p(z | x) of T tokens (`route`, e.g. ``layer.route(x)``; from μ, σ each (T, d_z):
        ``Route.gaussian(mu, sigma)``) → scalar: 1 − |m₁ ∩ m₂| / |m₁| for two independent
        samples of the same token, averaged over tokens. Whether K can matter at all: 0 when
        a token's samples keep the same blocks, 1 − N for two unrelated masks. Measured on
        at most `DISAGREEMENT_TOKENS` tokens spread over the batch, with draws from a
        generator of its own, so the run's random stream does not change. score: the score
        map's (weight, bias), default this layer's."""
        if not isinstance(route, Route):
            raise TypeError("sample_disagreement takes a Route: layer.route(x), or Route.gaussian(mu, sigma)")
        t = route.mu.shape[0]
        if t == 0:
            return route.mu.new_zeros(())
        device = route.mu.device
        route = route.rows(torch.linspace(0, t - 1, min(t, DISAGREEMENT_TOKENS), device=device).long())
        n = route.mu.shape[0]
        generator = torch.Generator(device=device).manual_seed(0)
        noise = torch.randn((2, n, self.d_z), generator=generator, device=device).to(route.mu.dtype)
        z = route.sample(noise, generator)
        weight, bias = (self.score.weight, self.score.bias) if score is None else score
        with torch.autocast(device.type, enabled=False):
            index = torch.addmm(bias.to(z.dtype), z.reshape(2 * n, -1), weight.to(z.dtype).t()).topk(self.n_kept).indices
        keep = torch.zeros(2 * n, self.n_blocks, device=device).scatter_(1, index, 1.0).view(2, n, self.n_blocks)
        return 1 - (keep[0] * keep[1]).sum(-1).mean() / self.n_kept

    # --- accounting ---------------------------------------------------------------------

    def union_fraction_bound(self, n_samples: int) -> float:
        """Upper bound on the expected fraction of blocks in the union of K masks.

        Each block is kept with probability p_b(x) per sample, and Σ_b E[p_b] = n_kept, so
        by Jensen E[1 - (1 - p)^K] <= 1 - (1 - n_kept / n_blocks)^K; equality for
        independent, uniform masks. K = 1 (and mode "mean") is exact.
        """
        return 1 - (1 - self.n_kept / self.n_blocks) ** n_samples

    def active_parameters(self, n_samples: int = 1) -> float:
        # a row of w_in and its bias (the GLU: a gate and an up row, two biases), a row of w_out
        per_unit = self.matrices * self.d_model + self.matrices - 1
        dense_part = sum(p.numel() for p in (self.router.weight, self.router.bias, self.b_out))
        dense_part += self.score.weight.numel() + self.score.bias.numel()
        return dense_part + self.union_fraction_bound(n_samples) * self.d_hidden * per_unit

    def flops_per_token(self, n_samples: int = 1, union: float | None = None, executed: bool = False,
                        device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
        """The router (d → its outputs: 2 d_z per component, plus C mixture logits), K score
        maps (d_z → H/B), and the projections (two, three for the GLU) of the blocks
        computed: the union fraction of H; where ``executed``, what the path training takes
        on `device` computes (all of H on the full and masked paths, K · N of H on the
        static plan's grouped path)."""
        router = 2 * self.d_model * self.router.out_features
        scores = n_samples * 2 * self.d_z * self.n_blocks
        fraction = self.union_fraction_bound(n_samples) if union is None else union
        if executed:
            path = self.training_path(n_samples, device, dtype)
            fraction = {"grouped": min(1.0, n_samples * self.n_kept / self.n_blocks), "sparse": fraction}.get(path, 1.0)
        return router + scores + fraction * 2 * self.matrices * self.d_model * self.d_hidden


def sample_count(field: str, value: object) -> int:
    """`value` if it is a K in [1, MAX_SAMPLES], else a one-line `ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SAMPLES:
        raise invalid(field, value, f"K must be >= 1 and at most {MAX_SAMPLES}")
    return value


def draw_train_samples(module: nn.Module) -> None:
    """Draw, on the host, the K of the next training forward of every ∞-MoE layer in
    `module` with ``train_samples`` (uniformly from them, from torch's CPU generator).
    A compiled forward cannot draw it itself without breaking its graph; a training step
    calls this before each forward, eager or compiled, so both draw the same K."""
    for m in module.modules():
        if isinstance(m, InfiniteMoE) and m.train_samples:
            m.next_train_samples = m.train_samples[int(torch.randint(len(m.train_samples), ()))]


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
