"""One training step, written once: the loop, `infmoe bench` and benchmarks/gpu_check.py all
take it from here, so what they time is what training runs.

A step is micro-batches of forward + backward (`micro_step`), then the gradient norm
clipped (`clip_gradients`), then the optimizer. The loop checks the norm between the last
two, so `train_step` is the two pieces with nothing between them, for the benchmarks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from infmoe.layers import draw_train_samples


def micro_step(model: nn.Module, forward: Callable, x: torch.Tensor, y: torch.Tensor, *, micro_batches: int = 1,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
    """Forward (through `forward`: the model itself, or its DDP/FSDP or compiled wrapper)
    and backward of one micro-batch x, y (B, T) of `micro_batches`, whose loss is divided
    by their number for the backward. ∞-MoE's training K (``train_samples``) is drawn on
    the host first, so a compiled forward never draws it. Returns the model's output."""
    draw_train_samples(model)
    with autocast():
        out = forward(x, y)
        (out.loss / micro_batches).backward()
    return out


def clip_gradients(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip the gradients' global norm to `max_norm` (None or 0: no clipping) and return the
    norm before clipping as a plain tensor on the device (FSDP's is gathered whole)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train_step(model: nn.Module, forward: Callable, optimizer: torch.optim.Optimizer,
               batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, grad_clip: float | None = 1.0,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """One optimizer step over the micro-batches `batches`; returns the mean loss, still on
    the device (reading it would wait for the step)."""
    batches = list(batches)
    loss = torch.zeros((), device=batches[0][0].device)
    for x, y in batches:
        loss += micro_step(model, forward, x, y, micro_batches=len(batches), autocast=autocast).loss.detach()
    clip_gradients(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss / len(batches)
