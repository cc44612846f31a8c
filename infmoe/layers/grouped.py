"""Grouped (block-sparse) feed-forward: the fast path of `InfiniteMoE` and `TopKMoE`.

Both layers reduce to the same computation over a list of (token, group) *rows*, where a
group is an ∞-MoE block of B hidden units or a top-k expert of width B, and each row has a
gate weight g:

    y[t] = Σ_{rows r of token t}  g_r · GELU(x[t] @ w1[group_r] + b1[group_r]) @ w2[group_r]

with w1 (G, d, B), b1 (G, B), w2 (G, B, d). Rows are sorted by group, so group i owns the
contiguous rows [offs[i-1], offs[i]) and each matmul over a run of groups is *one* grouped
matmul (`torch._grouped_mm`: 2D rows × 3D weights forward, 2D × 2D for weight gradients).
Only the rows that exist are computed, forward and backward; nothing of size (tokens, G·B)
is built.

`GroupedFFN` is an autograd Function with its own backward: the gate weights get their
gradient (so the router learns), and only the gradients asked for are computed. It saves
the pre-activation (rows, B) only, the size of a dense MLP's hidden activation of the active
width, and recomputes GELU and re-gathers x in backward. The rows are processed in chunks
of whole groups so the (rows, d) gathered temporaries stay below `CHUNK_BYTES` (see there
why); on CPU at the gpt2-small shape that is one block per chunk, on CUDA one chunk.

Where `torch._grouped_mm` cannot run a Python loop of plain matmuls with the same semantics
takes its place: no such op in this torch; float64; strides not 16-byte aligned (B or d not
a multiple of 4 in float32); on CUDA anything but bf16 (where torch's own kernel is the same
loop, and its meta function rejects other dtypes). The float64 equivalence tests run that
loop through the same Function. Nothing else is device-specific; under autocast the inputs
are cast to the autocast dtype first, and the sums over rows are kept in fp32. Written for
CUDA but not yet run on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from infmoe.layers.base import at_least_fp32, gelu

# Largest (rows, d) temporary a chunk may allocate, on CPU; a chunk holds one group at least.
# Two reasons. Memory: the gathered rows are d / B times the size of the hidden activations,
# so unchunked they would dominate the peak (fwd+bwd peak at the gpt2-small shape, B = 256:
# 202 MB in one chunk, 105 MB with 16 MiB chunks, 82 MB with 4 MiB; the dense MLP of equal
# active width: 92 MB).
# Speed: glibc serves allocations above its mmap threshold (32 MiB at most) with fresh pages,
# and first-touch page faults made one 75 MB gather cost 5x its copy time on the 2-core
# benchmark machine, while freed memory below the threshold is reused. Time was the same for
# 2-16 MiB within the noise of that machine. On CUDA the caching allocator makes the speed
# reason moot and one launch is better: one chunk there.
CHUNK_BYTES = 4 * 2**20

# dtypes `torch._grouped_mm` takes, per device type; elsewhere the loop runs.
_FAST_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}


@dataclass
class Chunk:
    """Consecutive groups [group_start, group_end) and their rows.

    token (rows,): the token of each row, rows sorted by group.
    local_group (rows,): each row's group, counted from group_start.
    counts: rows per group (host ints); offs (groups,) int32: their cumulative sum.
    rows: the slice of this chunk's rows among all rows.
    """

    group_start: int
    group_end: int
    rows: slice
    token: torch.Tensor
    local_group: torch.Tensor
    counts: list[int]
    offs: torch.Tensor


def plan_chunks(token: torch.Tensor, counts: torch.Tensor, row_bytes: int, max_bytes: int | None) -> list[Chunk]:
    """Split rows sorted by group into chunks of whole groups of at most `max_bytes`
    (rows × row_bytes), one group per chunk at least. None means one chunk.

    token (rows,) sorted by group; counts (G,) rows per group.
    """
    host_counts = counts.tolist()
    limit = float("inf") if max_bytes is None else max(1, max_bytes // row_bytes)
    chunks, start_group, start_row, rows = [], 0, 0, 0
    for group, n in enumerate(host_counts):
        if rows and rows + n > limit:
            chunks.append(_chunk(token, host_counts, start_group, group, start_row))
            start_group, start_row, rows = group, start_row + rows, 0
        rows += n
    chunks.append(_chunk(token, host_counts, start_group, len(host_counts), start_row))
    return chunks


def _chunk(token: torch.Tensor, counts: list[int], g0: int, g1: int, r0: int) -> Chunk:
    local = counts[g0:g1]
    rows = slice(r0, r0 + sum(local))
    sizes = torch.tensor(local, device=token.device)
    local_group = torch.repeat_interleave(torch.arange(g1 - g0, device=token.device), sizes)
    offs = torch.cumsum(sizes, 0).to(torch.int32)
    return Chunk(g0, g1, rows, token[rows], local_group, local, offs)


def row_bytes_for(x: torch.Tensor) -> int:
    """Bytes of one gathered row of x on its device; 0 means "never chunk" (CUDA)."""
    return 0 if x.device.type == "cuda" else x.shape[-1] * x.element_size()


# ---------------------------------------------------------------------------------------
# Grouped matmul: torch._grouped_mm where it runs, else a loop with the same semantics.


def grouped_mm(a: torch.Tensor, b: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """Per-group matmuls of the chunk's groups, as `torch._grouped_mm` defines them:

    a (rows, k) × b (G, k, n) → (rows, n): rows of group i times b[i].
    a (m, rows) × b (rows, n) → (G, m, n): group i's columns of a times its rows of b.
    """
    if _fast_ok(a) and _fast_ok(b) and a.dtype == b.dtype and a.numel() and b.numel():
        return torch._grouped_mm(a, b, offs=chunk.offs)
    return grouped_mm_loop(a, b, chunk.counts)


def grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Reference semantics of `grouped_mm`, one plain matmul per group."""
    if b.dim() == 3:
        return torch.cat([part @ w for part, w in zip(a.split(counts), b)])
    return torch.stack([left @ right for left, right in zip(a.split(counts, dim=1), b.split(counts))])


