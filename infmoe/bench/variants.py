"""What the bench measures: the layer shapes, each table's settings, and its rows as
name → constructor (the row names are what results and targets key on)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from infmoe.bench.peers import peer_variants
from infmoe.layers import DenseMLP, InfiniteMoE, TopKMoE
from infmoe.models import get_config


@dataclass(frozen=True)
class Shape:
    """A layer shape: model width d, ∞-MoE width H, tokens per training call, and the ∞-MoE
    block size B and d_z of the shape's named config (`<name>-infmoe`)."""

    name: str
    d_model: int
    d_hidden: int
    tokens: int
    units_per_block: int
    d_z: int


SHAPES = {
    "tiny": Shape("tiny", 192, 1536, 2048, 64, 16),
    "gpt2-small": Shape("gpt2-small", 768, 6144, 2048, 1, 48),
    # H / 8 · 2/3 = 128: HF's grouped_mm needs 16-byte strides, so the peer's expert width
    # must be a multiple of 4 floats (8 in bf16).
    "quick": Shape("quick", 128, 1536, 256, 64, 16),
}
BASELINE = "dense, active width"
FULL = "dense, full width H"
TOPK = "top-k MoE 4 of 8 (grouped)"
CONFIGURED = "(as configured)"
# ∞-MoE rows of the training table beside the configured one: (B, K).
TRAIN_SETTINGS = ((64, 1), (256, 1), (64, 4))
DECODE_BLOCKS = (1, 64)
DECODE_SAMPLES = (1, 4, 16, "mean")
DECODE_TOKENS = (1, 16, 128)
GENERATE_SAMPLES = (1, 4, 16, "mean")
GENERATE_TOKENS = {"tiny": 128, "gpt2-small": 256}
# Per-unit routing trains on the full-width path; the model table adds the same model with
# blocks of this size (the block-sparse path) where the named config routes per unit.
MODEL_BLOCK = 256
GRID_BLOCKS = (16, 32, 64, 128, 256, 512)
GRID_SAMPLES = (1, 2, 4, 8)
# --compile: the ∞-MoE block sizes compiled (at K = 1) and the model configs compiled beside
# their eager rows.
COMPILE_BLOCKS = (1, 64)
COMPILE_MODELS = ("dense", "infmoe")
# Saved for backward: ∞-MoE at B = 1 on this many tokens, per K.
SAVED_TOKENS = 512
SAVED_SAMPLES = (1, 4, 16)


def infmoe_label(block: int, samples: int | str, impl: str = "auto", configured: bool = False) -> str:
    """A row's name, e.g. "∞-MoE B=64 K=4", "∞-MoE B=1 mean", "∞-MoE masked B=1 K=1",
    "∞-MoE B=1 K=1 (as configured)"; samples is K or "mean"."""
    k = "mean" if samples == "mean" else f"K={samples}"
    name = f"∞-MoE {'' if impl == 'auto' else impl + ' '}B={block} {k}"
    return f"{name} {CONFIGURED}" if configured else name


def compiled_label(name: str) -> str:
    """The compiled row of variant `name`, e.g. "dense, full width H, compiled"."""
    return f"{name}, compiled"


def infmoe_builder(shape: Shape, block: int, samples: int | str, impl: str = "auto") -> Callable[[], InfiniteMoE]:
    """A constructor of the ∞-MoE (d, H) of `shape` with B = block and K = samples (or mode "mean")."""
    mode = "mean" if samples == "mean" else "sample"
    k = 1 if samples == "mean" else samples
    return lambda: InfiniteMoE(shape.d_model, shape.d_hidden, d_z=shape.d_z, units_per_block=block, n_samples=k,
                               mode=mode, impl=impl)


def dense_variants(shape: Shape) -> dict[str, Callable[[], nn.Module]]:
    """The two baselines: dense MLPs of the active width (N = 50%: H / 2) and of the full width H."""
    return {BASELINE: lambda: DenseMLP(shape.d_model, shape.d_hidden // 2),
            FULL: lambda: DenseMLP(shape.d_model, shape.d_hidden)}


def layer_variants(shape: Shape, peers: bool = True) -> dict[str, Callable[[], nn.Module]]:
    """The training table's rows: name → constructor, at the shape's widths. The peers where
    `peers` and transformers imports."""
    d, h, b = shape.d_model, shape.d_hidden, shape.units_per_block
    table = dense_variants(shape) | {infmoe_label(b, 1, configured=True): infmoe_builder(shape, b, 1)}
    table |= {infmoe_label(block, k): infmoe_builder(shape, block, k)
              for block, k in TRAIN_SETTINGS if (block, k) != (b, 1)}
    table |= {infmoe_label(b, 1, "masked"): infmoe_builder(shape, b, 1, "masked"),
              TOPK: lambda: TopKMoE(d, h, n_experts=8, top_k=4)}
    return table | (peer_variants(shape.d_model, shape.d_hidden) if peers else {})


def compile_variants(shape: Shape) -> dict[str, Callable[[], nn.Module]]:
    """The compiled rows (`--compile`): compiled name → constructor of the eager layer, both
    dense MLPs, ∞-MoE at each of `COMPILE_BLOCKS` with K = 1, and the peers."""
    table = dense_variants(shape) | {infmoe_label(b, 1): infmoe_builder(shape, b, 1) for b in COMPILE_BLOCKS}
    return {compiled_label(name): build for name, build in (table | peer_variants(shape.d_model, shape.d_hidden)).items()}


def decode_variants(shape: Shape) -> dict[str, Callable[[], nn.Module]]:
    """The decoding table's rows: name → constructor; ∞-MoE with impl "auto"."""
    return dense_variants(shape) | {infmoe_label(b, k): infmoe_builder(shape, b, k)
                                    for b in DECODE_BLOCKS for k in DECODE_SAMPLES}


def model_variants(size: str, compile: bool = False) -> dict[str, tuple[dict, bool]]:
    """label → (build_model arguments, compiled): <size>-{dense,moe,infmoe}, ∞-MoE again with
    blocks of `MODEL_BLOCK` units where the named config routes per unit, and where `compile`
    the `COMPILE_MODELS` configs compiled ("<size>-infmoe --compile", as `infmoe train` spells it)."""
    variants = {f"{size}-{ffn}": (dict(name_or_config=f"{size}-{ffn}"), False) for ffn in ("dense", "moe", "infmoe")}
    if get_config(f"{size}-infmoe").ffn_options.get("units_per_block", 1) == 1:
        variants[f"{size}-infmoe --units_per_block {MODEL_BLOCK}"] = (dict(name_or_config=f"{size}-infmoe",
                                                                      units_per_block=MODEL_BLOCK), False)
    if compile:
        variants |= {f"{size}-{ffn} --compile": (dict(name_or_config=f"{size}-{ffn}"), True) for ffn in COMPILE_MODELS}
    return variants


def generation_variants(size: str) -> dict[str, tuple[str, dict]]:
    """label → (config, `sampling` arguments): the dense config, and the ∞-MoE config at
    each of `GENERATE_SAMPLES`."""
    variants = {f"{size}-dense": (f"{size}-dense", {})}
    for k in GENERATE_SAMPLES:
        options = dict(mode="mean") if k == "mean" else dict(n_samples=k, mode="sample")
        variants[f"{size}-infmoe {'mean' if k == 'mean' else f'K={k}'}"] = (f"{size}-infmoe", options)
    return variants
