"""Grouped (block-sparse) feed-forward: the fast path of `InfiniteMoE` and `TopKMoE`.

Both layers reduce to the same computation over a list of (token, group) *rows*, where a
group is an ∞-MoE block of B hidden units or a top-k expert of width B, and each row has a
gate weight g:

    y[t] = Σ_{rows r of token t}  g_r · GELU(x[t] @ w1[group_r] + b1[group_r]) @ w2[group_r]

with w1 (G, d, B), b1 (G, B), w2 (G, B, d). With `glu` set (a gated group: GELU becomes
act(a_gate) ⊙ a_up, `layers.activation`), w1 is (G, d, 2B) and b1 (G, 2B), each group's
B gate columns first, then its B up columns. Rows are sorted by group, so group i owns the
contiguous rows [offs[i-1], offs[i]) and each matmul over a run of groups is *one* grouped
matmul (`torch._grouped_mm`: 2D rows × 3D weights forward, 2D × 2D for weight gradients).
Only the rows that exist are computed, forward and backward; nothing of size (tokens, G·B)
is built.

Two executors, one per plan (`infmoe.layers.dispatch`):

- `grouped_ffn`, the host plan (eager CPU): rows come sorted with their counts, which are
  read on the host to cut the rows into chunks of whole groups (`plan_chunks`), so the
  (rows, d) gathered temporaries stay below `CHUNK_BYTES` (see there why); on CPU at the
  gpt2-small shape that is one block per chunk.
- `grouped_ffn_static`, the static plan (CUDA, and anything under `torch.compile`): a fixed
  number of rows in any order; they are sorted and their offsets computed on the device, one
  grouped matmul runs per product, and nothing is read on the host, so a graph compiles whole.

Both run the same autograd Function body (`GroupedFFN`, `StaticGroupedFFN`) with its own
backward: the gate weights get their gradient (so the router learns), and only the
gradients asked for are computed. It saves the pre-activation (rows, B) only, the size of a
dense MLP's hidden activation of the active width, and recomputes GELU and re-gathers x in
backward. Under autocast the inputs are cast to the autocast dtype first, and the sums over
rows are kept in fp32.

The grouped matmul: `torch._grouped_mm` where it runs as a real kernel
(`grouped_mm_supported`, decided once from the torch version and the device), every call
going through the module-level `_GROUPED_MM` so that a test can put `strict_grouped_mm`, a
CPU stand-in that enforces the CUDA kernel's contract, in its place
(`grouped_mm_contract`). Elsewhere a Python loop of plain matmuls with the same semantics
(float64 always; strides not 16-byte aligned, e.g. B or d not a multiple of 4 in float32).
The host plan calls the loop directly with its host counts; the static plan may not read
them, so on the CPU it runs kernel-or-loop inside one opaque op (`infmoe::grouped_mm`),
which is also how fp32 compiles (torch's fake kernel for `_grouped_mm` takes bf16 only);
on CUDA without the kernel it raises (use impl "full" there). Written for CUDA but not yet
run on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torch.torch_version import TorchVersion

from infmoe.errors import ConfigError
from infmoe.layers.activation import hidden, hidden_backward
from infmoe.layers.base import at_least_fp32

# Largest (rows, d) temporary a chunk may allocate, on CPU; a chunk holds one group at least.
# Two reasons. Memory: the gathered rows are d / B times the size of the hidden activations,
# so unchunked they would dominate the peak (the sparse rows' peak MB against the dense MLP
# of equal active width: docs/speed.md's layer table, from `infmoe bench`).
# Speed: glibc serves allocations above its mmap threshold (32 MiB at most) with fresh pages,
# whose first-touch page faults can cost more than the copy into them, while freed memory
# below the threshold is reused. On CUDA the caching allocator makes the speed reason moot
# and one launch is better: one chunk there (of at most MAX_GROUPS groups).
CHUNK_BYTES = 4 * 2**20

# Groups one grouped-matmul call may hold: the sm90 CUTLASS kernel behind torch._grouped_mm
# refuses 1024 or more. The host plan cuts chunks at this; the static plan cannot (cutting by
# group needs the counts on the host), so it refuses more groups.
MAX_GROUPS = 1023


# ---------------------------------------------------------------------------------------
# Whether torch._grouped_mm runs, decided once per device and dtype.

_SUPPORTED: dict[tuple[str, int | None, torch.dtype], bool] = {}


def grouped_mm_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs for `dtype` on `device` as a grouped kernel: no
    host synchronisation and no per-group loop of torch's own. Decided once per (device
    type, index, dtype) from the torch version and the device's compute capability, never by
    trying; the dispatch rule asks it too.

    CPU: torch >= 2.9 (2.8 has the op but raises NotImplementedError on CPU), in float32,
    bfloat16 and float16 (its CPU kernel's dtypes).
    CUDA: bfloat16 on compute capability 9.x (sm90), and 10.x (sm100) from torch 2.9.
    Conservative on purpose: since 2.9 torch accepts other GPUs and dtypes too, but there
    `_grouped_mm_cuda` takes its fallback, which copies the offsets to the host (a
    synchronisation) and loops over the groups, exactly what the static plan exists to
    avoid; torch's fast path itself is "sm90 or sm100, and bf16" (2.9 and later; sm100 is
    not trusted before). ROCm falls back likewise. Elsewhere False.
    """
    device = torch.device(device)
    key = (device.type, device.index, dtype)
    if key in _SUPPORTED:
        return _SUPPORTED[key]
    if torch.compiler.is_compiling():  # a cache filled inside a traced Function breaks its graph
        return _decide_supported(*key)
    _SUPPORTED[key] = _decide_supported(*key)  # a dict, not functools.cache, which torch.compile warns about
    return _SUPPORTED[key]


