"""The full-width fast path of ∞-MoE: every hidden unit computed, then gated, with the
routing's score map, top-N selection and sigmoid gate folded into one autograd Function.

    s_k = z_k Aᵀ + c                                  scores, (K, T, n_blocks)
    m_k = sigmoid(s_k) ⊙ top_N(s_k)                   gates of the kept blocks, 0 elsewhere
    y   = (gelu(x W_inᵀ + b_in) ⊙ mean_k m_k) W_out + b_out

This is the path for per-unit routing (B = 1) and wherever the union of a token's masks is
most of H: at 50% density the dense matmuls over all of H cost less on dense hardware than
gathering half of them, so the limit is a dense MLP of the full width. What this adds to
that limit: the score map (K · d_z · H / B multiply-adds per token), one topk per score
row, and a few elementwise passes over (T, H), each in place where the math allows.

Why a Function of its own rather than autograd over `InfiniteMoE.masked_ffn`: autograd
would keep a float mask and its product with the hidden activations, index and scatter the
top-N choices, and materialise a gradient for every intermediate. Here the selection is a
threshold (the N-th largest score of each row), the gates overwrite the scores in place,
and backward uses that sigmoid's derivative is m (1 - m): with K = 1 the routing gradient
is (1 - m) · Σ_block (dL/dh̃ ⊙ h̃) for the gated hidden h̃, so GELU is not even recomputed.
It saves x, z, the pre-activation and the gated hidden (two (T, H) tensors, as a dense MLP's
autograd keeps two) and the gates (K, T, n_blocks). The reference it must equal is
`InfiniteMoE.masked_ffn` fed by `InfiniteMoE.select` (tests/layers/test_full_width.py).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from infmoe.layers.base import gelu
from infmoe.layers.scratch import scratch


def top_n_mask(scores: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """scores (rows, n_blocks) → float (rows, n_blocks): 1 for the n largest of each row,
    exactly the set ``scores.topk(n)`` keeps (rows with ties at the threshold take topk's
    choice), 0 elsewhere. Written into `out` when given."""
    rows = scores.shape[0]
    top = scratch("top_n.values", (rows, n), scores.dtype, scores.device)
    index = scratch("top_n.index", (rows, n), torch.long, scores.device)
    torch.topk(scores, n, dim=-1, sorted=False, out=(top, index))
    keep = torch.ge(scores, top.amin(-1, keepdim=True), out=torch.empty_like(scores) if out is None else out)
    tied = keep.sum(-1) != n
    if bool(tied.any()):  # equal scores at the threshold: more than n pass it
        tied_rows = tied.nonzero().squeeze(1)
        keep[tied_rows] = torch.zeros_like(keep[tied_rows]).scatter_(1, index[tied_rows], 1.0)
    return keep


def gate_scores(z: torch.Tensor, score_w: torch.Tensor, score_b: torch.Tensor, n_kept: int, sigmoid: bool,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """z (K, T, d_z) → (gates, keep), each (K · T, n_blocks): keep marks the n_kept highest
    scores s = z Aᵀ + c of each row (float 0/1, written into `keep` when given) and gates
    = sigmoid(s) there (1 for the constant gate), 0 elsewhere. The gates overwrite the
    scores in place: one (K · T, n_blocks) tensor made, the one backward keeps."""
    k, t, _ = z.shape
    gates = torch.addmm(score_b, z.reshape(k * t, -1), score_w.t())
    keep = top_n_mask(gates, n_kept, out=keep)
    if sigmoid:
        gates.sigmoid_().mul_(keep)
    else:  # the constant gate: 1 for a kept block, and no gradient to the router
        gates.copy_(keep)
    return gates, keep


class FullWidthFFN(torch.autograd.Function):
    """(y, usage) = the module docstring's y, and the share of the T tokens whose union of
    K masks holds each block (n_blocks,), from x (T, d), z (K, T, d_z), score weight A
    (n_blocks, d_z) and bias c (n_blocks,), w_in (H, d), b_in (H,), w_out (H, d), b_out (d,).
    usage is not differentiable. Routing (z, A, c, the scores and gates) stays in fp32;
    the FFN runs in x's dtype."""

    @staticmethod
    def forward(ctx, x, z, score_w, score_b, w_in, b_in, w_out, b_out, n_kept, sigmoid):
        k, t, _ = z.shape
        n_blocks = score_w.shape[0]
        block = w_in.shape[0] // n_blocks
        gates, keep = gate_scores(z, score_w, score_b, n_kept, sigmoid,
                                  keep=scratch("full_width.keep", (k * t, n_blocks), z.dtype, z.device))
        union = keep if k == 1 else keep.view(k, t, n_blocks).amax(0)
        usage = union.sum(0).div_(t)
        mean_gate = gates if k == 1 else gates.view(k, t, n_blocks).mean(0)
        a = torch.addmm(b_in, x, w_in.t())  # (T, H)
        gated = gelu(a)
        gated.view(t, n_blocks, block).mul_(mean_gate.to(gated.dtype).unsqueeze(-1))
        y = torch.addmm(b_out, gated, w_out)
        ctx.sigmoid = sigmoid
        ctx.save_for_backward(x, z, score_w, w_in, w_out, a, gated, gates)
        ctx.mark_non_differentiable(usage)
        ctx.set_materialize_grads(False)  # no zero gradient made for `usage`
        return y, usage

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _d_usage):
        x, z, score_w, w_in, w_out, a, gated, gates = ctx.saved_tensors
        need_x, need_z, need_sw, need_sb, need_w_in, need_b_in, need_w_out, need_b_out, _, _ = ctx.needs_input_grad
        k, t, _ = z.shape
        n_blocks = score_w.shape[0]
        block = w_in.shape[0] // n_blocks
        dy = dy.contiguous()
        d_gated = torch.mm(dy, w_out.t(), out=scratch("full_width.d_gated", a.shape, a.dtype, a.device))
        dw_out = gated.t() @ dy if need_w_out else None
        db_out = dy.sum(0) if need_b_out else None
        dz = dsw = dsb = None
        if ctx.sigmoid and (need_z or need_sw or need_sb):
            product = scratch("full_width.product", a.shape, a.dtype, a.device)
            if k == 1:
                # dL/dm = Σ_block dL/dh̃ ⊙ h with h̃ = m h, and the sigmoid's derivative is
                # m (1 - m), so dL/ds = (1 - m) Σ_block dL/dh̃ ⊙ h̃: no GELU recomputed.
                torch.mul(d_gated, gated, out=product)
                d_scores = _block_sum(product, t, n_blocks, block).to(gates.dtype)
                d_scores.addcmul_(d_scores, gates, value=-1)
            else:  # through the mean of K gates: dL/dm_k = dL/dm̄ / K, then m_k (1 - m_k)
                torch.ops.aten.gelu.out(a, approximate="tanh", out=product).mul_(d_gated)
                d_mean = _block_sum(product, t, n_blocks, block).to(gates.dtype).div(k)
                d_scores = torch.ops.aten.sigmoid_backward(d_mean.expand(k, t, n_blocks).reshape(k * t, n_blocks), gates)
            dz = (d_scores @ score_w).view(k, t, -1) if need_z else None
            dsw = d_scores.t() @ z.reshape(k * t, -1) if need_sw else None
            dsb = d_scores.sum(0) if need_sb else None
            del d_scores, product
        mean_gate = gates if k == 1 else gates.view(k, t, n_blocks).mean(0)
        d_gated.view(t, n_blocks, block).mul_(mean_gate.to(d_gated.dtype).unsqueeze(-1))
        da = torch.ops.aten.gelu_backward.grad_input(d_gated, a, approximate="tanh", grad_input=d_gated)
        dx = da @ w_in if need_x else None
        dw_in = da.t() @ x if need_w_in else None
        db_in = da.sum(0) if need_b_in else None
        return dx, dz, dsw, dsb, dw_in, db_in, dw_out, db_out, None, None


def _block_sum(u: torch.Tensor, t: int, n_blocks: int, block: int) -> torch.Tensor:
    """(T, H) → (T, n_blocks): the sum over each block's units (the tensor itself at B = 1)."""
    return u if block == 1 else u.view(t, n_blocks, block).sum(-1)


def full_width_ffn(x: torch.Tensor, z: torch.Tensor, score: torch.nn.Linear, w_in: torch.Tensor,
                   b_in: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor, n_kept: int,
                   sigmoid: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`FullWidthFFN` → (y (T, d), usage (n_blocks,)). `sigmoid`: the sigmoid gate (the
    scores' gradient flows); False: the constant gate 1 (none does). Under autocast the FFN
    runs in the autocast dtype (gradients flow back to the originals through the casts) and
    routing in at least fp32."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    routing = torch.promote_types(z.dtype, torch.float32)
    x, w_in, b_in, w_out, b_out = (u.to(dtype) for u in (x, w_in, b_in, w_out, b_out))
    z, score_w, score_b = (u.to(routing) for u in (z, score.weight, score.bias))
    with torch.autocast(device, enabled=False):
        return FullWidthFFN.apply(x, z, score_w, score_b, w_in, b_in, w_out, b_out, n_kept, sigmoid)
