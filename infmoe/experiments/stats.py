"""Statistics over a run's seeds and logs, for the report: mean ± std, Welch's t, paired
z, loss spikes and training time."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1 in the denominator; 0 for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def spikes(losses: list[float], window: int = 5, threshold: float = 0.1) -> int:
    """Loss spikes: logged losses more than `threshold` nats above the median of the
    `window` before them (a smooth curve has none once past the first steps)."""
    count = 0
    for i in range(window, len(losses)):
        if losses[i] > float(np.median(losses[i - window : i])) + threshold:
            count += 1
    return count


def training_minutes(record: dict[str, Any]) -> float:
    """Minutes spent in training steps, from the logged tokens/s of each logging interval
    (validation and checkpoint time left out; a resumed run counted once)."""
    curve = record["curve"]
    tokens_per_step = record["tokens_seen"] / record["steps"]
    previous, seconds = 0, 0.0
    for step, rate in zip(curve["step"], curve.get("tokens_per_s", [])):
        seconds += (step - previous) * tokens_per_step / rate
        previous = step
    return seconds / 60


def welch_t(ours: list[float], theirs: list[float]) -> float | None:
    """Welch's t of mean(theirs) − mean(ours), the samples' variances not assumed equal;
    None with fewer than two values on a side or no spread at all."""
    (m1, s1), (m2, s2) = mean_std(ours), mean_std(theirs)
    spread = math.sqrt(s1**2 / len(ours) + s2**2 / len(theirs))
    return (m2 - m1) / spread if len(ours) > 1 and len(theirs) > 1 and spread > 0 else None


def pooled_estimate(values: list[float], stderrs: list[float]) -> tuple[float, float]:
    """The mean of independent estimates (one per seed) and its standard error,
    sqrt(Σ se²) / n."""
    return sum(values) / len(values), math.sqrt(sum(se**2 for se in stderrs)) / len(values)


def difference_z(delta: float, se1: float, se2: float) -> float:
    """z of a difference `delta` of two independent estimates with standard errors se1, se2."""
    return delta / math.sqrt(se1**2 + se2**2 or 1e-12)


def paired_z(differences: list[int]) -> tuple[float, float]:
    """The mean of per-item differences (−1, 0, 1 in correctness) and its z: the same items
    scored twice, so their variance is that of the differences; z = 0 where they do not vary."""
    n = len(differences)
    mean = sum(differences) / n
    var = sum((d - mean) ** 2 for d in differences) / (n - 1) if n > 1 else 0.0
    return mean, mean / math.sqrt(var / n) if var > 0 else 0.0
