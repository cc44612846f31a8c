"""∞-MoE sampling noise pinned to each sequence, so a score does not depend on its batch.

By default an ∞-MoE layer draws ε for a whole (B, T) batch from torch's global RNG: the
noise a sequence gets then depends on which other sequences share its batch and in what
order. Zero-shot scores must not change with the batch size, so `PinnedNoise` feeds each
layer (through its documented ``noise`` argument) draws that depend only on (seed, the
sequence's id, the layer, the position).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from infmoe.layers import InfiniteMoE
from infmoe.randomness import derive_seed


class PinnedNoise:
    """Context manager: while active, every sampling ∞-MoE layer of `model` draws ε for row b
    of a (B, T) batch, T <= n_ctx, from a generator seeded by (seed, ids[b], layer). Set
    `ids` (one integer per row) before each forward. Layers in mode "mean" draw nothing and are left alone.

    >>> with PinnedNoise(model, seed=1234, n_ctx=model.config.n_ctx) as pinned:
    ...     pinned.ids = [17, 3]
    ...     logits = model(idx).logits   # idx (2, T)
    """

    def __init__(self, model: nn.Module, seed: int, n_ctx: int) -> None:
        self.model, self.seed, self.n_ctx = model, seed, n_ctx
        self.ids: Sequence[int] = ()
        self._handles: list = []

    def __enter__(self) -> PinnedNoise:
        layers = [m for m in self.model.modules() if isinstance(m, InfiniteMoE)]
        for number, layer in enumerate(layers):
            hook = self._hook(number)
            self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, number: int):
        def give_noise(layer: InfiniteMoE, args: tuple, kwargs: dict):
            x = args[0]  # (B, T, d_model), as a GPT block calls its FFN
            if layer.mode != "sample" or kwargs.get("noise") is not None or len(args) > 1:
                return None
            if x.dim() != 3 or x.shape[0] != len(self.ids):
                raise RuntimeError(
                    f"PinnedNoise.ids has {len(self.ids)} ids for an input of shape {tuple(x.shape)}"
                )
            rows = [self._draw(i, number, layer)[: x.shape[1]] for i in self.ids]  # each (T, K, d_z)
            noise = torch.stack(rows).permute(2, 0, 1, 3)  # (K, B, T, d_z), as the layer wants it
            kwargs["noise"] = noise.to(device=x.device, dtype=x.dtype)
            return args, kwargs

        return give_noise

    def _draw(self, row_id: int, number: int, layer: InfiniteMoE) -> torch.Tensor:
        """ε (n_ctx, K, d_z) for one sequence, position-major. Always n_ctx positions, sliced
        by the caller: torch's CPU randn fills blocks of 16 values at a time, so a shorter
        draw is not a prefix of a longer one."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, row_id, number))
        return torch.randn((self.n_ctx, layer.n_samples, layer.d_z), generator=generator)
