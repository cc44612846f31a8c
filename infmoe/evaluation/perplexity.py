"""Validation batches, loss and perplexity, and the sweep over ∞-MoE's K at inference.

Every evaluation runs under a forked, fixed-seed RNG: a re-run gives the same numbers and
evaluating in the middle of training does not disturb the training run's random stream.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from infmoe.data import PreparedData, Tokenizer, prepare
from infmoe.data.tokens import damaged_data_fix
from infmoe.errors import DataError, choose, positive_int
from infmoe.layers import InfiniteMoE, sampling
from infmoe.models import GPT
from infmoe.randomness import seeded

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first max_tokens of `tokens` (at least one window) as consecutive windows of
    seq_len, in batches of batch_size in a fixed order: inputs, targets each (b, seq_len) int64."""
    positive_int("tokens", max_tokens)
    n = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    if n < 1:
        raise DataError(f"the validation split has {len(tokens)} tokens, fewer than one window of seq_len={seq_len}: "
                        "use more validation text or a smaller --seq_len")
    rows = torch.from_numpy(np.asarray(tokens[: n * seq_len + 1]).astype(np.int64))
    x = rows[:-1].view(n, seq_len)
    y = rows[1:].view(n, seq_len)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


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


def mean_k_cell(mode: str, n_samples: int, mean_samples: str | None) -> str:
    """The "mean K" cell of a sweep row: the measured mean (mode "adaptive", given formatted),
    "-" in mode "mean", else the fixed K."""
    if mean_samples is not None:
        return mean_samples
    return "-" if mode == "mean" else str(n_samples)


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
                _sync(device)
                start = time.perf_counter()
                logits = model(x).logits
                _sync(device)
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


def validation_batches(model: GPT, tokenizer: Tokenizer, source: str, *, max_tokens: int, batch_size: int = 8,
                       seq_len: int | None = None, cache_dir: str | None = None, encoding_errors: str = "strict"
                       ) -> tuple[PreparedData, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Corpus `source` prepared with the model's own `tokenizer`, and the first `max_tokens`
    of its validation split as `eval_batches` of seq_len (default: the model's n_ctx)."""
    data = prepare(source, cache_dir=cache_dir, tokenizer=tokenizer, encoding_errors=encoding_errors, progress=False)
    batches = eval_batches(data.valid, seq_len or model.config.n_ctx, batch_size, max_tokens)
    # Up front, not as an IndexError in the embedding: a cache changed behind prepare's back
    # (its file stamps restored) can hold ids the model has no row for.
    top = max((max(int(x.max()), int(y.max())) for x, y in batches), default=-1)
    if top >= model.config.vocab_size:
        raise DataError(f"the prepared validation tokens hold id {top}, beyond the model's vocabulary of "
                        f"{model.config.vocab_size}: they are damaged; {damaged_data_fix(data.valid)}")
    return data, batches


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


def plot_sweep(rows: Sequence[SweepRow], path, title: str = "") -> None:
    """Validation loss against ms/token, one labelled point per setting, saved as PNG to
    `path` (a temporary of `infmoe.io.atomic_path`: this writes in place)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    sampled = [r for r in rows if r.mode == "sample"]
    ax.plot([r.ms_per_token for r in sampled], [r.loss for r in sampled], "-o", color="tab:blue", label="K samples")
    for r in rows:
        if r.mode == "mean":
            ax.plot(r.ms_per_token, r.loss, "s", color="tab:orange", label="mean mode (z = μ)")
        if r.mode == "adaptive":
            ax.plot(r.ms_per_token, r.loss, "D", color="tab:green",
                    label=f"adaptive K (mean {r.mean_samples:.2f})")
        ax.annotate(r.label, (r.ms_per_token, r.loss), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("ms per token (forward, this machine)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.ticklabel_format(axis="y", useOffset=False)  # losses as they are, not as offsets from one
    ax.set_title(title or "∞-MoE: samples K at inference")
    ax.margins(0.15)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format="png")
    finally:
        plt.close(fig)
