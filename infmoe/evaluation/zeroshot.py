"""Zero-shot multiple-choice accuracy, scored as lm-evaluation-harness's HF model does.

Each (context, continuation) pair of a `Request` is scored by the summed log-likelihood of
the continuation's tokens given the context; an item's prediction is the choice with the
highest sum (acc) or sum / characters (acc_norm). Tokenisation and truncation follow
lm-eval's ``_encode_pair`` and ``_loglikelihood_tokens``, so an exported model evaluated with
lm_eval on the same records gets the same numbers.

Pairs are sorted by length, longest first, and scored ``batch_size`` at a time: one forward
of the right-padded batch each (causal attention: padding after a sequence cannot change
it). ∞-MoE noise is pinned per pair (`PinnedNoise`), so the scores depend on neither the
batch size nor the order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from infmoe.data.tokenizer import Tokenizer
from infmoe.errors import DataError, positive_int
from infmoe.evaluation.noise import PinnedNoise
from infmoe.evaluation.tasks import Request
from infmoe.layers import sampling
from infmoe.models import GPT
from infmoe.randomness import seeded


@dataclass(frozen=True)
class Encoded:
    """One pair as token ids: the model reads ``tokens[:-1]`` (at most n_ctx of them, cut
    from the left) and the last ``n_target`` entries of ``tokens`` are the continuation."""

    tokens: list[int]
    n_target: int


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of each (context, continuation), split as lm-eval's
    ``_encode_pair`` does: trailing whitespace of the context moves to the continuation,
    context + continuation is encoded whole and the continuation is what follows the length
    of the separately encoded context. An empty context becomes ``<|endoftext|>`` (lm-eval's
    prefix token) unless the continuation starts with it."""
    moved = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        moved.append((context, continuation))
    encoded = tokenizer.encode_batch([c + t for c, t in moved] + [c for c, _ in moved])  # one parallel call
    wholes, contexts = encoded[: len(moved)], encoded[len(moved) :]
    out = []
    for (context, _), whole, context_ids in zip(moved, wholes, contexts):
        if context:
            out.append((context_ids, whole[len(context_ids) :]))
        elif whole[:1] == [tokenizer.eot_id]:
            out.append((whole[:1], whole[1:]))
        else:
            out.append(([tokenizer.eot_id], whole))
    return out


def encode_requests(
    tokenizer: Tokenizer, requests: Sequence[Request], n_ctx: int, vocab_size: int
) -> list[Encoded]:
    """Every pair of every request, in order, cut to fit `n_ctx` (lm-eval:
    ``(context + continuation)[-(max_length + 1):]``); a `DataError` for a continuation that
    is empty or longer than n_ctx tokens, or an id beyond the model's vocabulary."""
    where = [(item, choice) for item, r in enumerate(requests) for choice in range(len(r.pairs))]
    split = encode_pairs(tokenizer, [pair for r in requests for pair in r.pairs])
    encoded = []
    for (item, choice), (context_ids, target) in zip(where, split):
        if not target or len(target) > n_ctx:
            raise DataError(
                f"item {item}, choice {choice}: the continuation is {len(target)} tokens; "
                f"it must be 1 to the model's n_ctx={n_ctx} (lm-eval refuses it too)"
            )
        tokens = (context_ids + target)[-(n_ctx + 1) :]
        if max(tokens) >= vocab_size:
            raise DataError(
                f"item {item}: token id {max(tokens)} is outside the model's vocabulary of {vocab_size}; "
                f"use the tokenizer the model was trained with"
            )
        encoded.append(Encoded(tokens, len(target)))
    return encoded


def fitting(tokenizer: Tokenizer, requests: Sequence[Request], n_ctx: int) -> list[Request]:
    """The requests whose every continuation is 1 to n_ctx tokens (the others cannot be
    scored by a model with that context, here or in lm-eval)."""
    split = encode_pairs(tokenizer, [pair for r in requests for pair in r.pairs])
    kept, start = [], 0
    for request in requests:
        end = start + len(request.pairs)
        if all(1 <= len(target) <= n_ctx for _, target in split[start:end]):
            kept.append(request)
        start = end
    return kept