def _fast_ok(t: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` accepts t: a float type it runs on t's device, a 16-byte
    aligned pointer, and one unit stride in the last two dims, the other a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or t.dtype not in _FAST_DTYPES.get(t.device.type, ()):
        return False
    align = 16 // t.element_size()
    (rows, cols), (row_stride, col_stride) = t.shape[-2:], t.stride()[-2:]
    row_major = col_stride == 1 and row_stride % align == 0 and row_stride >= max(1, cols)
    col_major = row_stride == 1 and col_stride % align == 0 and col_stride >= max(1, rows)
    return t.data_ptr() % 16 == 0 and (row_major or col_major)


# ---------------------------------------------------------------------------------------
# The Function.


class _WeightGrad:
    """Gradient of a grouped weight (G, m, n), filled chunk by chunk.

    Each chunk's part is Σ over a group's rows of leftᵀ right, left (rows, m) and right
    (rows, n). It is computed in the weight's own memory layout (column-major when the
    weight is a transposed view, as ∞-MoE's w_in is) so no copy is needed to accumulate it,
    and written into one preallocated tensor so the parts never coexist with the whole.

    A group with no rows gets an exact zero, written here: what a grouped-GEMM kernel
    leaves for an empty group is its own business (some leave the output buffer
    unwritten, others have returned non-zero gradients), and the preallocated whole is
    uninitialised memory.
    """

    def __init__(self, weight: torch.Tensor, n_chunks: int) -> None:
        self.transposed = weight.stride(-2) == 1 and weight.stride(-1) != 1
        shape = weight.transpose(1, 2).shape if self.transposed else weight.shape
        self.whole = weight.new_empty(shape) if n_chunks > 1 else None

    def add(self, left: torch.Tensor, right: torch.Tensor, chunk: Chunk) -> None:
        a, b = (right.T, left) if self.transposed else (left.T, right)
        if self.whole is None:
            self.whole = grouped_mm(a, b, chunk)
        elif chunk.group_end - chunk.group_start == 1:  # the common CPU case: no copy
            torch.mm(a, b, out=self.whole[chunk.group_start])
        else:
            self.whole[chunk.group_start : chunk.group_end] = grouped_mm(a, b, chunk)
        empty = [chunk.group_start + i for i, n in enumerate(chunk.counts) if n == 0]
        if empty:
            self.whole[empty] = 0

    def result(self) -> torch.Tensor:
        return self.whole.transpose(1, 2) if self.transposed else self.whole


class GroupedFFN(torch.autograd.Function):
    """y (T, d) = Σ over rows of g · GELU(x[token] @ w1[group] + b1[group]) @ w2[group].

    Inputs: x (T, d), gate (rows,), w1 (G, d, B) (any of the two layouts `_fast_ok`
    accepts), b1 (G, B), w2 (G, B, d), chunks from `plan_chunks`. Gradients for all five
    tensors; only those that are needed are computed; gradients of groups without rows
    are exactly zero. The backward is not itself differentiable (it raises if asked).

    The sums over many rows (y and dx over a token's blocks, db1 over a group's rows) are
    accumulated in at least fp32, and rounded to the inputs' dtype once at the end: summed
    in bf16, each addition rounds at the scale of the running sum.
    """

    @staticmethod
    def forward(ctx, x, gate, w1, b1, w2, chunks):
        y = torch.zeros(x.shape[0], w2.shape[-1], dtype=at_least_fp32(x).dtype, device=x.device)
        pre_activations = []
        for c in chunks:
            groups = slice(c.group_start, c.group_end)
            a = grouped_mm(x.index_select(0, c.token), w1[groups], c)  # (rows, B)
            a += _rows_of(b1, c)
            pre_activations.append(a)  # all backward keeps; GELU is cheap to redo
            h = gelu(a).mul_(gate[c.rows, None])
            # each token's rows add up: the sum over its blocks (or experts)
            y.index_add_(0, c.token, grouped_mm(h, w2[groups], c).to(y.dtype))
        ctx.chunks = chunks
        ctx.save_for_backward(x, gate, w1, b1, w2, *pre_activations)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, gate, w1, b1, w2, *pre_activations = ctx.saved_tensors
        need_x, need_gate, need_w1, need_b1, need_w2, _ = ctx.needs_input_grad
        accumulate = at_least_fp32(x).dtype
        dx = torch.zeros(x.shape, dtype=accumulate, device=x.device) if need_x else None
        dgate = torch.empty_like(gate) if need_gate else None
        # db1 of a group without rows is never written: an exact zero.
        db1 = torch.zeros(b1.shape, dtype=accumulate, device=b1.device) if need_b1 else None
        dw1 = _WeightGrad(w1, len(ctx.chunks)) if need_w1 else None
        dw2 = _WeightGrad(w2, len(ctx.chunks)) if need_w2 else None
        dy = dy.contiguous()
        for c, a in zip(ctx.chunks, pre_activations):
            groups = slice(c.group_start, c.group_end)
            g = gate[c.rows, None]
            h = gelu(a)
            dy_rows = dy.index_select(0, c.token)
            dgated = grouped_mm(dy_rows, w2[groups].transpose(1, 2), c)  # d(g · h), (rows, B)
            if need_gate:  # the router's gradient: ∂y/∂g = h @ w2, so dg = <d(g · h), h>
                dgate[c.rows] = (dgated * h).sum(1)
            if need_w2:
                dw2.add(h.mul_(g), dy_rows, c)
            del dy_rows, h  # free before the next (rows, d) temporaries
            da = torch.ops.aten.gelu_backward(dgated.mul_(g), a, approximate="tanh")
            if need_b1 and c.group_end - c.group_start == 1:  # the common CPU chunk: one block
                db1[c.group_start] += da.sum(0, dtype=accumulate)
            elif need_b1:
                db1[groups].index_add_(0, c.local_group, da.to(accumulate))
            if need_w1:
                dw1.add(x.index_select(0, c.token), da, c)
            if need_x:
                dx.index_add_(0, c.token, grouped_mm(da, w1[groups].transpose(1, 2), c).to(accumulate))
        dx = dx.to(x.dtype) if need_x else None
        db1 = db1.to(b1.dtype) if need_b1 else None
        dw1 = dw1.result() if need_w1 else None
        dw2 = dw2.result() if need_w2 else None
        return dx, dgate, dw1, db1, dw2, None


def _rows_of(b1: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """b1's row of each of the chunk's rows, (rows, B) or, for a chunk of one group, (B,),
    which broadcasts without being expanded in memory."""
    if chunk.group_end - chunk.group_start == 1:
        return b1[chunk.group_start]
    return b1[chunk.group_start : chunk.group_end].index_select(0, chunk.local_group)


def grouped_ffn(
    x: torch.Tensor,
    token: torch.Tensor,
    counts: torch.Tensor,
    gate: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Σ over rows of gate · GELU(x[token] @ w1[group] + b1[group]) @ w2[group] → (T, d).

    x (T, d); token (rows,) sorted by group; counts (G,) rows per group; gate (rows,);
    w1 (G, d, B); b1 (G, B); w2 (G, B, d). Under autocast everything is cast to the
    autocast dtype (gradients flow back to the originals through the casts).
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x, gate, w1, b1, w2 = (t.to(dtype) for t in (x, gate, w1, b1, w2))
    row_bytes = row_bytes_for(x)
    chunks = plan_chunks(token, counts, row_bytes, CHUNK_BYTES if row_bytes else None)
    with torch.autocast(device, enabled=False):
        return GroupedFFN.apply(x, gate, w1, b1, w2, chunks)
