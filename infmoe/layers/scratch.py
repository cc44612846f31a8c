"""Reusable scratch tensors for temporaries on the CPU.

glibc serves every allocation above its mmap threshold (32 MiB at most) with fresh pages
from the kernel and returns them on free, so a large temporary (a (2048, 6144) float is
48 MiB) pays a page fault per page each time it is made, which can cost more than the
arithmetic that fills it (an elementwise op such as `torch.ge`). The fast
paths therefore write temporaries that do not outlive the call (never tensors saved for
backward or returned) into buffers kept here, one per name and thread, grown to the
largest size asked for. On CUDA the caching allocator already reuses memory, and under
`torch.compile` the buffers (per-thread Python state) cannot be traced while the compiler
plans memory itself: plain `torch.empty` in both cases.
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of `shape` that stays valid until the next `scratch(name, ...)`
    call of this thread (a fresh tensor on other devices and while `torch.compile` traces)."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    numel = 1
    for n in shape:
        numel *= n
    held = buffers.get((name, dtype))
    if held is None or held.numel() < numel:
        held = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return held[:numel].view(shape)


def release() -> None:
    """Free this thread's scratch buffers."""
    _local.buffers = {}
