"""Loss and perplexity of a model on validation batches, and the sweep over ∞-MoE's K at
inference (validation batches: `infmoe.evaluation.validation`).

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
from tqdm.auto import tqdm

from infmoe.data import PreparedData, Tokenizer
from infmoe.device import synchronize
from infmoe.errors import choose
from infmoe.evaluation.validation import Batches, validation_batches
from infmoe.layers import InfiniteMoE, sampling
from infmoe.models import GPT
from infmoe.randomness import seeded


def perplexity(loss: float) -> float:
    """exp(loss) of a loss in nats/token; inf where that overflows a float."""
    return math.exp(loss) if loss < 709 else float("inf")


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
    """One inference setting: K samples in "sample" mode, z = μ in "mean" mode, or each
    token's own K up to n_samples in "adaptive" mode."""

    label: str
    mode: str
    n_samples: int
    loss: float
    perplexity: float
    accuracy: float  # share of tokens whose most likely prediction is the actual next token
    ms_per_token: float
    # share of blocks a token computed (the union of its K masks), over ∞-MoE layers; None
    # for models without them
    union_fraction: float | None = None
    # mode "adaptive": the mean K a token averaged, over tokens and ∞-MoE layers
    mean_samples: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def sweep_samples(model: GPT, batches: Batches, device: torch.device, *, samples: Sequence[int] = (1, 2, 4, 8),
                  include_mean: bool = True, include_sample: bool = True, adaptive: int | None = None,
                  seed: int = 1234,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  progress: bool = False) -> list[SweepRow]:
    """Loss, perplexity, next-token accuracy, wall-clock ms/token and the union fraction for
    each K (and mean mode, and with `adaptive` = K_max mode "adaptive" up to that K).

    Settings are interleaved batch by batch, so drift in the machine's speed hits them
    all alike; ms/token is the median over batches of forward time / tokens. Each
    (setting, batch) pair draws its noise from its own fixed seed.
    """
    settings = [("sample", k) for k in samples] if include_sample else []
    settings += [("mean", 1)] if include_mean else []
    settings += [("adaptive", adaptive)] if adaptive is not None else []
    model.eval()
    totals = [0.0] * len(settings)
    hits = [0] * len(settings)
    unions = [0.0] * len(settings)  # token-weighted sums of the layers' mean union fraction
    drawn = [0.0] * len(settings)  # the same for the mean K of mode "adaptive"
    routed = [f for f in model.ffn_layers() if isinstance(f, InfiniteMoE)]
    times: list[list[float]] = [[] for _ in settings]
    count = 0
    for b, (x, y) in enumerate(tqdm(batches, desc="evaluate", unit="batch", disable=not progress, leave=False)):
        x, y = x.to(device), y.to(device)
        for i, (mode, k) in enumerate(settings):
            with seeded(seed + 7919 * i + b, device), sampling(model, n_samples=k, mode=mode), autocast():
                synchronize(device)
                start = time.perf_counter()
                logits = model(x).logits
                synchronize(device)
                times[i].append((time.perf_counter() - start) / y.numel())
            totals[i] += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            hits[i] += int((logits.argmax(dim=-1) == y).sum())
            if routed:
                unions[i] += y.numel() * sum(float(f.aux.stats["union_fraction"]) for f in routed) / len(routed)
                if mode == "adaptive":
                    drawn[i] += y.numel() * sum(float(f.aux.stats["samples_used"]) for f in routed) / len(routed)
        count += y.numel()
    rows = []
    for i, (mode, k) in enumerate(settings):
        loss = totals[i] / count
        label = {"mean": "mean", "adaptive": f"auto (K<={k})"}.get(mode, f"K={k}")
        rows.append(SweepRow(label, mode, k, loss, perplexity(loss), hits[i] / count,
                             1e3 * sorted(times[i])[len(times[i]) // 2],
                             unions[i] / count if routed else None,
                             drawn[i] / count if routed and mode == "adaptive" else None))
    return rows


@dataclass
class Evaluation:
    """What `evaluate_model` measured: one row per inference setting, on `batches` of the
    validation split of `data`."""

    rows: list[SweepRow]
    data: PreparedData
    batches: Batches

    @property
    def tokens(self) -> int:
        return sum(y.numel() for _, y in self.batches)


MODES = ("sample", "mean", "both")


def evaluate_model(model: GPT, tokenizer: Tokenizer, source: str, *, samples: Sequence[int] = (1, 2, 4, 8),
                   modes: str = "both", adaptive: int | None = None, max_tokens: int = 131072, batch_size: int = 8, seq_len: int | None = None,
                   cache_dir: str | None = None, encoding_errors: str = "strict", seed: int = 1234,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   progress: bool = False) -> Evaluation:
    """The K sweep (`sweep_samples`) of `model` on the first `max_tokens` validation tokens of
    corpus `source`, tokenized with the model's own `tokenizer`, on the model's device.
    `modes`: "sample" (each K), "mean" (z = μ), or "both"; `adaptive`: K_max of an added
    mode "adaptive" row; models without ∞-MoE layers get one row. What `infmoe eval` prints and what the experiment runner records."""
    choose("mode", modes, MODES)
    data, batches = validation_batches(model, tokenizer, source, max_tokens=max_tokens, batch_size=batch_size,
                                       seq_len=seq_len, cache_dir=cache_dir, encoding_errors=encoding_errors)
    routed = any(isinstance(f, InfiniteMoE) for f in model.ffn_layers())
    device = next(model.parameters()).device
    rows = sweep_samples(model, batches, device, samples=samples if routed else [1],
                         include_mean=routed and modes in ("mean", "both"),
                         include_sample=modes in ("sample", "both") or not routed,
                         adaptive=adaptive if routed else None, seed=seed, autocast=autocast, progress=progress)
    return Evaluation(rows, data, batches)
