"""Experiment grids: a YAML spec of (run × seed) on one corpus, run resumably, reported."""

from infmoe.experiments.report import build_sections, load_results, update_markdown
from infmoe.experiments.results import check_results, refresh_curves
from infmoe.experiments.runner import GridOutcome, run_grid
from infmoe.experiments.spec import Job, Spec, load_spec

__all__ = ["GridOutcome", "Job", "Spec", "build_sections", "check_results", "load_results", "load_spec",
           "refresh_curves", "run_grid", "update_markdown"]
