"""GPT-2's MLP: Linear(d → H), GELU, Linear(H → d)."""

from __future__ import annotations

import torch
from torch import nn

from infmoe.errors import positive_int
from infmoe.layers.base import FFNLayer, gelu, init_normal_


class DenseMLP(FFNLayer):
    """x (..., d_model) → (..., d_model) through one hidden layer of width d_hidden."""

    IN_ROWS = 1  # rows of c_fc per hidden unit (a gated unit reads two)

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__(positive_int("d_model", d_model), positive_int("d_hidden", d_hidden))
        self.c_fc = nn.Linear(d_model, self.IN_ROWS * d_hidden)
        self.c_proj = nn.Linear(d_hidden, d_model)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        init_normal_(self.c_fc.weight, std)
        init_normal_(self.c_proj.weight, std if out_std is None else out_std)
        nn.init.zeros_(self.c_fc.bias)
        nn.init.zeros_(self.c_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu(self.c_fc(x)))

    def active_parameters(self, n_samples: int = 1) -> float:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, n_samples: int = 1, union: float | None = None,
                        executed: bool = False) -> float:
        return 2 * 2 * self.d_model * self.d_hidden
