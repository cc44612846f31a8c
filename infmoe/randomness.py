"""Seeding that makes runs repeatable without threading generators through every call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers such as (seed, step, rank)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with torch's RNG seeded to `seed` (CPU and `device`), then restore
    the caller's RNG state, so the block neither depends on nor disturbs outside draws."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
