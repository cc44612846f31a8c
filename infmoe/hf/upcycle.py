"""Upcycling: a trained dense GPT as the starting point of an ∞-MoE GPT.

Each dense FFN (width H_d) becomes one ∞-MoE layer with the paper's H = 2 · H_d: hidden
units 0 .. H_d-1 take the dense FFN's weights (w_in rows = c_fc.weight, b_in = c_fc.bias,
w_out rows = c_proj.weight transposed, b_out = c_proj.bias), units H_d .. 2H_d-1 are freshly
initialised with the usual GPT-2 init (w_in ~ N(0, init_std), w_out ~ N(0, init_std /
sqrt(2 · n_layer)), b_in = 0). The router and the score map are fresh too; attention,
embeddings and layer norms are copied.

Why fresh rather than a second copy of the dense units: a copy would make every new unit
a duplicate of an old one, so the "experts" the router chooses among would start out
redundant and only noise would tell them apart; fresh units start as distinct features
whose small output weights barely disturb the copied half.

What the starting point computes: not the dense model. Each token keeps the top N (50% by
default) of the 2·H_d units by the fresh score map, gated by g(s) (sigmoid by default,
so about 0.5-0.9), so it sees a gated random subset of the dense units plus small fresh
contributions; continued training recovers the dense quality. With active_fraction=1,
gate="constant" and the fresh half's w_out zeroed it is exactly the dense model (tested).
"""

from __future__ import annotations

from typing import Any

import torch

from infmoe.errors import ConfigError
from infmoe.layers import DenseMLP, InfiniteMoE
from infmoe.models import GPT


def upcycle_to_infmoe(dense: GPT, *, d_z: int, **ffn_options: Any) -> GPT:
    """An ∞-MoE `GPT` (H = 2 × the dense FFN width) initialised from the dense `GPT` as the
    module docstring describes. `ffn_options` are further `InfiniteMoE` options
    (active_fraction, block_size, gate, n_samples, ...). Fresh weights come from torch's
    global RNG: seed it for a repeatable result. `dense` is left unchanged."""
    if dense.config.ffn != "dense":
        raise ConfigError(f"upcycling needs a dense model, got ffn={dense.config.ffn!r}: give a dense GPT")
    if ffn_options.get("glu"):  # a GELU MLP's rows are no GLU's gate and up rows
        raise ConfigError("glu=True is invalid for upcycling: it copies a GELU MLP into the MLP units; "
                          "leave glu unset")
    width = dense.config.ffn_hidden
    config = dense.config.replace(ffn="infmoe", d_hidden=2 * width, ffn_options={"d_z": d_z, **ffn_options})
    model = GPT(config).to(device=dense.wte.weight.device, dtype=dense.wte.weight.dtype)
    # Attention, embeddings, norms, and any block that keeps a dense MLP (ffn_every > 1).
    target = model.state_dict()
    shared = {k: v for k, v in dense.state_dict().items() if k in target and target[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    with torch.no_grad():
        for old, new in zip(dense.ffn_layers(), model.ffn_layers()):
            if isinstance(new, InfiniteMoE):
                assert isinstance(old, DenseMLP)
                new.w_in[:width].copy_(old.c_fc.weight)  # both (H, d)
                new.b_in[:width].copy_(old.c_fc.bias)
                new.w_out[:width].copy_(old.c_proj.weight.t())  # (d, H) → (H, d)
                new.b_out.copy_(old.c_proj.bias)
    return model
