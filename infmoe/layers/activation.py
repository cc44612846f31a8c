"""The hidden layer of a block-routed FFN, GELU or gated, with its hand-written backward.

A block of B hidden units reads its rows of the input projection: B of them for GPT-2's
MLP (h = GELU(a)), 2B for a GLU (Shazeer 2020), laid out per block as [the block's B gate
rows; its B up rows], so that a block stays one contiguous slice of rows and every
per-block view of the weights stays a view:

    mlp:  a (..., n · B)   → h = GELU(a)                          (..., n · B)
    glu:  a (..., n · 2B)  → h = act(a_gate) ⊙ a_up, block by block (..., n · B)

`glu` names the gate's activation ("silu": SwiGLU, "gelu": GEGLU, `glu.ACTIVATIONS`); None
is the GELU MLP. The paths with their own backward (`full_width`, `grouped`) call
`hidden_backward`; the others let autograd differentiate `hidden`.
"""

from __future__ import annotations

import torch

from infmoe.layers.base import gelu
from infmoe.layers.glu import ACTIVATIONS

# dL/da of each activation from dL/dact(a) and a: aten's own backward kernels.
_BACKWARD = {
    "silu": lambda grad, a: torch.ops.aten.silu_backward(grad, a),
    "gelu": lambda grad, a: torch.ops.aten.gelu_backward(grad, a, approximate="tanh"),
}


def in_rows(block: int, glu: str | None) -> int:
    """Input-projection rows (and pre-activation columns) of one block of `block` units."""
    return block if glu is None else 2 * block


def block_rows(blocks: torch.Tensor, width: int) -> torch.Tensor:
    """Blocks (..., n) → their rows (..., n · width) in a weight that holds `width` rows per
    block, each block's in order (w_in: `in_rows`; w_out: B)."""
    return (blocks.unsqueeze(-1) * width + torch.arange(width, device=blocks.device)).flatten(-2)


def _halves(a: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """a (..., n · 2B) → its gate and up parts, each a (..., n, B) view."""
    a = a.unflatten(-1, (-1, 2, block))
    return a.select(-2, 0), a.select(-2, 1)


def hidden(a: torch.Tensor, block: int, glu: str | None = None) -> torch.Tensor:
    """Pre-activation a (..., n · in_rows(B)) → hidden h (..., n · B), a new tensor."""
    if glu is None:
        return gelu(a)
    gate, up = _halves(a, block)
    # contiguous: the grouped-matmul kernel takes rows whose stride is 16-byte aligned
    return (ACTIVATIONS[glu](gate) * up).flatten(-2)


def hidden_backward(dh: torch.Tensor, a: torch.Tensor, block: int, glu: str | None = None) -> torch.Tensor:
    """dL/da (..., n · in_rows(B)) from dL/dh (..., n · B) and the pre-activation a.

    The MLP's is written into dh (consumed: one (…, H) tensor, no second). The GLU's
    recomputes act(a_gate), cheap next to the matmuls around it:
    dL/da_gate = act'(a_gate) ⊙ dh ⊙ a_up, dL/da_up = act(a_gate) ⊙ dh."""
    if glu is None:
        return torch.ops.aten.gelu_backward.grad_input(dh, a, approximate="tanh", grad_input=dh)
    gate, up = _halves(a, block)
    dh = dh.unflatten(-1, (-1, block))
    da = torch.empty_like(a).unflatten(-1, (-1, 2, block))
    da[..., 0, :] = _BACKWARD[glu](dh * up, gate)
    da[..., 1, :] = dh.mul_(ACTIVATIONS[glu](gate))
    return da.flatten(-3)
