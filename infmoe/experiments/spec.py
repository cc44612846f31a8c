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

`load_spec` checks every field when the spec is read, so that a mistake costs one line
before anything trains, not a failed job hours later: each run's settings are resolved
and its model built on the meta device, as `infmoe train` would. What lives outside the
spec (the corpus, the zero-shot files) is checked by `infmoe.experiments.runner` before
the jobs that need it start, so the report can be rebuilt on a clone without the data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from infmoe.errors import ConfigError, InfmoeError, choose, flag, invalid, positive_int, seed_int
from infmoe.evaluation.tasks import TASKS
from infmoe.models import GPT
from infmoe.training.config import resolve

TOP_KEYS = ("data", "out_dir", "results_dir", "seeds", "train", "eval", "runs", "report")
EVAL_KEYS = ("tokens", "samples", "adaptive", "zeroshot", "zeroshot_samples")
# Settings the grid sets for each job, and what to write instead.
GRID_SETTINGS = {"data": "use the top-level 'data' key", "seed": "use 'seeds'", "out_dir": "use the top-level "
                 "'out_dir' key", "resume": "a job whose checkpoint exists resumes by itself"}
REPORT_KEYS = ("id", "kind", "title", "runs", "file")
REPORT_KINDS = ("table", "curves", "zeroshot", "zeroshot-sweep", "sweep", "compare", "cost", "eval")
# A name that is one folder (or file) name: no separator, not hidden, not "." or "..".
SAFE_NAME = re.compile(r"\w[\w.+-]*")


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
    """Read and check a spec. Every mistake, in any field, is one `InfmoeError` naming the
    spec file, the field, the bad value and what to write instead."""
    path = Path(path)
    raw = _read_yaml(path)
    try:
        return _parse(path, raw)
    except InfmoeError as err:
        raise type(err)(f"experiment spec {path}: {err}") from None


