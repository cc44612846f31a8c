"""Metrics: JSONL (one object per log line) and TensorBoard, plus routing summaries."""

from __future__ import annotations

import json
import math
import sys
import threading
from pathlib import Path

import torch

from infmoe.errors import ConfigError, InfmoeError
from infmoe.io import write_errors, write_failure, write_text

METRICS_FILE = "metrics.jsonl"


class MetricsError(InfmoeError):
    """A metrics.jsonl that is not ours or was damaged in its middle."""


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl, in file order; [] when the file is missing or empty.

    A process killed (or a disk filled) mid-append leaves the last line cut short: that
    line is dropped with a note on stderr, as any reader of an append-only log must. A bad
    line anywhere else, or a row without an integer ``step``, is damage: one `MetricsError`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as err:
        raise MetricsError(f"cannot read {path}: {err.strerror}") from None
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                print(f"infmoe: note: dropped the partial last line of {path} (a crash or a full disk cut it)",
                      file=sys.stderr)
                break
            raise MetricsError(f"{path} line {number} is not JSON: the log is damaged; "
                               "delete that line or the file") from None
        if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            raise MetricsError(f"{path} line {number} has no integer 'step': not an infmoe metrics log; "
                               "give the --out_dir of an infmoe train run")
        rows.append(row)
    return rows


ROUTING_SERIES = ("sigma_mean", "sigma_over_mu", "sample_disagreement", "kl", "union_fraction", "usage_entropy",
                  "ever_used_fraction", "load_balance", "component_entropy")
# curve series name -> metrics.jsonl key, logged with each training loss
_CURVE_SERIES = {"tokens_per_s": "train/tokens_per_s"} | {name: f"routing/{name}" for name in ROUTING_SERIES}


def read_curve(path: Path) -> dict[str, list[float]]:
    """Train and validation loss over steps, training tokens/s, and the routing statistics
    logged with the training loss, from metrics.jsonl. A resumed run logs the steps after its
    checkpoint twice; the later row of each step wins, as it is the one the run continued from."""
    rows = read_metrics(path)
    train = {row["step"]: row for row in rows if "train/loss" in row}
    val = {row["step"]: row for row in rows if "val/loss" in row}
    curve: dict[str, list[float]] = {"step": sorted(train), "train_loss": [], "val_step": sorted(val)}
    curve["val_loss"] = [val[step]["val/loss"] for step in curve["val_step"]]
    for step in curve["step"]:
        row = train[step]
        curve["train_loss"].append(row["train/loss"])
        for name, source in _CURVE_SERIES.items():
            if source in row:
                curve.setdefault(name, []).append(row[source])
    return curve


def sigma_curve(run_dir: str | Path) -> dict[str, list[float]]:
    """σ over training from `run_dir`'s metrics.jsonl: steps, ``sigma_mean`` (the mean over
    layers that training logs) and ``sigma_over_mu`` where logged. {} when no logged step
    has σ (a run that has logged nothing yet, or one without ∞-MoE layers): a valid state,
    plotted as no curve. A `ConfigError` when the folder holds no metrics.jsonl, and
    `read_metrics`'s one-line `MetricsError` when the log is damaged or not ours."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"--run {run_dir} holds no {METRICS_FILE}: give the --out_dir folder of an infmoe train run")
    curve = read_curve(path)
    steps = curve["step"]
    if not steps or len(curve.get("sigma_mean", [])) != len(steps):
        return {}
    keep = [name for name in ("sigma_mean", "sigma_over_mu") if len(curve.get(name, [])) == len(steps)]
    return {"step": steps, **{name: curve[name] for name in keep}}


class MetricsLog:
    """Appends {"step": s, ...} lines to metrics.jsonl and mirrors scalars to TensorBoard.

    On resume the lines after the resumed step are dropped, so the file reads as one run,
    and TensorBoard purges its events after that step the same way. A write that fails (a
    full disk) raises one `OutputError` line; the checkpoint is unaffected.
    """

    def __init__(self, out_dir: Path, *, resume_step: int | None, tensorboard: bool) -> None:
        self.path = out_dir / METRICS_FILE
        if resume_step is None:
            write_text(self.path, "")
        elif self.path.exists():
            kept = [row for row in read_metrics(self.path) if row["step"] <= resume_step]
            write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self.writer = None
        self._excepthook = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: TensorBoard is slow to import

            # The step `resume_step` itself was logged before its checkpoint was saved, so
            # keep it: purge from the first step the resumed run logs again.
            purge = None if resume_step is None else resume_step + 1
            self._excepthook = threading.excepthook
            threading.excepthook = _quiet_tensorboard_writer(self._excepthook)
            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, values: dict[str, float]) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
            if self.writer is not None:
                for key, value in values.items():
                    self.writer.add_scalar(key, value, step)
        except write_errors() as err:
            raise write_failure(self.path.parent, err) from None

    def close(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        except write_errors() as err:
            raise write_failure(self.path.parent / "tensorboard", err) from None
        finally:
            if self._excepthook is not None:
                threading.excepthook = self._excepthook


def _quiet_tensorboard_writer(previous):
    """TensorBoard writes events from a thread; a failed write there prints a traceback and
    is raised again on the next `add_scalar` in the main thread, where we turn it into one
    line. So the thread's own report is dropped; any other thread's reaches `previous`."""

    def hook(args) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError)):
            previous(args)

    return hook


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
        """What a checkpoint keeps: whole-run usage, and the values of the logging interval
        still open, so a resumed run logs exactly what the uninterrupted run would."""
        out = {f"ever_used.{layer}": used.to(torch.uint8).cpu() for layer, used in self.ever_used.items()}
        out |= {f"usage.{layer}": usage.cpu() for layer, usage in self.usage.items()}
        out |= {f"interval.{key}": torch.stack(values).cpu() for key, values in self.scalars.items()}
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}

        self.ever_used = {layer: used.bool() for layer, used in part("ever_used.").items()}
        self.usage = part("usage.")
        self.scalars = {key: list(values.unbind()) for key, values in part("interval.").items()}
