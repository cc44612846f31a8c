"""Evaluation: validation batches, loss/perplexity and the K sweep at inference, its table
cells and plot; zero-shot tasks (`infmoe.evaluation.tasks`, `infmoe.evaluation.zeroshot`)."""

from infmoe.evaluation.cells import mean_k_cell
from infmoe.evaluation.perplexity import (
    Evaluation, SweepRow, evaluate_loss, evaluate_model, perplexity, sweep_samples)
from infmoe.evaluation.plots import plot_sweep
from infmoe.evaluation.validation import eval_batches, validation_batches

__all__ = ["Evaluation", "SweepRow", "eval_batches", "evaluate_loss", "evaluate_model", "mean_k_cell", "perplexity",
           "plot_sweep", "sweep_samples", "validation_batches"]
