"""Training batches from a 1-D array of token ids (validation batches: `infmoe.evaluation`).

Training windows are the non-overlapping (seq_len + 1)-token slices of the stream, visited
in a fresh seeded permutation each epoch. Which windows a step uses is a pure function of
(seed, step, micro-step, rank), so a resumed run reads exactly what the uninterrupted run
would have, and ranks never share a window within a step.
"""

from __future__ import annotations

import numpy as np
import torch

from infmoe.errors import DataError


class WindowSampler:
    """tokens: 1-D integer array (a memmap is fine; only the rows used are read)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"the training split has {len(tokens)} tokens, fewer than one window of seq_len={seq_len}: "
                            "use more text or a smaller --seq_len")
        self._epoch, self._order = -1, None

    def _window(self, index: int) -> int:
        epoch, position = divmod(index, self.n_windows)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._epoch = epoch
        return int(self._order[position])

    def windows(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global windows first .. first + count - 1 → inputs, targets, each (count, seq_len) int64."""
        starts = np.array([self._window(i) for i in range(first, first + count)]) * self.seq_len
        rows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def batch(self, step: int, micro: int, batch_size: int, grad_accum: int,
              rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank `rank`'s share of micro-step `micro` of optimizer step `step`: rows
        rank · b .. (rank + 1) · b of that micro-step's global batch of world_size · b."""
        per_micro = batch_size * world_size
        first = (step * grad_accum + micro) * per_micro + rank * batch_size
        return self.windows(first, batch_size)
