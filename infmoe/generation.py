"""Text generation with a KV cache: temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from infmoe.errors import ConfigError, invalid, seed_int
from infmoe.models import GPT, KVCache
from infmoe.randomness import seeded

# Sampling temperatures other than 0 (greedy). Below the lowest, logits / temperature can
# overflow to inf (softmax then gives NaN) while sampling is already greedy in effect;
# above the highest, every token is about equally likely.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, vocab) → next token ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 0")
    if temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:  # NaN fails both
        raise invalid("temperature", temperature,
                      f"must be 0 (greedy) or lie in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k={top_k} is invalid: must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} is invalid: must lie in (0, 1]")


@torch.no_grad()
def generate(model: GPT, prompt: Sequence[int], *, max_new_tokens: int = 100, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_token: int | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens token ids after `prompt`, one at a time, with a KV cache.

    When the context fills (n_ctx positions), the cache restarts from the last half of the
    tokens so far, since positions are learned and cannot run past n_ctx.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if seed is not None:
        seed_int("seed", seed)
    if not prompt:
        raise ConfigError("the prompt is empty: give at least one token of text")
    model.eval()
    device = next(model.parameters()).device
    n_ctx = model.config.n_ctx
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    tokens = list(prompt)
    # The prompt fills all but one position (the next token's); a restart keeps half the
    # context. Both keep at least one token: with n_ctx 1, tokens[-0:] would be all of them.
    prompt_window, restart_window = max(1, n_ctx - 1), max(1, n_ctx // 2)
    with seeded(seed if seed is not None else torch.seed() % 2**32, device):  # ∞-MoE noise too
        cache = KVCache(model.config, 1, device=device)
        logits = model(torch.tensor([tokens[-prompt_window:]], device=device), cache=cache).logits[:, -1]
        for _ in range(max_new_tokens):
            token = int(sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator))
            yield token
            tokens.append(token)
            if token == stop_token:
                return
            if cache.length == n_ctx:
                cache = KVCache(model.config, 1, device=device)
                logits = model(torch.tensor([tokens[-restart_window:]], device=device), cache=cache).logits[:, -1]
            else:
                logits = model(torch.tensor([[token]], device=device), cache=cache).logits[:, -1]
