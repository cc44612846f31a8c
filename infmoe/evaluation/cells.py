"""How a sweep row's values read in a table cell, the same in `infmoe eval`'s terminal
table and in the experiment report's markdown."""

from __future__ import annotations


def mean_k_cell(mode: str, n_samples: int, mean_samples: str | None) -> str:
    """The "mean K" cell of a sweep row: the measured mean (mode "adaptive", given formatted),
    "-" in mode "mean", else the fixed K."""
    if mean_samples is not None:
        return mean_samples
    return "-" if mode == "mean" else str(n_samples)
