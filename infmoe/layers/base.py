"""The one interface every feed-forward variant implements.

A variant is an `nn.Module` built as ``cls(d_model, d_hidden, **options)`` whose keyword-only
constructor arguments are its options (the model config's ``ffn_options`` are checked
against that signature). Its ``forward(x)`` maps (..., d_model) to (..., d_model). After
each forward, ``layer.aux`` describes that call: the auxiliary loss to add to the training
objective (already weighted) and detached routing statistics. The model reads ``aux`` from
each block after its forward; nothing is global.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch import nn


class FFNAux:
    """What one forward call of an FFN layer reports besides its output.

    loss:  scalar tensor to add to the objective (weights already applied), or None.
    stats: detached tensors for logging, e.g. ``sigma_mean`` (scalar) or
           ``block_usage`` (n_blocks,), the fraction of tokens that used each block.
           Given as a dict, or as a function that makes one, called on first access: while
           decoding nobody reads them, and a dozen small reductions per layer and token
           would cost more than some of the FFN.
    path:  the execution path that ran (`infmoe.layers.dispatch.PATHS`), for routed layers
           with more than one; None otherwise.
    """

    def __init__(self, loss: torch.Tensor | None = None,
                 stats: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]] | None = None,
                 path: str | None = None) -> None:
        self.loss = loss
        self._stats = {} if stats is None else stats
        self.path = path

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        if callable(self._stats):
            self._stats = self._stats()
        return self._stats


class FFNLayer(nn.Module):
    """Base class: holds the sizes, the last call's `aux`, and the accounting hooks."""

    # Options renamed since configs were first written ({old: new}): the old name is still
    # accepted, with a one-line warning (`infmoe.deprecation`).
    RENAMED_OPTIONS: ClassVar[Mapping[str, str]] = {}

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.aux = FFNAux()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """GPT-2 initialisation: weights ~ N(0, std), the output projection ~ N(0, out_std)
        (the model passes std / sqrt(2 · n_layer) there), biases zero."""
        raise NotImplementedError

    def active_parameters(self, n_samples: int = 1) -> float:
        """Parameters one token touches. With K > 1 routing samples this is the expected
        union over samples, bounded above where it cannot be known without data."""
        raise NotImplementedError

    def flops_per_token(self, n_samples: int = 1, union: float | None = None,
                        executed: bool = False) -> float:
        """Forward multiply-adds × 2 of the matmuls one token goes through, routing included.

        The one FLOP formula of each variant; parameter counts, the bench and the GPU
        estimate all read it. n_samples: K routing samples. union: the measured fraction of
        the ∞-MoE blocks a token computes over its K samples (default: the bound
        `InfiniteMoE.union_fraction_bound`); ignored by variants without a union.
        executed: count what the execution path this layer picks for K actually runs (the
        masked ∞-MoE path computes all of H) instead of what the method needs.
        """
        raise NotImplementedError


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (tanh approximation), shared by every variant so they stay comparable."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 for softmax and log-sum-exp; keep fp32 and fp64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def routing_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """linear(x) in at least fp32 with autocast off. x (..., in) → (..., out).

    Routing decides which blocks or experts run; in bf16 near-equal scores tie or swap
    order, so the choices (and the output) would depend on the precision setting.
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, linear.weight.dtype), torch.float32)
    bias = None if linear.bias is None else linear.bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.linear(x.to(dtype), linear.weight.to(dtype), bias)


def init_normal_(tensor: torch.Tensor, std: float) -> None:
    with torch.no_grad():
        tensor.normal_(0.0, std)


def count_kept(fraction: float, n: int) -> int:
    """ceil(fraction · n), immune to float noise such as 0.3 · 10 = 3.0000000000000004."""
    return max(1, math.ceil(round(fraction * n, 9)))