def _decide_supported(device_type: str, index: int | None, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    since_2_9 = TorchVersion(torch.__version__) >= "2.9"
    if device_type == "cpu":
        return since_2_9 and dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device_type == "cuda" and torch.version.hip is None and dtype == torch.bfloat16:
        return torch.cuda.get_device_capability(index)[0] in ((9, 10) if since_2_9 else (9,))
    return False


def _layout(t: torch.Tensor) -> str | None:
    """t's layout in its last two dims as `torch._grouped_mm` checks it: "col" (column-major)
    or "row" (row-major) with the other stride a multiple of 16 bytes; None if neither."""
    align = 16 // t.element_size()
    (rows, cols), (row_stride, col_stride) = t.shape[-2:], t.stride()[-2:]
    if row_stride == 1 and col_stride >= max(1, rows):  # torch tests this one first
        return "col" if col_stride % align == 0 else None
    if col_stride == 1 and row_stride >= max(1, cols):
        return "row" if row_stride % align == 0 else None
    return None


def _address(t: torch.Tensor) -> int:
    """t's address; 0 while compiling, where tensors have none (and torch.compile cannot trace
    storage_offset): there the operands are fresh tensors or whole weights, and every
    allocation is 16-byte aligned. The CUDA kernel checks the address itself at run time."""
    return 0 if torch.compiler.is_compiling() else t.data_ptr()


def _kernel_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs a (rows or columns) × b: both of one supported dtype
    on a device where it runs, neither empty, both 16-byte aligned in stride and address."""
    return (a.dtype == b.dtype and grouped_mm_supported(a.device, a.dtype) and a.numel() > 0 and b.numel() > 0
            and all(_layout(t) is not None and _address(t) % 16 == 0 for t in (a, b)))


# ---------------------------------------------------------------------------------------
# The kernel, and its strict CPU stand-in.


def _torch_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


# Every call of the grouped-matmul kernel goes through this (a, b, offs) → out; tests
# install `strict_grouped_mm` here with `grouped_mm_contract`.
_GROUPED_MM: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = _torch_grouped_mm


def strict_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm(a, b, offs=offs)` on any device, first raising (RuntimeError)
    wherever the CUDA kernel the static plan relies on (sm90, bf16) would refuse the call or
    be unsafe: a dtype but bfloat16; strides or an address not 16-byte aligned; offs not 1-D
    int32; 1024 groups or more; a 2-D operand whose jagged (rows) dimension is its contiguous
    one, for then each group's start would have to be 16-byte aligned, which offsets computed
    from routing never are.

    Checks only shapes, strides, dtypes and addresses, never tensor values: a test counts
    the data-dependent ops of a pass while it is installed. Computes with torch's op where
    it runs on this device (CPU: torch >= 2.9), else with the loop, which reads offs.
    """
    problems = []
    for name, t in (("a", a), ("b", b)):
        if t.dtype != torch.bfloat16:
            problems.append(f"{name} is {t.dtype}, the kernel takes bfloat16 only")
        if _layout(t) is None:
            problems.append(f"{name}'s strides {t.stride()} (sizes {tuple(t.shape)}) are not 16-byte aligned")
        if _address(t) % 16:
            problems.append(f"{name}'s address is not 16-byte aligned")
    if offs.dtype != torch.int32 or offs.dim() != 1:
        problems.append(f"offs must be 1-D int32, got {offs.dim()}-D {offs.dtype}")
    elif offs.shape[0] > MAX_GROUPS:
        problems.append(f"{offs.shape[0]} groups, the kernel takes at most {MAX_GROUPS}")
    # The jagged dimension: a's rows for a (rows, k) × b (G, k, n); both operands' rows in
    # the weight-gradient form a (m, rows) × b (rows, n).
    jagged = [("a", a, 0)] if b.dim() == 3 else [("a", a, 1), ("b", b, 0)]
    for name, t, dim in jagged:
        contiguous = {"row": 1, "col": 0}.get(_layout(t))
        if dim == contiguous and t.shape[1 - dim] > 1:
            problems.append(f"{name}'s jagged dim {dim} is its contiguous one")
    if problems:
        raise RuntimeError("torch._grouped_mm contract: " + "; ".join(problems))
    if grouped_mm_supported(a.device, a.dtype):
        return torch._grouped_mm(a, b, offs=offs)
    return grouped_mm_loop(a, b, _sizes(offs).tolist())


@contextlib.contextmanager
def grouped_mm_contract(kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                        = strict_grouped_mm) -> Iterator[None]:
    """Within the block every grouped-matmul kernel call goes to `kernel` (by default
    `strict_grouped_mm`) instead of `torch._grouped_mm`. The decision which calls reach the
    kernel and which the loop is unchanged."""
    global _GROUPED_MM
    saved, _GROUPED_MM = _GROUPED_MM, kernel
    try:
        yield
    finally:
        _GROUPED_MM = saved


# ---------------------------------------------------------------------------------------
# The host plan's chunks.


@dataclass
class Chunk:
    """Consecutive groups [group_start, group_end) and their rows.

    token (rows,): the token of each row, rows sorted by group.
    local_group (rows,): each row's group, counted from group_start.
    counts: rows per group as host ints; None on the static plan, where they stay on the
    device (as offs).
    offs (groups,) int32: the cumulative rows per group.
    rows: the slice of this chunk's rows among all rows.
    """

    group_start: int
    group_end: int
    rows: slice
    token: torch.Tensor
    local_group: torch.Tensor
    counts: list[int] | None
    offs: torch.Tensor


def plan_chunks(token: torch.Tensor, counts: torch.Tensor, row_bytes: int, max_bytes: int | None) -> list[Chunk]:
    """Split rows sorted by group into chunks of whole groups of at most `max_bytes`
    (rows × row_bytes), one group per chunk at least and `MAX_GROUPS` at most. None means
    no byte limit.

    token (rows,) sorted by group; counts (G,) rows per group.
    """
    host_counts = counts.tolist()
    limit = float("inf") if max_bytes is None else max(1, max_bytes // row_bytes)
    chunks, start_group, start_row, rows = [], 0, 0, 0
    for group, n in enumerate(host_counts):
        if group - start_group == MAX_GROUPS or (rows and rows + n > limit):
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
    """Bytes of one gathered row of x on its device; 0 means "no byte limit" (CUDA)."""
    return 0 if x.device.type == "cuda" else x.shape[-1] * x.element_size()


def _sizes(offs: torch.Tensor) -> torch.Tensor:
    """Rows per group (G,) from the cumulative offs (G,), on offs' device."""
    return torch.diff(offs, prepend=offs.new_zeros(1))


# ---------------------------------------------------------------------------------------
# Grouped matmul: the kernel where it runs, else a loop with the same semantics.


def grouped_mm(a: torch.Tensor, b: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """Per-group matmuls of the chunk's groups, as `torch._grouped_mm` defines them:

    a (rows, k) × b (G, k, n) → (rows, n): rows of group i times b[i].
    a (m, rows) × b (rows, n) → (G, m, n): group i's columns of a times its rows of b.
    """
    if chunk.counts is None:
        return static_grouped_mm(a, b, chunk.offs)
    if _kernel_ok(a, b):
        return _GROUPED_MM(a, b, chunk.offs)
    return grouped_mm_loop(a, b, chunk.counts)


def grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Reference semantics of `grouped_mm`, one plain matmul per group."""
    if b.dim() == 3:
        return torch.cat([part @ w for part, w in zip(a.split(counts), b)])
    return torch.stack([left @ right for left, right in zip(a.split(counts, dim=1), b.split(counts))])


# torch._grouped_mm's fake (meta) kernel, which torch.compile traces with, takes bf16 only.
_TRACEABLE_DTYPES = (torch.bfloat16,)


def static_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`grouped_mm` on the static plan, offs (G,) int32 on the device and never read on the
    host: the kernel where it runs (and traces); on the CPU otherwise the opaque op
    `infmoe::grouped_mm` (kernel or loop inside, out of the compiler's sight); on CUDA
    without the kernel a `ConfigError`."""
    if _kernel_ok(a, b) and (a.dtype in _TRACEABLE_DTYPES or not torch.compiler.is_compiling()):
        return _GROUPED_MM(a, b, offs)
    if a.device.type != "cpu":
        raise ConfigError(
            f"the static grouped path needs torch._grouped_mm's kernel, which does not run {a.dtype} "
            f"{tuple(a.shape)} x {tuple(b.shape)} on {a.device} (it needs bfloat16, sm90 or sm100, "
            "strides that are multiples of 16 bytes); use impl='full'")
    return _opaque_grouped_mm(a, b, offs)


# An export's generated copy of this module (infmoe.hf.standalone), loaded in the same
# process, must not define the same op again: the second definition replaces the first,
# and when either module object is collected its op goes with it, under the other's feet.
_OP_NAME = "infmoe::grouped_mm" if __name__ == "infmoe.layers.grouped" else \
    "infmoe_export::grouped_mm_" + "".join(c if c.isalnum() else "_" for c in __name__)


@torch.library.custom_op(_OP_NAME, mutates_args=())
def _opaque_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm(a, b, offs)` as one op the compiler does not look into (its own
    fake kernel takes bf16 only): the kernel where it runs, else the loop, which reads offs
    on the host (harmless on the CPU, the only device this op serves)."""
    if _kernel_ok(a, b):
        return _GROUPED_MM(a, b, offs)
    return grouped_mm_loop(a, b, _sizes(offs).tolist())


@_opaque_grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:  # (rows, k) × (G, k, n)
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])  # (m, rows) × (rows, n)


# ---------------------------------------------------------------------------------------
# The Functions: one chunk's forward and backward, shared by both plans.


class _WeightGrad:
    """Gradient of a grouped weight (G, m, n), filled chunk by chunk.

    Each chunk's part is Σ over a group's rows of leftᵀ right, left (rows, m) and right
    (rows, n). It is computed in the weight's own memory layout (column-major when the
    weight is a transposed view, as ∞-MoE's w_in is) so no copy is needed to accumulate it,
    and written into one preallocated tensor so the parts never coexist with the whole.

    A group with no rows gets an exact zero, written here: what a grouped-GEMM kernel
    leaves for an empty group is its own business (some leave the output buffer
    unwritten, others have returned non-zero gradients), and the preallocated whole is
    uninitialised memory. On the static plan the empty groups are a device mask.
    """

    def __init__(self, weight: torch.Tensor, n_chunks: int) -> None:
        self.transposed = weight.stride(-2) == 1 and weight.stride(-1) != 1
        shape = weight.transpose(1, 2).shape if self.transposed else weight.shape
        self.whole = weight.new_empty(shape) if n_chunks > 1 else None

    def add(self, left: torch.Tensor, right: torch.Tensor, chunk: Chunk) -> None:
        a, b = (right.T, left) if self.transposed else (left.T, right)
        if chunk.counts is None:  # static plan: one chunk of all groups, counts on the device
            empty = _sizes(chunk.offs) == 0
            self.whole = torch.where(empty[:, None, None], 0, grouped_mm(a, b, chunk))
            return
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


def _forward(x: torch.Tensor, gate: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             chunks: list[Chunk], glu: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y (T, d) in x's dtype, and each chunk's pre-activation (rows, B) ((rows, 2B) gated),
    all backward keeps (the activation is cheap to redo). y is summed in at least fp32 and
    rounded once."""
    y = torch.zeros(x.shape[0], w2.shape[-1], dtype=at_least_fp32(x).dtype, device=x.device)
    pre_activations = []
    for c in chunks:
        groups = slice(c.group_start, c.group_end)
        a = grouped_mm(x.index_select(0, c.token), w1[groups], c)  # (rows, B)
        a += _rows_of(b1, c)
        pre_activations.append(a)
        h = hidden(a, w2.shape[1], glu).mul_(gate[c.rows, None])
        # each token's rows add up: the sum over its blocks (or experts)
        y.index_add_(0, c.token, grouped_mm(h, w2[groups], c).to(y.dtype))
    return y.to(x.dtype), pre_activations


def _backward(needs: tuple[bool, ...], dy: torch.Tensor, x: torch.Tensor, gate: torch.Tensor,
              w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, chunks: list[Chunk],
              pre_activations: list[torch.Tensor], glu: str | None = None):
    """Gradients (dx, dgate, dw1, db1, dw2) of `_forward`, None where `needs` says so."""
    need_x, need_gate, need_w1, need_b1, need_w2 = needs
    accumulate = at_least_fp32(x).dtype
    dx = torch.zeros(x.shape, dtype=accumulate, device=x.device) if need_x else None
    dgate = torch.empty_like(gate) if need_gate else None
    # db1 of a group without rows is never written: an exact zero.
    db1 = torch.zeros(b1.shape, dtype=accumulate, device=b1.device) if need_b1 else None
    dw1 = _WeightGrad(w1, len(chunks)) if need_w1 else None
    dw2 = _WeightGrad(w2, len(chunks)) if need_w2 else None
    dy = dy.contiguous()
    for c, a in zip(chunks, pre_activations):
        groups = slice(c.group_start, c.group_end)
        g = gate[c.rows, None]
        h = hidden(a, w2.shape[1], glu)
        dy_rows = dy.index_select(0, c.token)
        dgated = grouped_mm(dy_rows, w2[groups].transpose(1, 2), c)  # d(g · h), (rows, B)
        if need_gate:  # the router's gradient: ∂y/∂g = h @ w2, so dg = <d(g · h), h>
            dgate[c.rows] = (dgated * h).sum(1)
        if need_w2:
            dw2.add(h.mul_(g), dy_rows, c)
        del dy_rows, h  # free before the next (rows, d) temporaries
        da = hidden_backward(dgated.mul_(g), a, w2.shape[1], glu)
        if need_b1 and c.group_end - c.group_start == 1:  # the common CPU chunk: one block
            db1[c.group_start] += da.sum(0, dtype=accumulate)
        elif need_b1:
            db1[groups].index_add_(0, c.local_group, da.to(accumulate))
        if need_w1:
            dw1.add(x.index_select(0, c.token), da, c)
        if need_x:
            dx.index_add_(0, c.token, grouped_mm(da, w1[groups].transpose(1, 2), c).to(accumulate))
    return (dx.to(x.dtype) if need_x else None, dgate, dw1.result() if need_w1 else None,
            db1.to(b1.dtype) if need_b1 else None, dw2.result() if need_w2 else None)


class GroupedFFN(torch.autograd.Function):
    """y (T, d) = Σ over rows of g · GELU(x[token] @ w1[group] + b1[group]) @ w2[group],
    the host plan.

    Inputs: x (T, d), gate (rows,), w1 (G, d, B) (row-major, or a transposed view of a
    (G, B, d) tensor), b1 (G, B), w2 (G, B, d), chunks from `plan_chunks`; glu: a gated
    group's activation (w1 (G, d, 2B), b1 (G, 2B)), None for GELU. Gradients for all
    five tensors; only those that are needed are computed; gradients of groups without rows
    are exactly zero. The backward is not itself differentiable (it raises if asked).

    The sums over many rows (y and dx over a token's blocks, db1 over a group's rows) are
    accumulated in at least fp32, and rounded to the inputs' dtype once at the end: summed
    in bf16, each addition rounds at the scale of the running sum.
    """

    @staticmethod
    def forward(ctx, x, gate, w1, b1, w2, chunks, glu=None):
        y, pre_activations = _forward(x, gate, w1, b1, w2, chunks, glu)
        ctx.chunks, ctx.glu = chunks, glu
        ctx.save_for_backward(x, gate, w1, b1, w2, *pre_activations)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, gate, w1, b1, w2, *pre_activations = ctx.saved_tensors
        grads = _backward(ctx.needs_input_grad[:5], dy, x, gate, w1, b1, w2, ctx.chunks, pre_activations,
                          ctx.glu)
        return *grads, None, None


class StaticGroupedFFN(torch.autograd.Function):
    """`GroupedFFN` on the static plan: one chunk of all G groups, whose offsets and empty
    groups stay on the device.

    Inputs: x, gate (rows,), w1, b1, w2, glu as `GroupedFFN`; token (rows,) and group
    (rows,) int64 sorted by group; offs (G,) int32, the cumulative rows per group. Saves the
    inputs and the pre-activation (rows, B) ((rows, 2B) gated), nothing else.
    """

    @staticmethod
    def forward(ctx, x, gate, w1, b1, w2, token, group, offs, glu=None):
        y, (a,) = _forward(x, gate, w1, b1, w2, [_static_chunk(token, group, offs)], glu)
        ctx.glu = glu
        ctx.save_for_backward(x, gate, w1, b1, w2, token, group, offs, a)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, gate, w1, b1, w2, token, group, offs, a = ctx.saved_tensors
        chunks = [_static_chunk(token, group, offs)]
        grads = _backward(ctx.needs_input_grad[:5], dy, x, gate, w1, b1, w2, chunks, [a], ctx.glu)
        return *grads, None, None, None, None


def _static_chunk(token: torch.Tensor, group: torch.Tensor, offs: torch.Tensor) -> Chunk:
    return Chunk(0, offs.shape[0], slice(None), token, group, None, offs)


def _rows_of(b1: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """b1's row of each of the chunk's rows, (rows, B) or, for a chunk of one group, (B,),
    which broadcasts without being expanded in memory."""
    if chunk.group_end - chunk.group_start == 1:
        return b1[chunk.group_start]
    return b1[chunk.group_start : chunk.group_end].index_select(0, chunk.local_group)


# ---------------------------------------------------------------------------------------
# The executors.


def _in_compute_dtype(*tensors: torch.Tensor) -> tuple[str, list[torch.Tensor]]:
    """The device type, and the tensors cast to the autocast dtype where autocast is on
    (gradients flow back to the originals through the casts)."""
    device = tensors[0].device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensors[0].dtype
    return device, [t.to(dtype) for t in tensors]


def grouped_ffn(
    x: torch.Tensor,
    token: torch.Tensor,
    counts: torch.Tensor,
    gate: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    glu: str | None = None,
) -> torch.Tensor:
    """Σ over rows of gate · GELU(x[token] @ w1[group] + b1[group]) @ w2[group] → (T, d),
    on the host plan.

    x (T, d); token (rows,) sorted by group; counts (G,) rows per group (read on the host);
    gate (rows,); w1 (G, d, B); b1 (G, B); w2 (G, B, d). glu: gated groups, GELU replaced by
    act(gate part) ⊙ up part, w1 (G, d, 2B), b1 (G, 2B) (the module docstring); None: GELU.
    Under autocast everything is cast
    to the autocast dtype (gradients flow back to the originals through the casts).
    """
    device, (x, gate, w1, b1, w2) = _in_compute_dtype(x, gate, w1, b1, w2)
    row_bytes = row_bytes_for(x)
    chunks = plan_chunks(token, counts, row_bytes, CHUNK_BYTES if row_bytes else None)
    with torch.autocast(device, enabled=False):
        return GroupedFFN.apply(x, gate, w1, b1, w2, chunks, glu)


def grouped_ffn_static(
    x: torch.Tensor,
    token: torch.Tensor,
    group: torch.Tensor,
    gate: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    glu: str | None = None,
) -> torch.Tensor:
    """The same sum as `grouped_ffn` → (T, d), on the static plan: nothing is read on the
    host, every shape is fixed by the inputs' shapes, and it compiles whole.

    x (T, d); token (rows,) and group (rows,) int64, in any order; gate (rows,) (a row
    with gate 0 is computed and contributes zero); w1 (G, d, B), possibly a transposed view;
    b1 (G, B); w2 (G, B, d); glu as `grouped_ffn`. The rows are sorted by group on the
    device (stable argsort) and one grouped matmul runs per product over all G groups, so G
    may be at most `MAX_GROUPS` (a `ConfigError` beyond). Autocast as `grouped_ffn`.
    """
    n_groups = w1.shape[0]
    if n_groups > MAX_GROUPS:
        raise ConfigError(f"the static grouped path got {n_groups} groups: torch._grouped_mm takes at most "
                          f"{MAX_GROUPS} per call; use larger blocks (units_per_block) or impl='full'")
    order = group.argsort(stable=True)
    group = group[order]
    # offs[i] = rows of groups <= i: where group i's run ends in the sorted rows
    offs = torch.searchsorted(group, torch.arange(n_groups, device=group.device, dtype=group.dtype),
                              right=True, out_int32=True)
    device, (x, gate, w1, b1, w2) = _in_compute_dtype(x, gate, w1, b1, w2)
    with torch.autocast(device, enabled=False):
        return StaticGroupedFFN.apply(x, gate[order], w1, b1, w2, token[order], group, offs, glu)