def batch_tensors(pairs: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs (B, T) int64, targets (B, T) int64 and a mask (B, T) bool that is
    True where the target is a continuation token, T the longest input of the batch."""
    width = max(len(p.tokens) - 1 for p in pairs)
    inputs = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    targets = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    scored = torch.zeros((len(pairs), width), dtype=torch.bool)
    for row, pair in enumerate(pairs):
        n = len(pair.tokens) - 1
        inputs[row, :n] = torch.tensor(pair.tokens[:-1])
        targets[row, :n] = torch.tensor(pair.tokens[1:])
        scored[row, n - pair.n_target : n] = True
    return inputs, targets, scored


def continuation_scores(
    logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), targets and scored (B, T) → the summed log-probability of each row's
    continuation (B,) float64 and whether every continuation token is the argmax (B,) bool.
    Only the scored positions go through log_softmax."""
    rows = scored.nonzero()[:, 0]
    picked = logits[scored].float()  # (N, V), N continuation tokens in the batch
    wanted = targets[scored]
    logprob = F.log_softmax(picked, dim=-1).gather(1, wanted.unsqueeze(1)).squeeze(1)
    total = torch.zeros(len(targets), dtype=torch.float64, device=logits.device).index_add_(
        0, rows, logprob.double()
    )
    misses = torch.zeros(len(targets), dtype=torch.long, device=logits.device)
    misses.index_add_(0, rows, (picked.argmax(-1) != wanted).long())
    return total, misses == 0


@torch.no_grad()
def score_pairs(
    model: GPT,
    pairs: Sequence[Encoded],
    *,
    batch_size: int,
    pad_id: int,
    seed: int,
    device: torch.device,
    progress: bool,
) -> tuple[list[float], list[bool]]:
    """(log-likelihood, is_greedy) of every pair, in the order given."""
    lls, greedy = [0.0] * len(pairs), [False] * len(pairs)
    # longest first (as lm-eval): similar lengths share a batch, and running out of memory shows at once
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i].tokens))
    with (
        tqdm(total=len(pairs), desc="zero-shot", unit="seq", disable=not progress) as bar,
        PinnedNoise(model, seed, model.config.n_ctx) as pinned,
    ):
        for start in range(0, len(order), batch_size):
            ids = order[start : start + batch_size]
            inputs, targets, scored = (t.to(device) for t in batch_tensors([pairs[i] for i in ids], pad_id))
            pinned.ids = ids
            total, is_greedy = continuation_scores(model(inputs).logits, targets, scored)
            for i, ll, g in zip(ids, total.tolist(), is_greedy.tolist()):
                lls[i], greedy[i] = ll, g
            bar.update(len(ids))
    return lls, greedy


def argmax(values: Sequence[float]) -> int:
    """Index of the first largest value (numpy's tie rule, as lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error as lm-eval reports it: sample std (n - 1) / sqrt(n);
    NaN for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def judge(request: Request, lls: list[float], greedy: list[bool]) -> dict:
    """One item's prediction: gold, the log-likelihood of each choice, pred (the argmax; for
    a greedy request 0 when its continuation is greedy, else -1) and correct, plus pred_norm
    and correct_norm when the request is length-normalised."""
    if request.greedy:
        return dict(gold=0, loglikelihoods=lls, pred=0 if greedy[0] else -1, correct=greedy[0])
    pred = argmax(lls)
    out = dict(gold=request.gold, loglikelihoods=lls, pred=pred, correct=pred == request.gold)
    if request.norm_lengths is not None:
        # a zero-length choice gets -inf, as ll / 0 does in lm-eval's numpy
        normed = [ll / n if n else -math.inf for ll, n in zip(lls, request.norm_lengths)]
        out["pred_norm"] = argmax(normed)
        out["correct_norm"] = out["pred_norm"] == request.gold
    return out


def evaluate_task(
    model: GPT,
    tokenizer: Tokenizer,
    requests: Sequence[Request],
    *,
    batch_size: int = 16,
    n_samples: int | None = None,
    mode: str | None = None,
    seed: int = 1234,
    progress: bool = True,
    device: torch.device | str | None = None,
    skip_too_long: bool = False,
) -> dict:
    """Zero-shot accuracy of `model` on `requests` (see `infmoe.evaluation.tasks.load_task`).

    n_samples, mode: ∞-MoE's K and mode for this evaluation (None keeps the model's).
    device: where the batches go; None means the device of the model's parameters.
    Memory: one batch's logits, batch_size × longest pair × vocabulary floats.
    skip_too_long: leave out items with a continuation longer than the model's context
    (counted in "skipped") instead of raising `DataError`.

    Returns {"n", "skipped", "acc", "acc_stderr", ["acc_norm", "acc_norm_stderr",] "seconds",
    "predictions"}: acc_norm only when every request is length-normalised; "predictions" one
    dict per item (see `judge`).
    """
    positive_int("batch_size", batch_size)
    skipped = 0
    if skip_too_long:
        kept = fitting(tokenizer, requests, model.config.n_ctx)
        requests, skipped = kept, len(requests) - len(kept)
    if not requests:
        raise DataError("no requests to evaluate; load a task file with at least one record")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    started = time.perf_counter()
    pairs = encode_requests(tokenizer, requests, model.config.n_ctx, model.config.vocab_size)
    was_training = model.training
    model.eval()
    try:
        with seeded(seed, device), sampling(model, n_samples=n_samples, mode=mode):
            lls, greedy = score_pairs(
                model,
                pairs,
                batch_size=batch_size,
                pad_id=tokenizer.eot_id,
                seed=seed,
                device=device,
                progress=progress,
            )
    finally:
        model.train(was_training)
    predictions, start = [], 0
    for request in requests:
        end = start + len(request.pairs)
        predictions.append(judge(request, lls[start:end], greedy[start:end]))
        start = end
    result: dict = {"n": len(requests), "skipped": skipped}
    metrics = ["acc"] + (["acc_norm"] if all("pred_norm" in p for p in predictions) else [])
    for metric in metrics:
        key = "correct" if metric == "acc" else "correct_norm"
        result[metric], result[f"{metric}_stderr"] = mean_and_stderr([float(p[key]) for p in predictions])
    result["seconds"] = time.perf_counter() - started
    result["predictions"] = predictions
    return result
