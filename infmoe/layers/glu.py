"""A gated FFN (Shazeer 2020, "GLU Variants Improve Transformer"): SwiGLU or GEGLU.

    y = W_out (act(W_gate x + b_gate) ⊙ (W_up x + b_up)) + b_out

Three matrices instead of two, so at equal parameters its width is 2/3 of a GELU MLP's
(the `glu` configs: H = 8 d / 3). The biases stay, as in GPT-2's MLP, so the only
difference from `DenseMLP` is the gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infmoe.errors import choose
from infmoe.layers.base import gelu
from infmoe.layers.dense import DenseMLP

# SiLU gives SwiGLU, the gate of current open models; GELU (GPT-2's tanh form) gives GEGLU.
ACTIVATIONS = {"silu": F.silu, "gelu": gelu}


class GLU(DenseMLP):
    """x (..., d_model) → (..., d_model) through a gated hidden layer of width d_hidden.

    activation: "silu" (SwiGLU, the default) or "gelu" (GEGLU), applied to the gate half.
    c_fc (2H, d) holds the gate rows, then the up rows: one GEMM reads x once.
    """

    IN_ROWS = 2

    def __init__(self, d_model: int, d_hidden: int, *, activation: str = "silu") -> None:
        activation = choose("activation", activation, ACTIVATIONS)
        super().__init__(d_model, d_hidden)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(ACTIVATIONS[self.activation](gate) * up)

    def flops_per_token(self, n_samples: int = 1, union: float | None = None,
                        executed: bool = False) -> float:
        return 2 * 3 * self.d_model * self.d_hidden
