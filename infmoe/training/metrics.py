"""Metrics: JSONL (one object per log line) and TensorBoard, plus routing summaries."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


class MetricsLog:
    """Appends {"step": s, ...} lines to metrics.jsonl and mirrors scalars to TensorBoard.

    On resume the lines after the resumed step are dropped, so the file reads as one run.
    """

    def __init__(self, out_dir: Path, *, resume_step: int | None, tensorboard: bool) -> None:
        self.path = out_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: TensorBoard is slow to import

            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class RoutingMonitor:
    """Summarises `GPT.routing_stats()` over the steps between two log lines.

    Scalars (σ mean, KL, union fraction, load balance, ...) are averaged over layers and
    steps. Per-layer usage vectors (∞-MoE ``block_usage``, MoE ``expert_load``) give the
    usage entropy of each layer (normalised: 1 = uniform) and, kept over the whole run, the
    fraction of blocks or experts that any token has ever used.
    """

    VECTORS = ("block_usage", "expert_load")

    def __init__(self) -> None:
        self.scalars: dict[str, list[torch.Tensor]] = {}
        self.usage: dict[str, torch.Tensor] = {}
        self.ever_used: dict[str, torch.Tensor] = {}

    def update(self, stats: dict[str, torch.Tensor]) -> None:
        """Called every step; stays on the device (no host sync until `summary`)."""
        for key, value in stats.items():
            layer, name = key.split(".", 1)
            value = value.detach().float()
            if name in self.VECTORS:
                self.usage[layer] = self.usage.get(layer, torch.zeros_like(value)) + value
                used = self.ever_used.get(layer, torch.zeros_like(value, dtype=torch.bool)).to(value.device)
                self.ever_used[layer] = used | (value > 0)
            elif name != "used_fraction":
                self.scalars.setdefault(f"routing/{name}", []).append(value)

    def summary(self) -> dict[str, float]:
        """Averages since the last summary (then reset), plus whole-run usage."""
        out = {key: float(torch.stack(v).mean()) for key, v in self.scalars.items()}
        entropies = []
        for usage in self.usage.values():
            p = usage / usage.sum().clamp_min(1e-12)
            entropies.append(float(-(p * p.clamp_min(1e-12).log()).sum() / math.log(len(p))) if len(p) > 1 else 1.0)
        if entropies:
            out["routing/usage_entropy"] = sum(entropies) / len(entropies)
            out["routing/min_layer_usage_entropy"] = min(entropies)
        if self.ever_used:
            out["routing/ever_used_fraction"] = float(torch.cat(list(self.ever_used.values())).float().mean())
        self.scalars, self.usage = {}, {}
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {f"ever_used.{layer}": used.to(torch.uint8).cpu() for layer, used in self.ever_used.items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.ever_used = {k.split(".", 1)[1]: v.bool() for k, v in tensors.items() if k.startswith("ever_used.")}


