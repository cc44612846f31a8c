"""Evaluation: validation loss/perplexity and the K sweep at inference."""

from infmoe.evaluation.perplexity import SweepRow, evaluate_loss, plot_sweep, sweep_samples

__all__ = ["SweepRow", "evaluate_loss", "plot_sweep", "sweep_samples"]
