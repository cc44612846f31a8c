"""Validation loss and perplexity, and the sweep over ∞-MoE's K at inference.

Every evaluation runs under a forked, fixed-seed RNG: a re-run gives the same numbers and
evaluating in the middle of training does not disturb the training run's random stream.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from infmoe.io import atomic_path
from infmoe.layers import sampling
from infmoe.models import GPT
from infmoe.randomness import seeded

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Batches, device: torch.device, *, seed: int = 1234,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  rank: int = 0, world_size: int = 1) -> float:
    """Mean next-token cross-entropy (nats/token) over every target in `batches`
    (inputs, targets each (B, T) int64), with the model's current K and mode.

    With world_size > 1 (an initialised process group), rank r evaluates batches
    r, r + world_size, ... and the sums are all-reduced: every rank returns the same value.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss total, token count
    mine = batches[rank::world_size]
    rounds = math.ceil(len(batches) / world_size)  # equal on every rank: FSDP forwards are collectives
    with seeded(seed + rank, device):
        for i in range(rounds):
            x, y = mine[i] if i < len(mine) else batches[0]
            with autocast():
                logits = model(x.to(device)).logits
            if i < len(mine):
                sums[0] += F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum")
                sums[1] += y.numel()
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    return (sums[0] / sums[1]).item()


@dataclass
class SweepRow:
    """One inference setting: K samples in "sample" mode, or z = μ in "mean" mode."""

    label: str
    mode: str
    n_samples: int
    loss: float
    perplexity: float
    accuracy: float  # share of tokens whose most likely prediction is the actual next token
    ms_per_token: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def sweep_samples(model: GPT, batches: Batches, device: torch.device, *, samples: Sequence[int] = (1, 2, 4, 8),
                  include_mean: bool = True, include_sample: bool = True, seed: int = 1234,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> list[SweepRow]:
    """Loss, perplexity, next-token accuracy and wall-clock ms/token for each K (and mean mode).

    Settings are interleaved batch by batch, so drift in the machine's speed hits them
    all alike; ms/token is the median over batches of forward time / tokens. Each
    (setting, batch) pair draws its noise from its own fixed seed.
    """
    settings = [("sample", k) for k in samples] if include_sample else []
    settings += [("mean", 1)] if include_mean else []
    model.eval()
    totals = [0.0] * len(settings)
    hits = [0] * len(settings)
    times: list[list[float]] = [[] for _ in settings]
    count = 0
    for b, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        for i, (mode, k) in enumerate(settings):
            with seeded(seed + 7919 * i + b, device), sampling(model, n_samples=k, mode=mode), autocast():
                _sync(device)
                start = time.perf_counter()
                logits = model(x).logits
                _sync(device)
                times[i].append((time.perf_counter() - start) / y.numel())
            totals[i] += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            hits[i] += int((logits.argmax(dim=-1) == y).sum())
        count += y.numel()
    rows = []
    for i, (mode, k) in enumerate(settings):
        loss = totals[i] / count
        label = "mean" if mode == "mean" else f"K={k}"
        rows.append(SweepRow(label, mode, k, loss, math.exp(loss), hits[i] / count,
                             1e3 * sorted(times[i])[len(times[i]) // 2]))
    return rows


def plot_sweep(rows: Sequence[SweepRow], path, title: str = "") -> None:
    """Validation loss against ms/token, one labelled point per setting, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    sampled = [r for r in rows if r.mode == "sample"]
    ax.plot([r.ms_per_token for r in sampled], [r.loss for r in sampled], "-o", color="tab:blue", label="K samples")
    for r in rows:
        if r.mode == "mean":
            ax.plot(r.ms_per_token, r.loss, "s", color="tab:orange", label="mean mode (z = μ)")
        ax.annotate(r.label, (r.ms_per_token, r.loss), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("ms per token (forward, this machine)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title or "∞-MoE: samples K at inference")
    ax.margins(0.15)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
