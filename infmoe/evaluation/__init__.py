"""Evaluation: validation loss/perplexity and the K sweep at inference; zero-shot tasks."""

from infmoe.evaluation.perplexity import (
    Evaluation, SweepRow, eval_batches, evaluate_loss, evaluate_model, perplexity, plot_sweep, sweep_samples,
    validation_batches)

__all__ = ["Evaluation", "SweepRow", "eval_batches", "evaluate_loss", "evaluate_model", "perplexity", "plot_sweep",
           "sweep_samples", "validation_batches"]
