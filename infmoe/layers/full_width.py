"""The full-width fast path of ∞-MoE: every hidden unit computed, then gated, with the
routing's score map, top-N selection and sigmoid gate folded into one autograd Function.

    s_k = z_k Aᵀ + c                                  scores of sample k, (T, n_blocks)
    m_k = sigmoid(s_k) ⊙ top_N(s_k)                   gates of the kept blocks, 0 elsewhere
    m̄   = mean_k m_k                                  (T, n_blocks)
    y   = (h(x W_inᵀ + b_in) ⊙ m̄) W_out + b_out       m̄ broadcast over each block's units

h is GELU, or for a gated ∞-MoE (ffn "glu") act(gate) ⊙ up of each block's 2B input rows
(`layers.activation`; W_in is then (2H, d)).

This is the path for per-unit routing (B = 1) and wherever the union of a token's masks is
most of H: at 50% density the dense matmuls over all of H cost less on dense hardware than
gathering half of them, so the limit is a dense MLP of the full width. What this adds to
that limit: the score map (K · d_z · H / B multiply-adds per token), one topk per score
row, and a few elementwise passes over (T, H), each in place where the math allows.

Why a Function of its own rather than autograd over `InfiniteMoE.masked_ffn`: autograd
would keep a float mask per sample and its product with the hidden activations, index and
scatter the top-N choices, and materialise a gradient for every intermediate. Here each
sample's kept gates, sigmoid(topk values), are scattered straight into m̄ (the sigmoid
runs on the kept half only), and backward uses that sigmoid's derivative is m (1 - m)
where a block is kept (and 0 where it is not):

- K = 1: dL/ds = (1 - m) Σ_block dL/dh̃ ⊙ h̃ for the gated hidden h̃ = m h, so GELU is not
  even recomputed (the GLU's act is, once, for dL/d up).
- K > 1: the same sum is m̄ · dL/dm̄, so dL/dm̄ = Σ_block (dL/dh̃ ⊙ h̃) / m̄ wherever m̄ > 0
  (where m̄ = 0 no sample kept the block, and no sample's score gets a gradient there);
  then dL/ds_k = dL/dm̄ / K ⊙ m_k (1 - m_k), one sample at a time. GELU is not
  recomputed here either.

What backward keeps does not grow with K beyond one bit per (sample, token, block).
Forward forms each sample's scores and selection in (T, n_blocks) temporaries, one sample
at a time, accumulating m̄ and the union of the masks, and saves x, z, A, c, w_in, w_out,
the pre-activation and the gated hidden (two (T, H) tensors, as a dense MLP's autograd
keeps two; the GLU's pre-activation is (T, 2H)), m̄ (T, n_blocks) and, for K > 1 with
the sigmoid gate, each sample's selection packed eight blocks to a byte (K, T,
⌈n_blocks / 8⌉). Backward recomputes each m_k from
z_k with one small matmul and that selection; no second topk. What it saves per K:
`infmoe bench`'s "Saved for backward" table (docs/speed.md); tests/layers/test_full_width.py
bounds its growth with K. The reference it must equal is
`InfiniteMoE.masked_ffn` fed by `InfiniteMoE.select` (tests/layers/test_full_width.py).

Nothing here reads tensor data on the host or keeps Python state across calls under
`torch.compile` (`infmoe.layers.scratch`), so a caller compiles it whole.
"""

from __future__ import annotations


import torch
from torch.autograd.function import once_differentiable

from infmoe.layers.activation import hidden, hidden_backward
from infmoe.layers.scratch import scratch


