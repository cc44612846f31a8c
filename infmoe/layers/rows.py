"""The decoding path of ∞-MoE: a token or two, no gradient, as few bytes read as PyTorch's
CPU kernels allow.

Decoding one token is bound by reading weights, not by arithmetic: a dense MLP of width W
reads its 2 · W · d weights to do 4 · W · d FLOPs. A token whose K masks keep the union U
of the hidden units needs only the rows of U.

- Output projection: y = Σ_u g_u h_u w_out[u] + b_out (h_u = gelu(a_u), or a GLU's
  act(a_gate) a_up, `layers.activation`) is exactly `F.embedding_bag` with per-sample
  weights (mode "sum"), which reads the chosen rows and copies none. One bag runs on one
  thread, so a token's rows are split into one bag per thread and summed.
- Input projection: a_u = w_in[u] · x + b_in[u] (the GLU's 2B rows of each block). No
  PyTorch op gathers rows into dot products without writing them out first, and a gather
  of the chosen rows was no faster than reading all of them through `w_in @ [x, 0]ᵀ`:
  a gemm with two right-hand columns, which MKL runs on all threads (its matrix-vector
  product, what a dense MLP's `F.linear` does for one token, runs on one). The whole
  product is also one call instead of a dozen, which matters on a shared machine. So all
  rows are read, then the chosen ones picked.

What each kernel reads and how fast, from memory as in a deep model: docs/speed.md, from
`python benchmarks/decode_kernels.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infmoe.layers.activation import block_rows, hidden, in_rows


@torch.no_grad()
def rows_ffn(x: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor,
             w_out: torch.Tensor, b_out: torch.Tensor, glu: str | None = None) -> torch.Tensor:
    """y (T, d) for x (T, d): mask (T, n_blocks) the summed gates m̄, chosen (T, n_blocks)
    their union (bool, or float 0/1); w_in, w_out (H, d), b_in (H,), b_out (d,); for the GLU
    (glu: its gate's activation) w_in (2H, d) and b_in (2H,), as `layers.activation` lays
    them out. Equal to `InfiniteMoE.masked_ffn` (tests/layers/test_rows.py); meant for a
    few tokens. Runs in
    the weights' dtype whatever autocast says: casting the weights would read them twice."""
    with torch.autocast(x.device.type, enabled=False):
        return _rows_ffn(x.to(w_in.dtype), mask, chosen, w_in, b_in, w_out, b_out, glu)


def _rows_ffn(x: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor,
              w_out: torch.Tensor, b_out: torch.Tensor, glu: str | None) -> torch.Tensor:
    n_blocks = mask.shape[1]
    block = w_out.shape[0] // n_blocks
    pieces = max(1, torch.get_num_threads())
    units, weights, offsets, bag_token = [], [], [], []
    for t in range(x.shape[0]):
        blocks = chosen[t].nonzero().squeeze(1)
        gate = mask[t, blocks]
        unit = blocks if block == 1 else block_rows(blocks, block)
        if block > 1:
            gate = gate.repeat_interleave(block)
        rows = unit if glu is None else block_rows(blocks, in_rows(block, glu))  # of w_in
        pre = _input_projection(x[t], w_in, rows)
        pre += b_in[rows]
        first = sum(u.numel() for u in units)
        starts = range(first, first + unit.numel(), -(-unit.numel() // pieces))  # one bag per thread
        offsets += starts
        bag_token += [t] * len(starts)
        units.append(unit)
        weights.append(hidden(pre, block, glu).mul_(gate.to(pre.dtype)))
    bags = F.embedding_bag(torch.cat(units), w_out, torch.tensor(offsets, device=x.device), mode="sum",
                           per_sample_weights=torch.cat(weights))
    y = torch.zeros_like(bags[: x.shape[0]]).index_add_(0, torch.tensor(bag_token, device=x.device), bags)
    return y + b_out


def _input_projection(x: torch.Tensor, w_in: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """w_in[unit] @ x (|unit|,), for x (d,): all of w_in @ [x, 0]ᵀ, then the chosen rows."""
    two = torch.zeros(2, x.shape[0], dtype=x.dtype, device=x.device)
    two[0] = x
    return (w_in @ two.t())[unit, 0]
