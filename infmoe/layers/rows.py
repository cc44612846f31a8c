"""The decoding path of ∞-MoE: a token or two, no gradient, and only the chosen rows read.

Decoding one token is bound by reading weights, not by arithmetic: a dense MLP of width W
reads its 2 · W · d weights to do 4 · W · d FLOPs. A token whose K masks keep the union U of
the hidden units needs only the rows of U, so the limit is a dense MLP of width |U|.

- Input projection: h_u = w_in[u] · x + b_in[u] for u in U. No PyTorch op gathers rows into
  a dot product without writing them out, so the rows are gathered in chunks of `ROW_CHUNK`
  into one reused buffer that stays in cache, each chunk one matrix-vector product: the
  rows are read from memory once. Where U is nearly all of H, one product over all rows is
  cheaper than gathering.
- Output projection: y = Σ_u g_u gelu(h_u) w_out[u] + b_out is exactly `F.embedding_bag`
  with per-sample weights (mode "sum"), which reads the chosen rows and copies none. One bag
  runs on one thread, so a token's rows are split into one bag per thread and summed.

Read from memory (weights evicted, as in a deep model), 2 CPU threads, 9.4 MB of rows:
embedding_bag in 2 bags 0.66 ms, in 1 bag 1.25 ms, MKL's matrix-vector product over the
same bytes 0.88 ms, the chunked gather + product 0.97 ms (docs/speed.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infmoe.layers.base import gelu
from infmoe.layers.scratch import scratch

# Rows of w_in gathered per matrix-vector product: 512 rows of d = 768 floats are 1.5 MiB,
# which stays in the L2/L3 cache between the gather and the product (512 and 1024 measured
# alike on the benchmark machine; one gather of all 3072 rows, 40% slower).
ROW_CHUNK = 512
# Above this share of H in a token's union, its input projection reads every row in one
# product instead of gathering: w_in @ [x, 0]ᵀ streams all of w_in at 18 GB/s on the benchmark
# machine (MKL's gemm with two right-hand columns runs on both threads; its matrix-vector
# product on one, at 10 GB/s), while gathering runs at 10 GB/s of the rows it keeps.
GATHER_LIMIT = 0.57


@torch.no_grad()
def rows_ffn(x: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor,
             w_out: torch.Tensor, b_out: torch.Tensor) -> torch.Tensor:
    """y (T, d) for x (T, d): mask (T, n_blocks) the summed gates m̄, chosen (T, n_blocks)
    their union (bool, or float 0/1); w_in, w_out (H, d), b_in (H,), b_out (d,). Equal to
    `InfiniteMoE.masked_ffn` (tests/layers/test_rows.py); meant for a few tokens. Runs in
    the weights' dtype whatever autocast says: casting the weights would read them twice."""
    with torch.autocast(x.device.type, enabled=False):
        return _rows_ffn(x.to(w_in.dtype), mask, chosen, w_in, b_in, w_out, b_out)


def _rows_ffn(x: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor,
              w_out: torch.Tensor, b_out: torch.Tensor) -> torch.Tensor:
    n_hidden, n_blocks = w_in.shape[0], mask.shape[1]
    block = n_hidden // n_blocks
    pieces = max(1, torch.get_num_threads())
    units, weights, offsets, bag_token = [], [], [], []
    for t in range(x.shape[0]):
        blocks = chosen[t].nonzero().squeeze(1)
        gate = mask[t, blocks]
        unit = blocks if block == 1 else (blocks[:, None] * block + torch.arange(block, device=x.device)).flatten()
        if block > 1:
            gate = gate.repeat_interleave(block)
        pre = _input_projection(x[t], w_in, unit, dense=unit.numel() > GATHER_LIMIT * n_hidden)
        pre += b_in[unit]
        first = sum(u.numel() for u in units)
        starts = range(first, first + unit.numel(), -(-unit.numel() // pieces))  # one bag per thread
        offsets += starts
        bag_token += [t] * len(starts)
        units.append(unit)
        weights.append(gelu(pre).mul_(gate.to(pre.dtype)))
    bags = F.embedding_bag(torch.cat(units), w_out, torch.tensor(offsets, device=x.device), mode="sum",
                           per_sample_weights=torch.cat(weights))
    y = torch.zeros_like(bags[: x.shape[0]]).index_add_(0, torch.tensor(bag_token, device=x.device), bags)
    return y + b_out


def _input_projection(x: torch.Tensor, w_in: torch.Tensor, unit: torch.Tensor, dense: bool) -> torch.Tensor:
    """w_in[unit] @ x: one product over all rows when `dense`, else chunked gathers."""
    if dense:
        two = torch.zeros(2, x.shape[0], dtype=x.dtype, device=x.device)
        two[0] = x
        return (w_in @ two.t())[unit, 0]
    pre = torch.empty(unit.numel(), dtype=w_in.dtype, device=x.device)
    buffer = scratch("rows.w_in", (ROW_CHUNK, w_in.shape[1]), w_in.dtype, w_in.device)
    for start in range(0, unit.numel(), ROW_CHUNK):
        part = unit[start : start + ROW_CHUNK]
        rows = buffer[: part.numel()]
        torch.index_select(w_in, 0, part, out=rows)
        torch.mv(rows, x, out=pre[start : start + part.numel()])
    return pre