def top_n_mask(scores: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """scores (rows, n_blocks) → float (rows, n_blocks): 1 for the n largest of each row,
    exactly the set ``scores.topk(n)`` keeps (rows with ties at the threshold take topk's
    choice), 0 elsewhere. Written into `out` when given.

    Ones scattered at topk's indices rather than a comparison with each row's n-th largest
    score: the same set without ties, exactly n with them, and no host read to find the
    tied rows. It costs as much as the comparison did: a scatter from an expanded source
    runs as fast as the compare, the zero fill as the tie count it replaces."""
    _, index = _top_n(scores, n)
    return _scatter_ones(torch.zeros_like(scores) if out is None else out.zero_(), index)


def gate_scores(z: torch.Tensor, score_w: torch.Tensor, score_b: torch.Tensor, n_kept: int, sigmoid: bool,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """z (K, T, d_z) → (gates, keep), each (K · T, n_blocks): keep marks the n_kept highest
    scores s = z Aᵀ + c of each row (float 0/1, written into `keep` when given) and gates
    = sigmoid(s) there (1 for the constant gate), 0 elsewhere. The gates overwrite the
    scores: one (K · T, n_blocks) tensor made besides `keep`."""
    k, t, _ = z.shape
    gates = torch.addmm(score_b, z.reshape(k * t, -1), score_w.t())
    top, index = _top_n(gates, n_kept)
    keep = _scatter_ones(torch.zeros_like(gates) if keep is None else keep.zero_(), index)
    return gates.zero_().scatter_(1, index, top.sigmoid_() if sigmoid else _ones_like(top)), keep


class FullWidthFFN(torch.autograd.Function):
    """(y, usage) = the module docstring's y, and the share of the T tokens whose union of
    K masks holds each block (n_blocks,), from x (T, d), z (K, T, d_z), score weight A
    (n_blocks, d_z) and bias c (n_blocks,), w_in (H, d), b_in (H,), w_out (H, d), b_out (d,);
    for the GLU (glu: its gate's activation, else None) w_in (2H, d) and b_in (2H,), laid
    out as `layers.activation` says. usage is not differentiable. Routing (z, A, c, the
    scores and gates) stays in fp32; the FFN runs in x's dtype. Not twice differentiable."""

    @staticmethod
    def forward(ctx, x, z, score_w, score_b, w_in, b_in, w_out, b_out, n_kept, sigmoid, glu):
        k, t, _ = z.shape
        n_blocks = score_w.shape[0]
        block = w_out.shape[0] // n_blocks
        routed = sigmoid and k > 1 and any(ctx.needs_input_grad[1:4])  # backward needs each m_k
        mean_gate = z.new_zeros(t, n_blocks)  # kept for backward
        union = scratch("full_width.union", (t, n_blocks), z.dtype, z.device).zero_()
        # each sample's selection, eight blocks a byte (filled in place: a torch.stack of
        # the K pieces would allocate and copy them once more)
        selections = z.new_empty((k, t, -(-n_blocks // 8)), dtype=torch.uint8) if routed else None
        for i in range(k):  # K is a Python int: a compiler unrolls the loop
            scores = torch.addmm(score_b, z[i], score_w.t(),
                                 out=scratch("full_width.scores", (t, n_blocks), z.dtype, z.device))
            top, index = _top_n(scores, n_kept)
            # m_k is sigmoid(top) at the kept indices: scattered straight into m̄, so no
            # (T, n_blocks) gate of its own, and the sigmoid runs on the kept half only
            mean_gate.scatter_add_(1, index, top.sigmoid_() if sigmoid else _ones_like(top))
            if routed:
                keep = scratch("full_width.keep", (t, n_blocks), z.dtype, z.device)
                _scatter_ones(keep.zero_(), index)
                _pack_bits(keep, out=selections[i])
                torch.maximum(union, keep, out=union)
            else:
                _scatter_ones(union, index)
        if k > 1:
            mean_gate.div_(k)
        usage = union.sum(0).div_(t)
        a = torch.addmm(b_in, x, w_in.t())  # (T, H), the GLU's (T, 2H)
        gated = hidden(a, block, glu)
        gated.view(t, n_blocks, block).mul_(mean_gate.to(gated.dtype).unsqueeze(-1))
        y = torch.addmm(b_out, gated, w_out)
        ctx.sigmoid, ctx.glu = sigmoid, glu
        ctx.save_for_backward(x, z, score_w, score_b, w_in, w_out, a, gated, mean_gate, selections)
        ctx.mark_non_differentiable(usage)
        ctx.set_materialize_grads(False)  # no zero gradient made for `usage`
        return y, usage

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _d_usage):
        # in forward's precision, not in whatever autocast state the caller of backward holds
        with torch.autocast(dy.device.type, enabled=False):
            return FullWidthFFN._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, z, score_w, score_b, w_in, w_out, a, gated, mean_gate, selections = ctx.saved_tensors
        need_x, need_z, need_sw, need_sb, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:8]
        k, t, _ = z.shape
        n_blocks = score_w.shape[0]
        block = w_out.shape[0] // n_blocks
        dy = dy.contiguous()
        d_gated = torch.mm(dy, w_out.t(), out=scratch("full_width.d_gated", gated.shape, a.dtype, a.device))
        dw_out = gated.t() @ dy if need_w_out else None
        db_out = dy.sum(0) if need_b_out else None
        dz = dsw = dsb = None
        if ctx.sigmoid and (need_z or need_sw or need_sb):
            # m̄ · dL/dm̄ = Σ_block dL/dh̃ ⊙ h̃ for h̃ = m̄ h(a): no activation recomputed
            product = torch.mul(d_gated, gated,
                                out=scratch("full_width.product", gated.shape, a.dtype, a.device))
            d_scaled = _block_sum(product, t, n_blocks, block).to(mean_gate.dtype)
            if k == 1:  # dL/ds = m (1 - m) dL/dm = (1 - m) · the sum above
                d_scores = d_scaled.addcmul_(d_scaled, mean_gate, value=-1)
                dz = (d_scores @ score_w).unsqueeze(0) if need_z else None
                dsw = d_scores.t() @ z[0] if need_sw else None
                dsb = d_scores.sum(0) if need_sb else None
            else:
                # dL/dm̄ / K, by the m̄ that h̃ was scaled with (rounded to the FFN's dtype);
                # 0 where m̄ = 0 (there h̃ = 0 and every m_k = 0: the clamp only avoids 0/0)
                scale = mean_gate.to(gated.dtype).to(mean_gate.dtype) * k
                d_mean = d_scaled.div_(scale.clamp_min_(torch.finfo(mean_gate.dtype).tiny))
                dz = torch.empty_like(z) if need_z else None
                for i in range(k):  # one sample's (T, n_blocks) gradient at a time
                    d_scores = _sample_score_grad(d_mean, z[i], score_w, score_b, selections[i])
                    if need_z:
                        torch.mm(d_scores, score_w, out=dz[i])
                    if need_sw:
                        dsw = d_scores.t() @ z[i] if dsw is None else dsw.addmm_(d_scores.t(), z[i])
                    if need_sb:
                        dsb = d_scores.sum(0) if dsb is None else dsb.add_(d_scores.sum(0))
            del d_scores, d_scaled, product
        d_gated.view(t, n_blocks, block).mul_(mean_gate.to(d_gated.dtype).unsqueeze(-1))
        da = hidden_backward(d_gated, a, block, ctx.glu)
        dx = da @ w_in if need_x else None
        dw_in = da.t() @ x if need_w_in else None
        db_in = da.sum(0) if need_b_in else None
        return dx, dz, dsw, dsb, dw_in, db_in, dw_out, db_out, None, None, None


def _top_n(scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (rows, n_blocks) → (values, indices), each (rows, n): ``scores.topk(n)``,
    unsorted, in `scratch` tensors."""
    rows = scores.shape[0]
    top = scratch("top_n.values", (rows, n), scores.dtype, scores.device)
    index = scratch("top_n.index", (rows, n), torch.long, scores.device)
    torch.topk(scores, n, dim=-1, sorted=False, out=(top, index))
    return top, index


def _ones_like(u: torch.Tensor) -> torch.Tensor:
    """Ones of u's shape as a stride-0 view: a scatter source that reads one element."""
    return u.new_ones(1, 1).expand(u.shape)


def _scatter_ones(out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """1 into out (rows, n_blocks) at index (rows, n), in place. A scatter from an expanded
    source runs faster on the CPU than one of a scalar value."""
    return out.scatter_(1, index, out.new_ones(1, 1).expand(index.shape))


def _sample_score_grad(d_mean: torch.Tensor, z: torch.Tensor, score_w: torch.Tensor, score_b: torch.Tensor,
                       packed: torch.Tensor) -> torch.Tensor:
    """dL/ds_k (T, n_blocks) of one sample from dL/dm̄ / K (T, n_blocks), its z (T, d_z) and
    its packed selection (T, ⌈n_blocks / 8⌉): d_mean ⊙ sigmoid'(s_k) where kept, else 0.
    The scores recomputed from z (one small matmul) rather than saved per sample."""
    t, n_blocks = z.shape[0], score_w.shape[0]
    scores = torch.addmm(score_b, z, score_w.t(),
                         out=scratch("full_width.scores", (t, n_blocks), z.dtype, z.device))
    d_scores = torch.ops.aten.sigmoid_backward.grad_input(d_mean, scores.sigmoid_(), grad_input=scores)
    return d_scores.mul_(_unpack_bits(packed, n_blocks, d_scores.dtype))


def _pack_bits(keep: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """float 0/1 (T, n_blocks) → out, uint8 (T, ⌈n_blocks / 8⌉): bit j of byte i holds
    block 8 i + j. A matrix-vector product with the bit values sums each group of eight
    exactly (≤ 255), faster on the CPU than an integer multiply and sum."""
    t, n_blocks = keep.shape
    if n_blocks % 8:
        keep = torch.nn.functional.pad(keep, (0, -n_blocks % 8))
    values = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=keep.dtype, device=keep.device)
    return out.copy_(keep.view(t, -1, 8) @ values)


def _unpack_bits(packed: torch.Tensor, n_blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (T, ⌈n_blocks / 8⌉) → 0/1 of `dtype` (T, n_blocks): `_pack_bits` undone, by
    looking each byte's eight values up in a 256-row table: one gather, no arithmetic per
    bit, and a float mask that multiplies at full vector speed (a bool mask, through
    masked_fill or a mixed-dtype multiply, costs more on the CPU)."""
    t, n_bytes = packed.shape
    device = packed.device
    table = ((torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1).to(dtype)
    index = scratch("full_width.bytes", (t * n_bytes,), torch.long, device).copy_(packed.view(-1))
    mask = scratch("full_width.mask", (t * n_bytes, 8), dtype, device)
    torch.index_select(table, 0, index, out=mask)
    return mask.view(t, -1)[:, :n_blocks]


def _block_sum(u: torch.Tensor, t: int, n_blocks: int, block: int) -> torch.Tensor:
    """(T, H) → (T, n_blocks): the sum over each block's units (the tensor itself at B = 1)."""
    return u if block == 1 else u.view(t, n_blocks, block).sum(-1)


def full_width_ffn(x: torch.Tensor, z: torch.Tensor, score: torch.nn.Linear, w_in: torch.Tensor,
                   b_in: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor, n_kept: int,
                   sigmoid: bool = True, glu: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`FullWidthFFN` → (y (T, d), usage (n_blocks,)). `sigmoid`: the sigmoid gate (the
    scores' gradient flows); False: the constant gate 1 (none does). `glu`: the GLU gate's
    activation, None for the GELU MLP. Under autocast the FFN
    runs in the autocast dtype (gradients flow back to the originals through the casts) and
    routing in at least fp32."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    routing = torch.promote_types(z.dtype, torch.float32)
    x, w_in, b_in, w_out, b_out = (u.to(dtype) for u in (x, w_in, b_in, w_out, b_out))
    z, score_w, score_b = (u.to(routing) for u in (z, score.weight, score.bias))
    with torch.autocast(device, enabled=False):
        return FullWidthFFN.apply(x, z, score_w, score_b, w_in, b_in, w_out, b_out, n_kept, sigmoid, glu)
