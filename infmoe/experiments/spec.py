"""An experiment spec: one corpus, one token budget, a grid of (run × seed).

A spec is YAML::

    data: ../shared/data/wikitext-2      # any `infmoe train --data` source
    out_dir: experiments/runs            # checkpoints and logs (large; not committed)
    results_dir: experiments/results     # one small JSON per finished run (committed)
    seeds: [0, 1, 2]
    train: {max_steps: 1000, batch_size: 16, ...}   # TrainConfig fields shared by every run
    eval:
      tokens: 65536                      # validation tokens for loss and the K sweep
      samples: [1, 2, 4, 8, 16]          # K values swept for ∞-MoE runs (plus mean mode)
      adaptive: 16                       # optional: add adaptive K (each token its own, up to 16)
      zeroshot: {piqa: path/to/dev.jsonl, ...}   # optional; run for runs with zeroshot: true
      zeroshot_samples: [1, 4, 16]       # optional: zero-shot again at each K (∞-MoE runs)
    runs:
      infmoe: {config: tiny-infmoe, zeroshot: true}
      dense-active: {config: tiny-dense}
      ablate-gate-softmax: {config: tiny-infmoe, gate: softmax, seeds: [0, 1]}

``report`` lists the sections of the markdown report (see `infmoe.experiments.report`).
A run's keys are `infmoe train` settings and model overrides; ``seeds`` replaces the
spec's seeds for that run and ``zeroshot: true`` adds the zero-shot tasks. Relative paths
are relative to the folder the command runs in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from infmoe.errors import ConfigError
from infmoe.training.config import resolve

RUN_KEYS = ("seeds", "zeroshot")


@dataclass(frozen=True)
class Job:
    """One training run of the grid and what to evaluate after it."""

    run: str
    seed: int
    settings: dict[str, Any]  # --key value settings for resolve()
    zeroshot: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.run}-seed{self.seed}"


@dataclass
class Spec:
    path: Path
    data: str
    out_dir: Path
    results_dir: Path
    eval_tokens: int
    samples: list[int]
    jobs: list[Job]
    report: list[dict[str, Any]] = field(default_factory=list)
    adaptive: int | None = None  # K_max of the adaptive-K row of the sweep; None: no such row
    zeroshot_samples: list[int] = field(default_factory=list)  # K values zero-shot runs again at

    def result_path(self, job: Job) -> Path:
        return self.results_dir / f"{job.name}.json"


def load_spec(path: str | Path) -> Spec:
    """Read and check a spec: every run's settings are resolved once here, so a typo in
    any run fails before the first run starts."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read experiment spec {path}: {err.strerror}; check the path") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"experiment spec {path} does not parse ({str(err).splitlines()[0]}); fix its YAML") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("runs"), dict) or not raw["runs"]:
        raise ConfigError(f"experiment spec {path} needs a mapping with a non-empty 'runs' mapping")
    unknown = set(raw) - {"data", "out_dir", "results_dir", "seeds", "train", "eval", "runs", "report"}
    if unknown:
        raise ConfigError(f"experiment spec {path}: unknown top-level keys {sorted(unknown)}")
    evaluation = raw.get("eval") or {}
    seeds = raw.get("seeds", [0])
    out_dir = Path(raw.get("out_dir", "experiments/runs"))
    jobs = []
    for run, options in raw["runs"].items():
        options = dict(options or {})
        run_seeds = options.pop("seeds", seeds)
        zeroshot = evaluation.get("zeroshot", {}) if options.pop("zeroshot", False) else {}
        for seed in run_seeds:
            settings = {**(raw.get("train") or {}), **options, "data": raw.get("data", "embedded"),
                        "seed": seed, "out_dir": str(out_dir / f"{run}-seed{seed}")}
            try:
                resolve(settings)
            except ConfigError as err:
                raise ConfigError(f"experiment spec {path}, run {run!r}: {err}") from None
            jobs.append(Job(run, seed, settings, dict(zeroshot)))
    unknown = set(evaluation) - {"tokens", "samples", "adaptive", "zeroshot", "zeroshot_samples"}
    if unknown:
        raise ConfigError(f"experiment spec {path}: unknown eval keys {sorted(unknown)}")
    adaptive = evaluation.get("adaptive")
    if adaptive is not None and (not isinstance(adaptive, int) or isinstance(adaptive, bool) or adaptive < 1):
        raise ConfigError(f"experiment spec {path}: eval.adaptive={adaptive!r} must be the largest K, e.g. 16")
    return Spec(path, raw.get("data", "embedded"), out_dir, Path(raw.get("results_dir", "experiments/results")),
                int(evaluation.get("tokens", 65536)), list(evaluation.get("samples", [1, 2, 4, 8])), jobs,
                list(raw.get("report") or []), adaptive, list(evaluation.get("zeroshot_samples") or []))
