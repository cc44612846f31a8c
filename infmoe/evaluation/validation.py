"""Validation batches: the first tokens of a corpus's validation split as fixed windows,
in a fixed order, so that every evaluation of a model reads the same targets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from infmoe.data import PreparedData, Tokenizer, prepare
from infmoe.data.tokens import damaged_data_fix
from infmoe.errors import DataError, positive_int
from infmoe.models import GPT

# (inputs, targets) pairs, each (B, T) int64
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first max_tokens of `tokens` (at least one window) as consecutive windows of
    seq_len, in batches of batch_size in a fixed order: inputs, targets each (b, seq_len) int64."""
    positive_int("tokens", max_tokens)
    n = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    if n < 1:
        raise DataError(f"the validation split has {len(tokens)} tokens, fewer than one window of seq_len={seq_len}: "
                        "use more validation text or a smaller --seq_len")
    rows = torch.from_numpy(np.asarray(tokens[: n * seq_len + 1]).astype(np.int64))
    x = rows[:-1].view(n, seq_len)
    y = rows[1:].view(n, seq_len)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def validation_batches(model: GPT, tokenizer: Tokenizer, source: str, *, max_tokens: int, batch_size: int = 8,
                       seq_len: int | None = None, cache_dir: str | None = None, encoding_errors: str = "strict"
                       ) -> tuple[PreparedData, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Corpus `source` prepared with the model's own `tokenizer`, and the first `max_tokens`
    of its validation split as `eval_batches` of seq_len (default: the model's n_ctx)."""
    data = prepare(source, cache_dir=cache_dir, tokenizer=tokenizer, encoding_errors=encoding_errors, progress=False)
    batches = eval_batches(data.valid, seq_len or model.config.n_ctx, batch_size, max_tokens)
    # Up front, not as an IndexError in the embedding: a cache changed behind prepare's back
    # (its file stamps restored) can hold ids the model has no row for.
    top = max((max(int(x.max()), int(y.max())) for x, y in batches), default=-1)
    if top >= model.config.vocab_size:
        raise DataError(f"the prepared validation tokens hold id {top}, beyond the model's vocabulary of "
                        f"{model.config.vocab_size}: they are damaged; {damaged_data_fix(data.valid)}")
    return data, batches
