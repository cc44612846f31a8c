"""∞-MoE's execution paths: y = W_out (m̄ ⊙ h(W_in x + b_in)) + b_out, computed one of
six ways that give the same y (tests hold each to "masked"). `dispatch.choose_path` picks.
h is the layer's hidden activation (`layers.activation`): GELU, or for a gated ∞-MoE (glu)
act(gate) ⊙ up of each block's 2B input rows, whose B units m̄ then scales.

| path    | plan   | computes                                   | for                          |
|---------|--------|--------------------------------------------|------------------------------|
| masked  | any    | every unit, then m̄ (plain autograd)        | the reference; softmax gate  |
| full    | any    | every unit, routing fused (`full_width`)   | small blocks, large unions   |
| sparse  | host   | the union's (token, block) pairs (`grouped`)| large blocks, eager CPU      |
| grouped | static | all K · n_kept pairs of each token         | large blocks, CUDA / compile |
| rows    | host   | the union's rows, token by token (`rows`)  | decoding, eager CPU          |
| gather  | static | all K · n_kept blocks' rows of each token  | decoding, CUDA / compile     |

Each takes the layer, x (T, d) and either z (K, T, d_z) (full) or the selection: index
(K, T, n_kept) and gates (K, T, n_kept) already weighted by 1/K (or by a token's own K in
adaptive mode). Each returns y (T, d) and what the statistics read for block usage: (n_blocks,)
shares, or the (T, n_blocks) union itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infmoe.layers.activation import block_rows, hidden, in_rows
from infmoe.layers.full_width import full_width_ffn
from infmoe.layers.grouped import grouped_ffn, grouped_ffn_static
from infmoe.layers.rows import rows_ffn


def run_full(layer, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unit, with the score map, top-N and gate fused into one Function."""
    return full_width_ffn(x, z, layer.score, layer.w_in, layer.b_in, layer.w_out, layer.b_out, layer.n_kept,
                          sigmoid=layer.gate == "sigmoid", glu=layer.glu_activation)


def union(index: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """index (K, T, n_kept) → (T, n_blocks) bool: blocks kept by any of a token's samples."""
    k, t, n = index.shape
    chosen = torch.zeros(t, n_blocks, dtype=torch.bool, device=index.device)
    return chosen.scatter_(1, index.transpose(0, 1).reshape(t, k * n), True)


def mean_mask(index: torch.Tensor, gate: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """index, gate (K, T, n_kept) → m̄ (T, n_blocks): the K gated masks summed (the gates
    carry 1/K already), zero outside the union."""
    k, t, n = index.shape
    flat_gate = gate.transpose(0, 1).reshape(t, k * n)
    return flat_gate.new_zeros(t, n_blocks).scatter_add(1, index.transpose(0, 1).reshape(t, k * n), flat_gate)


def run_selected(path: str, layer, x: torch.Tensor, index: torch.Tensor, gate: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """y (T, d) by `path` from a selection, and the (T, n_blocks) union of its masks."""
    chosen = union(index, layer.n_blocks)
    if path == "grouped":
        return grouped(layer, x, index, gate), chosen
    if path == "gather":
        return gather(layer, x, index, gate), chosen
    mask = mean_mask(index, gate, layer.n_blocks)
    if path == "sparse":
        return sparse(layer, x, mask, chosen), chosen
    if path == "rows":
        y = rows_ffn(x, mask, chosen, layer.w_in, layer.b_in, layer.w_out, layer.b_out,
                     glu=layer.glu_activation)
        return y, chosen
    return masked(layer, x, mask), chosen


def masked(layer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference: the whole large FFN, then the mask m̄ (T, n_blocks)."""
    h = hidden(F.linear(x, layer.w_in, layer.b_in), layer.units_per_block, layer.glu_activation)
    # The fp32 mask would promote a bf16 h (under autocast) to a second, fp32 (T, H).
    h = (h.view(-1, layer.n_blocks, layer.units_per_block) * mask.to(h.dtype).unsqueeze(-1)).flatten(1)
    return h @ layer.w_out + layer.b_out


def _block_weights(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w_in as (n_blocks, d, R) (a transposed view), b_in (n_blocks, R), w_out (n_blocks, B,
    d), for the R = B input rows of a block (2B for the GLU)."""
    g, b, d = layer.n_blocks, layer.units_per_block, layer.d_model
    r = in_rows(b, layer.glu_activation)
    return layer.w_in.view(g, r, d).transpose(1, 2), layer.b_in.view(g, r), layer.w_out.view(g, b, d)


def sparse(layer, x: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Host plan: only the union's (token, block) pairs. A block several samples of a token
    chose is one pair whose gate is the sum of theirs, so samples that choose nothing new
    cost nothing. Pairs are kept by `chosen`, not by m̄ != 0, so a gate that underflows to
    zero still gets its gradient. ``nonzero`` of the block-major view yields the pairs
    sorted by block, then token, with no sort."""
    block, token = chosen.T.nonzero(as_tuple=True)
    w_in, b_in, w_out = _block_weights(layer)
    y = grouped_ffn(x, token, chosen.sum(0), mask[token, block], w_in, b_in, w_out,
                    glu=layer.glu_activation)
    return y + layer.b_out


def grouped(layer, x: torch.Tensor, index: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Static plan: every (sample, token, kept block), K · T · n_kept pairs whatever the
    routing chose, grouped by block on the device. A block two samples chose is two pairs."""
    k, t, n = index.shape
    token = torch.arange(t, device=x.device).view(1, t, 1).expand(k, t, n).reshape(-1)
    w_in, b_in, w_out = _block_weights(layer)
    return grouped_ffn_static(x, token, index.reshape(-1), gate.reshape(-1), w_in, b_in, w_out,
                              glu=layer.glu_activation) + layer.b_out


@torch.no_grad()
def gather(layer, x: torch.Tensor, index: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Static decoding: each token reads the rows of its K · n_kept blocks, and only those,
    as batched dot products with fixed shapes. Runs in the weights' dtype (casting them
    under autocast would read them twice)."""
    with torch.autocast(x.device.type, enabled=False):
        k, t, n = index.shape
        b = layer.units_per_block
        weight = gate.transpose(0, 1).unsqueeze(-1).expand(t, k, n, b).reshape(t, k * n * b)
        x = x.to(layer.w_in.dtype)
        glu = layer.glu_activation
        unit = block_rows(index, b).transpose(0, 1).reshape(t, k * n * b)  # w_out's rows, token by token
        rows = unit if glu is None else block_rows(index, in_rows(b, glu)).transpose(0, 1).reshape(t, -1)
        pre = torch.einsum("tud,td->tu", layer.w_in[rows], x) + layer.b_in[rows]
        h = hidden(pre, b, glu) * weight.to(pre.dtype)
        return torch.einsum("tu,tud->td", h, layer.w_out[unit]) + layer.b_out
