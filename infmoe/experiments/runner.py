"""Run an experiment grid: each job (`infmoe.experiments.job.run_job`) in a process of its
own, leaving one small result JSON (`infmoe.experiments.results`).

Jobs run `jobs` at a time in fresh processes (set ``threads: 1`` in the spec's train
section so two share a 2-core machine). A job whose result JSON exists is skipped; a job
whose checkpoint exists resumes from it (bit-exactly, see `infmoe.training`); so an
interrupted grid continues where it stopped when the same command runs again.
"""

from __future__ import annotations

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

from infmoe.errors import ConfigError, DataError, InfmoeError, positive_int
from infmoe.experiments.job import run_job
from infmoe.experiments.results import refresh_curves
from infmoe.experiments.spec import Job, Spec


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
