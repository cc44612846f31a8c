"""A gated FFN (Shazeer 2020, "GLU Variants Improve Transformer"): SwiGLU or GEGLU.

    y = W_out (act(W_gate x + b_gate) ⊙ (W_up x + b_up)) + b_out

Three matrices instead of two, so at equal parameters its width is 2/3 of a GELU MLP's
(the `glu` configs: H = 8 d / 3). The biases stay, as in GPT-2's MLP, so the only
difference from `DenseMLP` is the gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from infmoe.errors import choose, positive_int
from infmoe.layers.base import FFNLayer, gelu, init_normal_

# SiLU gives SwiGLU, the gate of current open models; GELU (GPT-2's tanh form) gives GEGLU.
ACTIVATIONS = {"silu": F.silu, "gelu": gelu}


class GLU(FFNLayer):
    """x (..., d_model) → (..., d_model) through a gated hidden layer of width d_hidden.

    activation: "silu" (SwiGLU, the default) or "gelu" (GEGLU), applied to the gate half.
    """

    def __init__(self, d_model: int, d_hidden: int, *, activation: str = "silu") -> None:
        super().__init__(positive_int("d_model", d_model), positive_int("d_hidden", d_hidden))
        self.activation = choose("activation", activation, ACTIVATIONS)
        # Gate and up projections as one (2H, d) matrix: one GEMM reads x once.
        self.c_fc = nn.Linear(d_model, 2 * d_hidden)
        self.c_proj = nn.Linear(d_hidden, d_model)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        init_normal_(self.c_fc.weight, std)
        init_normal_(self.c_proj.weight, std if out_std is None else out_std)
        nn.init.zeros_(self.c_fc.bias)
        nn.init.zeros_(self.c_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(ACTIVATIONS[self.activation](gate) * up)

    def active_parameters(self, n_samples: int = 1) -> float:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, n_samples: int = 1, union: float | None = None,
                        executed: bool = False) -> float:
        return 2 * 3 * self.d_model * self.d_hidden