class _RepeatedKey(Exception):
    def __init__(self, key: object, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`, except that a key given twice in one mapping is an error: YAML
    would silently keep the last one (a second run of one name replacing the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _RepeatedKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            except TypeError:  # an unhashable key: construct_mapping below says so
                pass
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except OSError as err:
        raise ConfigError(f"cannot read experiment spec {path}: {err.strerror}; check the path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"experiment spec {path} is not UTF-8 text; save it as UTF-8") from None
    except _RepeatedKey as err:
        raise ConfigError(f"experiment spec {path}, line {err.line}: key {err.key!r} appears twice in one "
                          "mapping, and YAML would keep only the last; rename or remove one") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"experiment spec {path}{where} does not parse ({problem}); fix its YAML") from None


def _parse(path: Path, raw: Any) -> Spec:
    if not isinstance(raw, dict):
        raise ConfigError("must be a mapping with a non-empty 'runs' mapping (see infmoe/experiments/spec.py)")
    _known_keys("the top level", raw, TOP_KEYS)
    seeds = _seeds("seeds", _get(raw, "seeds", [0]))
    data = _text("data", _get(raw, "data", "embedded"))
    out_dir = Path(_text("out_dir", _get(raw, "out_dir", "experiments/runs")))
    results_dir = Path(_text("results_dir", _get(raw, "results_dir", "experiments/results")))
    train = _settings("train", _get(raw, "train", {}))
    evaluation = _mapping("eval", _get(raw, "eval", {}))
    _known_keys("eval", evaluation, EVAL_KEYS)
    eval_tokens = positive_int("eval.tokens", _get(evaluation, "tokens", 65536))
    samples = _ks("eval.samples", _get(evaluation, "samples", [1, 2, 4, 8]))
    adaptive = _get(evaluation, "adaptive", None)
    if adaptive is not None:
        positive_int("eval.adaptive", adaptive)  # the largest K of the adaptive row
    zeroshot = _zeroshot_tasks(_mapping("eval.zeroshot", _get(evaluation, "zeroshot", {})))
    zeroshot_samples = _ks("eval.zeroshot_samples", _get(evaluation, "zeroshot_samples", []), empty=True)

    runs = raw.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise invalid("runs", runs, "must be a non-empty mapping of run name to settings, "
                                    "e.g. {infmoe: {config: tiny-infmoe}}")
    jobs = []
    for run in runs:
        if not isinstance(run, str) or not SAFE_NAME.fullmatch(run):
            raise invalid("run name", run, "must be a folder name: letters, digits, '_', '-', '+' and '.', "
                                           "not starting with '.' (it names the run's folder and result file)")
        options = _settings(f"runs.{run}", _get(runs, run, {}))
        run_seeds = _seeds(f"runs.{run}.seeds", options.pop("seeds")) if "seeds" in options else seeds
        wants_zeroshot = flag(f"runs.{run}.zeroshot", options.pop("zeroshot", False))
        if wants_zeroshot and not zeroshot:
            raise ConfigError(f"runs.{run}.zeroshot is true but eval.zeroshot names no tasks: "
                              "add them, e.g. eval: {zeroshot: {piqa: path/to/dev.jsonl}}")
        for seed in run_seeds:
            settings = {**train, **options, "data": data, "seed": seed, "out_dir": str(out_dir / f"{run}-seed{seed}")}
            jobs.append(Job(run, seed, settings, dict(zeroshot) if wants_zeroshot else {}))
        try:
            _check_run(jobs[-1])
        except ConfigError as err:
            raise ConfigError(f"run {run!r}: {err}") from None
    _distinct_folders(jobs)
    report = _report(_get(raw, "report", []))
    return Spec(path, data, out_dir, results_dir, eval_tokens, samples, jobs, report, adaptive, zeroshot_samples)


def _get(mapping: dict, key: str, default: Any) -> Any:
    """mapping[key], or `default` when it is missing or empty (``key:`` with no value)."""
    value = mapping.get(key)
    return default if value is None else value


def _known_keys(where: str, mapping: dict, known: tuple[str, ...]) -> None:
    unknown = [key for key in mapping if key not in known]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; the keys are {', '.join(known)}")


def _mapping(name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise invalid(name, value, "must be a mapping of key: value")
    return dict(value)


def _settings(name: str, value: Any) -> dict[str, Any]:
    """The `infmoe train` settings of the train section or a run, as a new dict."""
    if not isinstance(value, dict):
        raise invalid(name, value, "must be a mapping of infmoe train settings, e.g. {config: tiny-infmoe}")
    for key, instead in GRID_SETTINGS.items():
        if key in value:
            raise ConfigError(f"{name}.{key} is set by the grid for each job: {instead}")
    return dict(value)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise invalid(name, value, "must be text (a path or a name); quote it in YAML")
    return value


def _seeds(name: str, value: Any) -> list[int]:
    """A non-empty list of distinct seeds: each seed trains one job into its own folder."""
    if not isinstance(value, list) or not value:
        raise invalid(name, value, "must be a non-empty list of distinct integer seeds, e.g. [0, 1, 2]")
    for i, seed in enumerate(value):
        seed_int(f"{name}[{i}]", seed)
    _distinct(name, value, "seed")
    return value


def _ks(name: str, value: Any, *, empty: bool = False) -> list[int]:
    """A list of distinct sample counts K >= 1 (non-empty unless `empty`)."""
    if not isinstance(value, list) or not (value or empty):
        raise invalid(name, value, "must be a non-empty list of distinct integers >= 1, e.g. [1, 2, 4, 8]")
    for i, k in enumerate(value):
        positive_int(f"{name}[{i}]", k)
    _distinct(name, value, "K")
    return value


def _distinct(name: str, values: list, what: str) -> None:
    repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if repeated is not None:
        raise invalid(name, values, f"{what} {repeated} appears twice; list each once")


def _zeroshot_tasks(tasks: dict) -> dict[str, str]:
    """task name → its jsonl file (whether the file exists is checked before a job needs it)."""
    for task, file in tasks.items():
        choose("eval.zeroshot task", task, TASKS)
        _text(f"eval.zeroshot.{task}", file)
    return tasks


def _check_run(job: Job) -> None:
    """Resolve a run's settings and build its model on the meta device (no memory, no
    compute), as `infmoe train` would, so that any setting it would refuse is refused now.
    One job stands for the run: its seeds differ only in the seed (checked by `_seeds`)
    and the run folder."""
    cfg, model_config = resolve(job.settings)
    if cfg.init_from is None:  # else the model comes from that checkpoint, checked before the job starts
        with torch.device("meta"):
            GPT(model_config)


def _distinct_folders(jobs: list[Job]) -> None:
    """No two jobs may share a run folder or result file, not even on a file system that
    ignores case (macOS, Windows)."""
    folders: dict[str, Job] = {}
    for job in jobs:
        other = folders.setdefault(job.settings["out_dir"].casefold(), job)
        if other is not job:
            raise ConfigError(f"runs {other.run!r} and {job.run!r} would share the run folder "
                              f"{job.settings['out_dir']} (names that differ only in case are one folder "
                              "on macOS and Windows): rename one")


def _report(sections: Any) -> list[dict[str, Any]]:
    """The report sections, each a mapping `infmoe.experiments.report.build_sections` can render.
    A section may name runs that are no longer in the spec: their results may still be there."""
    if not isinstance(sections, list):
        raise invalid("report", sections, "must be a list of sections, e.g. [{id: A, runs: [infmoe, dense]}]")
    seen: set[str] = set()
    for i, section in enumerate(sections):
        name = f"report[{i}]"
        if not isinstance(section, dict):
            raise invalid(name, section, "must be a mapping such as {id: A, kind: table, runs: [infmoe, dense]}")
        _known_keys(name, section, REPORT_KEYS)
        ident = section.get("id")
        if not isinstance(ident, str) or not SAFE_NAME.fullmatch(ident):
            raise invalid(f"{name}.id", ident, "must be a name such as A or C-sweep (it names the section's "
                                               "markers and figure file); quote numbers")
        if ident in seen:
            raise invalid(f"{name}.id", ident, "is the id of an earlier section too; give each section its own")
        seen.add(ident)
        kind = choose(f"report section {ident}: kind", _get(section, "kind", "table"), REPORT_KINDS)
        if kind == "eval":
            _text(f"report section {ident}: file (an infmoe eval --out JSON)", section.get("file"))
            continue
        named = section.get("runs")
        if not isinstance(named, list) or not named or not all(isinstance(run, str) for run in named):
            raise invalid(f"report section {ident}: runs", named, "must be a non-empty list of run names")
    return sections
