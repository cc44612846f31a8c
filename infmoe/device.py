"""Where and in what precision tensors live: the device a name means, the autocast context
a precision setting means, and waiting for the device before a clock is read. Shared by
training, evaluation, generation and the bench."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from infmoe.errors import ConfigError, choose

PRECISIONS = ("auto", "fp32", "bf16")


def pick_device(name: str) -> torch.device:
    """"auto" → CUDA when available, else the CPU; any other torch device name as given,
    with a one-line error when it names a CUDA device this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is invalid: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} is invalid: no CUDA device is available here; use --device cpu")
    return device


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether `precision` ("auto": bf16 on CUDA, fp32 elsewhere) means bf16 autocast on `device`."""
    choose("precision", precision, PRECISIONS)
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context that `precision` means on `device` (a no-op for fp32)."""
    if not uses_bf16(precision, device):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    """Wait until `device` has finished the work queued on it (CUDA runs asynchronously), so
    that a wall-clock reading after it counts that work; nothing to wait for elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
