"""Run an experiment grid: each job trains, evaluates, and leaves one small result JSON.

Jobs run `jobs` at a time in fresh processes (set ``threads: 1`` in the spec's train
section so two share a 2-core machine). A job whose result JSON exists is skipped; a job
whose checkpoint exists resumes from it (bit-exactly, see `infmoe.training`); so an
interrupted grid continues where it stopped when the same command runs again.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infmoe.errors import ConfigError, DataError, InfmoeError, positive_int
from infmoe.experiments.spec import Job, Spec
from infmoe.io import write_text
from infmoe.training.metrics import METRICS_FILE, read_curve


def pending(spec: Spec) -> list[Job]:
    return [job for job in spec.jobs if not spec.result_path(job).exists()]


def select_jobs(spec: Spec, only: list[str]) -> list[Job]:
    """The jobs named in `only`, each entry a run ("infmoe") or one seed of it ("infmoe-seed1"),
    in the order named (a run's seeds in spec order)."""
    known = {job.run for job in spec.jobs} | {job.name for job in spec.jobs}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ConfigError(f"--only: no run or job named {', '.join(unknown)} in the spec; "
                         f"its runs are {', '.join(dict.fromkeys(job.run for job in spec.jobs))}")
    return sorted((job for job in spec.jobs if job.run in only or job.name in only),
                  key=lambda job: only.index(job.name if job.name in only else job.run))


def _echo(line: str) -> None:
    print(line, flush=True)  # progress must reach a log file as it happens


@dataclass
class GridOutcome:
    """What one `run_grid` call did: the jobs that finished now, and those that failed,
    each with what went wrong (a job stopped by a signal to the grid is neither)."""

    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def run_grid(spec: Spec, *, jobs: int = 2, only: list[str] | None = None, reevaluate: bool = False,
             echo=_echo) -> GridOutcome:
    """Run every pending job of `spec` in spec order (or those named in `only`, in that order),
    each in a fresh process, at most `jobs` at a time. reevaluate: instead, evaluate the
    finished jobs named in `only` again from their checkpoints (after the spec's eval
    settings changed), rewriting their result JSONs.

    SIGINT or SIGTERM stops the grid: no job starts after it, the running ones checkpoint
    and stop, and then KeyboardInterrupt("SIGINT" or "SIGTERM") is raised."""
    positive_int("--jobs", jobs)
    waiting = {job.name for job in pending(spec)}
    if reevaluate:
        if not only:
            raise ConfigError("--reevaluate needs --only RUN,...: name the finished runs to evaluate again")
        from infmoe.training import CHECKPOINT

        todo = []
        for job in select_jobs(spec, only):
            checkpoint = Path(job.settings["out_dir"]) / CHECKPOINT
            if job.name in waiting:
                echo(f"{job.name} has not finished; run it without --reevaluate")
            elif not checkpoint.exists():
                echo(f"cannot re-evaluate {job.name}: {checkpoint} is gone; delete {spec.result_path(job)} to retrain it")
            else:
                todo.append(job)
    else:
        todo = [job for job in (select_jobs(spec, only) if only else spec.jobs) if job.name in waiting]
    check_inputs(spec, todo)
    refreshed = refresh_curves(spec)
    echo(f"{len(spec.jobs) - len(waiting)} of {len(spec.jobs)} runs already done ({refreshed} curves re-read from their logs); "
         f"{len(todo)} to {'evaluate again' if reevaluate else 'run'} now, {jobs} at a time")
    outcome = GridOutcome()
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no state shared with the parent
    queue = list(todo)
    running: dict[Any, tuple[Any, Job]] = {}  # result pipe -> (process, job); the pipe is readable when it ends
    with _StopSignals(running) as stop:
        while running or (queue and stop.signal is None):
            # Start jobs only into free slots, never ahead: a queued job must not start once a signal came.
            while queue and len(running) < jobs and stop.signal is None:
                job = queue.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_job_process, name=job.name, daemon=False, args=(
                    send, job, spec.eval_tokens, spec.samples, str(spec.result_path(job)), spec.adaptive,
                    spec.zeroshot_samples))
                process.start()
                send.close()  # the child holds its own copy; EOF here once it is gone
                running[receive] = (process, job)
                if stop.signal is not None:  # the signal came while it started: it stops before training
                    process.terminate()
            for receive in multiprocessing.connection.wait(list(running)):
                process, job = running.pop(receive)
                try:
                    result = receive.recv()
                except EOFError:  # it died before it could report: killed, out of memory, ...
                    result = None
                receive.close()
                process.join()
                if result is None:
                    ended = "stopped" if stop.signal else "FAILED"
                    result = {"finished": False, "summary": f"{ended}: its process ended (exit status "
                                                            f"{process.exitcode}) before it reported"}
                if result["finished"]:
                    outcome.finished.append(job.name)
                elif stop.signal is None:
                    outcome.failed[job.name] = result["summary"]
                elapsed = time.perf_counter() - started
                echo(f"[{len(spec.jobs) - len(pending(spec))}/{len(spec.jobs)}] {job.name}: "
                     f"{result['summary']} ({elapsed / 60:.1f} min so far)")
    if stop.signal is not None:
        not_started = f"; {len(queue)} queued not started" if queue else ""
        echo(f"interrupted by {stop.signal}: finished runs are saved and running ones checkpointed{not_started}; "
             "run the same command to continue")
        raise KeyboardInterrupt(stop.signal)
    return outcome


