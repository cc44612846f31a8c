"""Adaptive K (mode "adaptive"): each token draws samples while they still add blocks to the
union of its masks, up to n_samples.

An inference option that decides per token how much to compute, so its shapes depend on
the routing by design: it runs eagerly (it reads on the host how many tokens still draw),
and is not part of the static plan `torch.compile` and CUDA training follow.
"""

from __future__ import annotations

import torch

from infmoe.layers.routing import Route, top_blocks


def adaptive_select(layer, x: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, Route, torch.Tensor]:
    """In rounds over samples (not over tokens): samples 0 and 1 for every token, then
    sample k only for the tokens whose sample k − 1 still grew their union, so the routing
    costs the samples actually drawn. The rule is `adaptive_keep`'s, the reference this is tested
    against. noise (K_max, T, d_z) fixes the draws.

    Returns index and gate (K, T, n_kept) for the K rounds run (a token's samples after it
    stopped repeat its first sample's blocks with gate 0, so the union and the mean mask
    are those of the samples it kept; gates are divided by each token's own K), p(z | x),
    and the (K, T) bool samples kept."""
    t, k_max = x.shape[0], noise.shape[0] if noise is not None else layer.n_samples
    relaxed = torch.is_grad_enabled() and layer.training
    n_blocks, n_kept = layer.n_blocks, layer.n_kept
    route = layer.router(x)

    def draw(k: int, rows: torch.Tensor | None, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = route if rows is None else route.rows(rows)
        eps = (noise[k:k + count] if rows is None else noise[k:k + 1, rows]) if noise is not None else None
        if eps is None:
            eps = torch.randn((count, part.mu.shape[0], layer.d_z), device=x.device, dtype=part.mu.dtype)
        return top_blocks(part.sample(eps.to(part.mu.dtype), relaxed=relaxed), layer.score, n_kept, layer.gate)

    first = min(k_max, 2)
    index, gate = draw(0, None, first)  # (first, T, n_kept)
    indices, gates = list(index.unbind(0)), list(gate.unbind(0))
    kept = [torch.ones(t, dtype=torch.bool, device=x.device)] * first
    union = torch.zeros(t, n_blocks, dtype=torch.bool, device=x.device).scatter_(1, index[0], True)
    active = torch.arange(t, device=x.device)
    for k in range(1, k_max):
        if k >= 2:  # the tokens still drawing get sample k
            if active.numel() == 0:
                break
            sub_index, sub_gate = (v[0] for v in draw(k, active, 1))
            indices.append(indices[0].index_copy(0, active, sub_index))
            gates.append(gates[0].new_zeros(t, n_kept).index_copy(0, active, sub_gate))
            kept.append(torch.zeros_like(kept[0]).index_fill_(0, active, True))
        new = torch.zeros(active.numel(), n_blocks, dtype=torch.bool, device=x.device)
        new.scatter_(1, indices[k][active], True)
        grew = (new & ~union[active]).any(-1)
        union[active] |= new
        active = active[grew]
    kept = torch.stack(kept)  # (K, T)
    gate = torch.stack(gates) * (kept / kept.sum(0)).unsqueeze(-1)
    return torch.stack(indices), gate, route, kept


@torch.no_grad()
def adaptive_keep(index: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """index (K, T, n_kept) → (K, T) bool: the samples each token averages. A token keeps
    drawing while each new sample still adds blocks to the union of its masks; the first
    sample that adds none is averaged in too (its blocks are all computed already, so it
    costs nothing on the sparse path) and ends the token's draw. A token whose first two
    samples agree thus averages 2 samples over 1 sample's blocks; one whose samples keep
    differing runs to K. Decided for every token at once from all K samples: the reference
    for the rounds `adaptive_select` runs."""
    k, t, _ = index.shape
    masks = torch.zeros(k, t, n_blocks, dtype=torch.bool, device=index.device).scatter_(2, index, True)
    union = masks.cumsum(0, dtype=torch.int32) > 0  # (K, T, n_blocks): after samples 0..k
    grew = (masks[1:] & ~union[:-1]).any(-1)  # (K - 1, T): sample k + 1 added a block
    # sample 0 always; sample k >= 1 while every sample before it (from 1 on) grew the union
    still = torch.cat([grew.new_ones(1, t), grew[:-1]]).int().cumprod(0).bool()
    return torch.cat([grew.new_ones(1, t), still])[:k]
