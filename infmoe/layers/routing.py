"""∞-MoE's router: x → p(z | x), samples z, and the blocks each sample keeps.

The paper's router is one Gaussian N(μ(x), diag σ(x)²) from one linear layer. The research
options that change it live here, with what they change:

- ``n_components`` > 1: a mixture Σ_c π_c N(μ_c, σ_c²), each sample drawing its component;
- ``mu_norm``: μ rescaled to the prior's scale, so σ is noise relative to μ;
- ``sigma_min``: the floor under σ;
- the KL to N(0, I) and its free-bits allowance (`kl_penalty`).

Everything here runs in at least fp32 with autocast off: in bf16, near-equal scores at the
top-N boundary tie or swap, and the kept blocks would change with the precision setting.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from infmoe.errors import invalid
from infmoe.layers.base import routing_linear

# The mixture's components: each adds 2 d_z + 1 router outputs per token. The paper's future
# work has a few; a bound keeps a typo from asking for terabytes of router weights.
MAX_COMPONENTS = 256


class Route(NamedTuple):
    """The router's p(z | x) = Σ_c π_c N(μ_c, diag σ_c²) for T tokens.

    mu, sigma (T, C, d_z): each component's Gaussian, in at least fp32.
    log_pi (T, C): the log mixture weights; None for the paper's single Gaussian (C = 1).
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    log_pi: torch.Tensor | None

    @classmethod
    def gaussian(cls, mu: torch.Tensor, sigma: torch.Tensor) -> Route:
        """One Gaussian N(μ, diag σ²) per token from mu, sigma (T, d_z): the paper's router,
        or the moment-matched Gaussian of a mixture (`moments`)."""
        return cls(mu.unsqueeze(1), sigma.unsqueeze(1), None)

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
        # one-hot by comparison: F.one_hot checks its indices' range on the host
        weight = (perturbed.argmax(-1, keepdim=True) == torch.arange(c, device=noise.device)).to(noise.dtype)
        if relaxed:
            soft = perturbed.softmax(-1)
            weight = weight + soft - soft.detach()
        components = self.mu + self.sigma * noise.unsqueeze(2)  # (K, T, C, d_z)
        return (weight.unsqueeze(-1) * components).sum(2)

    def rows(self, index: torch.Tensor) -> Route:
        """The distributions of the tokens `index` (1-D)."""
        return Route(*(None if part is None else part[index] for part in self))

    def detach(self) -> Route:
        return Route(*(None if part is None else part.detach() for part in self))

    def mode_mean(self) -> torch.Tensor:
        """(T, d_z): z for mode "mean", μ of the most probable component."""
        if self.log_pi is None:
            return self.mu[:, 0]
        return self.mu.gather(1, self.log_pi.argmax(-1)[:, None, None].expand(-1, 1, self.mu.shape[-1]))[:, 0]


class GaussianRouter(nn.Linear):
    """x (T, d) → `Route`: one linear layer to (μ, pre-softplus σ) per component, and C
    mixture logits when C > 1; σ = softplus(·) + sigma_min. A `nn.Linear` itself, so its
    weights are ``router.weight`` and ``router.bias`` as in every checkpoint written."""

    def __init__(self, d_model: int, d_z: int, *, n_components: int = 1, sigma_min: float = 0.01,
                 mu_norm: bool = False) -> None:
        c = n_components
        if c > MAX_COMPONENTS:
            raise invalid("n_components", c, f"must be at most {MAX_COMPONENTS}")
        super().__init__(d_model, c * 2 * d_z + (c if c > 1 else 0))
        self.d_z, self.n_components, self.sigma_min, self.mu_norm = d_z, n_components, sigma_min, mu_norm

    def forward(self, x: torch.Tensor) -> Route:
        with torch.autocast(x.device.type, enabled=False):
            out = routing_linear(x, self)
            c, t = self.n_components, x.shape[0]
            log_pi = out[:, -c:].log_softmax(-1) if c > 1 else None
            mu, pre_sigma = out[:, : c * 2 * self.d_z].view(t, c, 2 * self.d_z).chunk(2, dim=-1)
            if self.mu_norm:
                mu = mu * torch.rsqrt(mu.square().mean(-1, keepdim=True) + 1e-6)
            return Route(mu, F.softplus(pre_sigma) + self.sigma_min, log_pi)


def kl_penalty(route: Route, weight: float, free: float) -> torch.Tensor | None:
    """weight · mean over tokens of KL(p(z|x) || N(0, I)), each token's KL counted only
    beyond `free` nats (free bits, Kingma et al. 2016, arXiv 1606.04934); None if weight is 0."""
    if weight == 0:
        return None
    kl = route.kl()
    return weight * (kl if free == 0 else (kl - free).clamp_min(0)).mean()


def top_blocks(z: torch.Tensor, score: nn.Linear, n_kept: int, gate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """z (..., d_z) → the n_kept highest-scoring blocks of s = A z + c and their gates,
    each (..., n_kept): "sigmoid" σ(s), "softmax" over the kept scores times n_kept (so
    they sum to the number kept), "constant" 1. Not yet divided by K."""
    with torch.autocast(z.device.type, enabled=False):
        top_score, index = routing_linear(z, score).topk(n_kept, dim=-1, sorted=False)
        if gate == "sigmoid":
            return index, torch.sigmoid(top_score)
        if gate == "softmax":
            return index, top_score.softmax(dim=-1) * n_kept
        return index, torch.ones_like(top_score)