def _job_process(result_pipe, job: Job, eval_tokens: int, samples: list[int], result_path: str,
                 adaptive: int | None, zeroshot_samples: Sequence[int]) -> None:
    """A job's process: `run_job`, and its outcome ({"finished", "summary"}) sent to the grid."""
    try:
        outcome = run_job(job, eval_tokens, samples, result_path, adaptive=adaptive, zeroshot_samples=zeroshot_samples)
    except KeyboardInterrupt:  # Ctrl-C after training (training itself checkpoints and returns)
        outcome = {"finished": False, "summary": "interrupted by SIGINT"}
    except Exception as err:  # noqa: BLE001 - one failed run must not stop the grid
        if not isinstance(err, InfmoeError):
            traceback.print_exc()  # a bug: keep its traceback
        outcome = {"finished": False, "summary": f"FAILED: {type(err).__name__}: {err}"}
    result_pipe.send(outcome)
    result_pipe.close()


class _StopSignals:
    """While a grid runs, SIGINT and SIGTERM record themselves in `signal` (the grid then
    starts nothing more) and pass SIGTERM on to the running jobs, which checkpoint and
    stop. Without this a killed grid would orphan its jobs, which keep training into
    their run folders. Outside the main thread signals cannot be caught: nothing changes."""

    def __init__(self, running: dict[Any, tuple[Any, Job]]):
        self.running, self.signal, self._previous = running, None, {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._stop)
        return self

    def _stop(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        for process, _ in list(self.running.values()):
            process.terminate()

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_inputs(spec: Spec, jobs: Sequence[Job]) -> None:
    """Check that what `jobs` read from outside the spec exists: the corpus when it is a
    local path (a Hugging Face name is only checked when loaded), the checkpoint a run
    starts from, the zero-shot files. One `InfmoeError` naming the spec and the field."""
    from infmoe.data.sources import EMBEDDED, resolve_source
    from infmoe.loading import model_path

    if not jobs:
        return
    where = "data"
    try:
        if spec.data != EMBEDDED:  # the embedded corpus is always there (and resolving it writes a cache)
            resolve_source(spec.data, Path())  # cheap: finds the files, reads no text
        for job in jobs:
            if job.settings.get("init_from") is not None:
                where = f"runs.{job.run}.init_from"
                model_path(job.settings["init_from"])
        for task, file in {task: file for job in jobs for task, file in job.zeroshot.items()}.items():
            where = f"eval.zeroshot.{task}"
            if not Path(file).is_file():
                raise DataError(f"{file} is not a file; give the {task} jsonl file (one record per line)")
    except InfmoeError as err:
        raise type(err)(f"experiment spec {spec.path}: {where}: {err}") from None


def run_job(job: Job, eval_tokens: int, samples: list[int], result_path: str, *, adaptive: int | None = None,
            zeroshot_samples: Sequence[int] = ()) -> dict[str, Any]:
    """Train (or resume) one job, evaluate it, write its result JSON. Runs in a worker.
    adaptive, zeroshot_samples: as in `evaluate_job`."""
    import torch

    from infmoe.checkpoint import load_checkpoint
    from infmoe.training import CHECKPOINT, resolve, train

    settings = dict(job.settings, progress=False)
    checkpoint = Path(settings["out_dir"]) / CHECKPOINT
    if checkpoint.exists():
        settings["resume"] = True
    cfg, model_config = resolve(settings)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    done_steps = load_checkpoint(checkpoint).state.get("step", 0) if checkpoint.exists() else 0
    if done_steps < cfg.max_steps:
        result = train(cfg, model_config)
        if result.interrupted_by:
            return {"finished": False, "summary": f"interrupted by {result.interrupted_by} at step {result.step}"}
    record = evaluate_job(job, checkpoint, eval_tokens, samples, adaptive=adaptive,
                          zeroshot_samples=zeroshot_samples)
    write_text(result_path, json.dumps(record, indent=1) + "\n")
    head = record["headline"]
    return {"finished": True, "summary": f"val loss {head['loss']:.4f} (ppl {head['perplexity']:.1f})"}


def evaluate_job(job: Job, checkpoint: Path, eval_tokens: int, samples: list[int], *, adaptive: int | None = None,
                 zeroshot_samples: Sequence[int] = ()) -> dict[str, Any]:
    """Everything the report needs about one finished run, evaluated on the device and in
    the precision the run trained with. adaptive: K_max of an adaptive-K row in the sweep
    (∞-MoE runs); zeroshot_samples: the K values at which a zero-shot run is scored again."""
    import torch

    from infmoe.checkpoint import load_checkpoint
    from infmoe.data import unigram_loss
    from infmoe.device import autocast_for, pick_device, uses_bf16
    from infmoe.evaluation import evaluate_model
    from infmoe.layers import InfiniteMoE
    from infmoe.params import parameter_report

    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.state["train_config"]
    device = pick_device(cfg.get("device", "auto"))
    model, tokenizer = ckpt.build_model(device).eval(), ckpt.tokenizer()
    result = evaluate_model(model, tokenizer, cfg["data"], samples=samples, adaptive=adaptive,
                            max_tokens=eval_tokens, batch_size=16,
                            seq_len=cfg.get("seq_len"), cache_dir=cfg.get("cache_dir"),
                            autocast=autocast_for(cfg.get("precision", "auto"), device))
    rows, data = result.rows, result.data
    seq_len = cfg.get("seq_len") or model.config.n_ctx
    layers = [f for f in model.ffn_layers() if isinstance(f, InfiniteMoE)]
    trained_k = layers[0].n_samples if layers else 1
    trained_mode = layers[0].mode if layers else "sample"
    headline = next(r for r in rows if r.mode == trained_mode and (r.mode == "mean" or r.n_samples == trained_k))
    report = parameter_report(model.config, job.run, samples=(1,))
    record: dict[str, Any] = {
        "run": job.run, "seed": job.seed, "settings": job.settings, "config": model.config.to_dict(),
        "params": {"total": report.total, "active": report.active[1]},
        "steps": ckpt.state["step"], "tokens_seen": ckpt.state["step"] * cfg["batch_size"] * cfg["grad_accum"]
        * ckpt.state.get("world_size", 1) * seq_len,
        "eval_tokens": result.tokens,
        "headline": headline.to_dict(), "sweep": [r.to_dict() for r in rows],
        "baselines": {"unigram": unigram_loss(data.train, data.valid, data.vocab_size),
                      "bigram": bigram_loss(data.train, data.valid, data.vocab_size)},
        "curve": read_curve(checkpoint.parent / METRICS_FILE),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "precision": "bf16" if uses_bf16(cfg.get("precision", "auto"), device) else "fp32",
    }
    if job.zeroshot:
        record["zeroshot"] = zeroshot(model, tokenizer, job.zeroshot)
        if layers and zeroshot_samples:  # K = the trained K in sample mode is the run above
            record["zeroshot_sweep"] = {
                str(k): record["zeroshot"] if (k, trained_mode) == (trained_k, "sample")
                else zeroshot(model, tokenizer, job.zeroshot, n_samples=k, mode="sample")
                for k in zeroshot_samples}
    return record


def zeroshot(model, tokenizer, tasks: dict[str, str], n_samples: int | None = None,
             mode: str | None = None) -> dict[str, Any]:
    from infmoe.evaluation.tasks import load_task
    from infmoe.evaluation.zeroshot import evaluate_task

    out = {}
    for task, path in tasks.items():
        result = evaluate_task(model, tokenizer, load_task(task, path), n_samples=n_samples, mode=mode,
                               progress=False, skip_too_long=True)
        predictions = result.pop("predictions")
        result["correct"] = [int(p["correct"]) for p in predictions]  # per item, for paired tests
        out[task] = result
    return out


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


RESULT_KEYS = ("run", "seed", "steps", "tokens_seen", "params", "headline", "sweep", "baselines", "curve")


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
                write_text(result, json.dumps(record, indent=1) + "\n")
                refreshed += 1
    return refreshed


def bigram_loss(train: np.ndarray, valid: np.ndarray, vocab_size: int, alpha: float = 0.1) -> float:
    """Cross-entropy (nats/token) on `valid` of an add-alpha bigram model counted on
    `train`, interpolated with nothing: P(b | a) = (c(a, b) + alpha) / (c(a) + alpha · V)."""
    train = np.asarray(train, dtype=np.int64)
    valid = np.asarray(valid, dtype=np.int64)
    pairs, counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    first = np.bincount(train[:-1], minlength=vocab_size)
    query = valid[:-1] * vocab_size + valid[1:]
    position = np.clip(np.searchsorted(pairs, query), 0, len(pairs) - 1)
    pair_counts = np.where(pairs[position] == query, counts[position], 0)
    probs = (pair_counts + alpha) / (first[valid[:-1]] + alpha * vocab_size)
    return float(-np.log(probs).mean())


def spikes(losses: list[float], window: int = 5, threshold: float = 0.1) -> int:
    """Loss spikes: logged losses more than `threshold` nats above the median of the
    `window` before them (a smooth curve has none once past the first steps)."""
    count = 0
    for i in range(window, len(losses)):
        if losses[i] > float(np.median(losses[i - window : i])) + threshold:
            count += 1
    return count


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std
