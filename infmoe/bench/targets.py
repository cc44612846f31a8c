"""The speed targets: each a ratio of measured rows, a comparison and a limit, checked
against a result."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass

from infmoe.bench.peers import PEER_IMPLEMENTATIONS, peer_label
from infmoe.bench.variants import (BASELINE, CONFIGURED, DECODE_BLOCKS, FULL, GENERATE_SAMPLES, SAVED_TOKENS,
                                   compiled_label, infmoe_label)


@dataclass(frozen=True)
class Target:
    """A speed target: `combine` of the values of `terms` (row keys of `measurements`)
    compared with `limit` by `op` ("<=", "<" or ">=")."""

    what: str
    terms: tuple[tuple, ...]
    combine: Callable[..., float]
    op: str
    limit: float


OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}


def _train(variant: str, shape: str = "gpt2-small") -> tuple:
    return ("train", shape, variant)


def _decode(variant: str) -> tuple:
    return ("decode", "gpt2-small", 1, variant)


def _over_fastest(value: float, *others: float) -> float:
    return value / min(others)


def _least_step(*speeds: float) -> float:
    """The smallest ratio of one value to the next: >= 1 exactly when they do not rise."""
    return min(a / b for a, b in itertools.pairwise(speeds))


_ratio = operator.truediv
_B64, _B256 = infmoe_label(64, 1), infmoe_label(256, 1)
_PEERS = tuple(_train(peer_label(impl)) for impl in PEER_IMPLEMENTATIONS)
_COMPILED = {name: _train(compiled_label(name)) for name in (BASELINE, FULL, infmoe_label(1, 1), _B64)}
_TINY_COMPILED = ("model", "tiny-infmoe --compile")
_GENERATE = {k: ("generate", f"gpt2-small-infmoe {'mean' if k == 'mean' else f'K={k}'}") for k in GENERATE_SAMPLES}

TARGETS = (
    Target("training gpt2-small: ∞-MoE as configured / dense full H", (_train(CONFIGURED), _train(FULL)),
           _ratio, "<=", 1.15),
    Target("training gpt2-small: ∞-MoE B=64 K=1 / dense active", (_train(_B64), _train(BASELINE)), _ratio, "<=", 1.3),
    Target("training gpt2-small: ∞-MoE B=256 K=1 / dense active", (_train(_B256), _train(BASELINE)),
           _ratio, "<=", 1.15),
    Target("training gpt2-small: ∞-MoE B=256 K=1 / the faster HF Mixtral peer", (_train(_B256), *_PEERS),
           _over_fastest, "<", 1),
    Target("training gpt2-small: ∞-MoE B=64 K=4 / dense full H", (_train(infmoe_label(64, 4)), _train(FULL)),
           _ratio, "<=", 1.2),
    Target("training tiny: ∞-MoE as configured / dense active", (_train(CONFIGURED, "tiny"), _train(BASELINE, "tiny")),
           _ratio, "<=", 1.4),
    Target("training gpt2-small compiled: ∞-MoE B=1 K=1 / dense full H",
           (_COMPILED[infmoe_label(1, 1)], _COMPILED[FULL]), _ratio, "<=", 1.15),
    Target("training gpt2-small compiled: ∞-MoE B=64 K=1 / dense active", (_COMPILED[_B64], _COMPILED[BASELINE]),
           _ratio, "<=", 1.3),
    Target(f"saved for backward gpt2-small: ∞-MoE B=1 K=16 / K=1 ({SAVED_TOKENS} tokens)",
           (("saved", "gpt2-small", 16), ("saved", "gpt2-small", 1)), _ratio, "<=", 1.25),
    *(Target(f"decoding gpt2-small T=1: ∞-MoE B={b} K=1 / dense active", (_decode(infmoe_label(b, 1)),
                                                                           _decode(BASELINE)), _ratio, "<=", 1.25)
      for b in DECODE_BLOCKS),
    *(Target(f"decoding gpt2-small T=1: ∞-MoE B={b} K=16 / dense full H", (_decode(infmoe_label(b, 16)),
                                                                            _decode(FULL)), _ratio, "<=", 1.25)
      for b in DECODE_BLOCKS),
    *(Target(f"decoding gpt2-small T=1: ∞-MoE B={b} mean / B={b} K=1", (_decode(infmoe_label(b, "mean")),
                                                                         _decode(infmoe_label(b, 1))), _ratio, "<=", 1)
      for b in DECODE_BLOCKS),
    Target("model: gpt2-small-infmoe training tokens/s / dense", (("model", "gpt2-small-infmoe"),
                                                                  ("model", "gpt2-small-dense")), _ratio, ">=", 0.6),
    Target("model: tiny-infmoe --compile training tokens/s / eager", (_TINY_COMPILED, ("model", "tiny-infmoe")),
           _ratio, ">=", 1),
    Target("model: tiny-infmoe --compile training tokens/s / tiny-dense --compile",
           (_TINY_COMPILED, ("model", "tiny-dense --compile")), _ratio, ">=", 0.6),
    Target("model: gpt2-small-infmoe generate tokens/s at K=1 / dense",
           (_GENERATE[1], ("generate", "gpt2-small-dense")), _ratio, ">=", 0.8),
    Target("model: gpt2-small-infmoe generate tokens/s falls with K (least of K=1/K=4, K=4/K=16)",
           (_GENERATE[1], _GENERATE[4], _GENERATE[16]), _least_step, ">=", 1),
)


def measurements(result: dict) -> dict[tuple, float]:
    """Every number a target reads, by row key: ("train", shape, variant) → fwd+bwd ms (the
    compiled rows too, by their names), ("saved", shape, K) → MB saved for backward,
    ("decode", shape, tokens, variant) → ms, ("model", config) → training tokens/s,
    ("generate", variant) → generation tokens/s. A shape's as-configured ∞-MoE row is also
    ("train", shape, CONFIGURED). Rows that did not compile give no number."""
    values: dict[tuple, float] = {}
    for r in result["layers"]:
        if "error" in r:
            continue
        values["train", r["shape"], r["variant"]] = r["fwd_bwd_ms"]
        if r["variant"].endswith(CONFIGURED):
            values["train", r["shape"], CONFIGURED] = r["fwd_bwd_ms"]
    for r in result.get("saved", []):
        values["saved", r["shape"], r["samples"]] = r["saved_mb"]
    for r in result.get("decode", []):
        values["decode", r["shape"], r["tokens"], r["variant"]] = r["ms"]
    for r in result["models"]:
        if "error" not in r:
            values["model", r["config"]] = r["tokens_per_s"]
    for r in result.get("generation", []):
        values["generate", r["variant"]] = r["tokens_per_s"]
    return values


def targets(result: dict) -> list[dict]:
    """`TARGETS` checked against `result`: what, measured, op, limit, met; those whose rows
    the result lacks left out."""
    values = measurements(result)
    checks = []
    for target in TARGETS:
        if all(term in values for term in target.terms):
            measured = target.combine(*(values[term] for term in target.terms))
            checks.append(dict(what=target.what, measured=measured, op=target.op, limit=target.limit,
                               met=OPS[target.op](measured, target.limit)))
    return checks
