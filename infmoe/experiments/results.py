"""A job's result JSON: written once by `infmoe.experiments.job.run_job`, read by the report
and by the grid, which refreshes the training curve in it from the run's log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from infmoe.errors import ConfigError
from infmoe.experiments.spec import Spec
from infmoe.io import write_text
from infmoe.training.metrics import METRICS_FILE, read_curve

RESULT_KEYS = ("run", "seed", "steps", "tokens_seen", "params", "headline", "sweep", "baselines", "curve")


def write_result(path: Path, record: dict[str, Any]) -> None:
    """`record` as the result JSON at `path`, replaced atomically."""
    write_text(path, json.dumps(record, indent=1) + "\n")


def read_result(path: Path) -> dict[str, Any]:
    """A result JSON that `run_job` wrote; a `ConfigError` naming the file for any other
    file (the report would otherwise fail on it deep inside a table)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read result {path}: {err.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _not_a_result(path, "not JSON") from None
    if not isinstance(record, dict):
        raise _not_a_result(path, "not a JSON object")
    missing = [key for key in RESULT_KEYS if key not in record]
    if missing:
        raise _not_a_result(path, f"no {missing[0]!r} key")
    return record


def _not_a_result(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"{path} is not an experiment result ({problem}); move it out of the results folder, "
                       "which holds only the grid's results")


def check_results(results_dir: Path) -> None:
    """Refuse a results folder holding a JSON that is not one of ours (`read_result`)."""
    for path in sorted(results_dir.glob("*.json")):
        read_result(path)


def refresh_curves(spec: Spec) -> int:
    """Re-read the curve of every finished run from its metrics.jsonl (no retraining), so
    results written by an older version gain what `read_curve` now records."""
    refreshed = 0
    for job in spec.jobs:
        result, metrics = spec.result_path(job), Path(job.settings["out_dir"]) / METRICS_FILE
        if result.exists() and metrics.exists():
            record = read_result(result)
            curve = read_curve(metrics)
            if curve != record.get("curve") or "train_seconds_this_session" in record:
                record["curve"] = curve
                record.pop("train_seconds_this_session", None)  # older versions: one session's time, see training_minutes
                write_result(result, record)
                refreshed += 1
    return refreshed
