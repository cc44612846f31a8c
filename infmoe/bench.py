"""`infmoe bench`: what the FFN variants cost, as ratios measured in one process.

These tables, each row a ratio to a baseline timed in the same run:

- **Training, one layer** (per shape, T tokens, `--tokens` or the shape's own, forward+backward):
  a dense MLP of the ∞-MoE's *active* width H/2 (the baseline), a dense MLP of the full width
  H, ∞-MoE as the shape's named config builds it (`tiny-infmoe`: B = 64; `gpt2-small-infmoe`:
  B = 1, per unit), at B = 64 and 256 with K = 1 and B = 64 with K = 4, one masked-reference
  row, our top-k MoE (4 of 8), and the peers: HF transformers' `MixtralSparseMoeBlock` at
  equal total and active parameters (`MixtralPeer`), eager and grouped_mm, when transformers
  imports. Each row names the path that ran (`FFNAux.path` of its last timed call), the
  measured union of its K masks, its time over both dense MLPs, and two GFLOP/s: what each
  method needs (`FFNLayer.flops_per_token`; ∞-MoE at the measured union, the Mixtral peer
  its router and the three matmuls of each of its top-k experts), and what the path that
  training takes there executes (``executed=True``, which asks the same dispatch rule; the
  full path computes all of H), 3 × the forward each. The executed GFLOP/s is also given
  against a plain matmul timed in the same run (the most this machine does with one matrix
  product).
- **Training, one layer, compiled** (`--compile`): both dense MLPs, ∞-MoE at B = 1 and 64
  with K = 1, and the peers, each under ``torch.compile(fullgraph=True)`` (inductor),
  compiled and warmed up before anything is timed, then timed alternated with the eager rows:
  ratios to the compiled dense MLPs and to the same layer eager. A layer that does not
  compile whole gets a row that says so.
- **Saved for backward** (unless `--no-memory`): bytes autograd keeps of ∞-MoE at B = 1 with
  K = 1, 4 and 16 on `SAVED_TOKENS` tokens: K must not multiply them.
- **Decoding, one layer** (no grad, T = 1, 16, 128 tokens per call): both dense MLPs and
  ∞-MoE at B = 1 and 64, K = 1, 4, 16 and mode "mean", each on the path `impl="auto"` takes.
  At T = 1 the cost is reading weights, and a layer timed over and over is served from the
  CPU cache (a gpt2-small dense MLP of the active width is 19 MB, this machine's L3 32 MiB),
  while in a model every layer's weights are evicted by the other layers' reads. So each
  variant cycles through copies of itself whose weights total `CACHE_FACTOR` × the L3
  cache, the i-th call on copy i mod n: a copy comes round again only after the others
  have been read, and its weights come from memory.
- **Whole model, training**: tokens/s of the training step (`infmoe.training.step.train_step`:
  forward, backward, gradient clipping, AdamW) of the dense, top-k MoE and ∞-MoE configs of a
  size (and ∞-MoE with blocks where the config routes per unit), over the dense model's; with
  `--compile` also the dense and ∞-MoE configs with the forward compiled as
  ``infmoe train --compile`` compiles it (``torch.compile(model)``).
- **Whole model, generation**: tokens/s of `infmoe.generation.generate` (KV cache, batch 1,
  greedy, fixed seed, random weights; the short prompt's prefill included) for the dense
  config and the ∞-MoE config at K = 1, 4, 16 and mode "mean", over the dense model's.
- **Targets** (`TARGETS`, one table): each ratio the speed work aims at, measured, its
  target, met or not; a target whose rows this run did not measure is left out.

`--grid` instead prints fwd+bwd time of the sparse path over the full path, per block size
and K (the data behind the host plan's cost model, `dispatch.SPARSE_COST`).

Timing: all variants of a table in one process, alternated within each repeat (order
rotated) so drift in the machine's speed hits them alike; the median over repeats. Memory:
bytes autograd keeps between forward and backward (``saved``) and the rise of peak resident
memory over one forward+backward in a fresh process (``peak``; CPU only, eager only).

Precision: training rows run under the autocast a training run of the same ``precision``
setting uses (`infmoe.device`; "auto" is bf16 on CUDA, fp32 on the CPU), and decoding and
generation rows in the weights' dtype, as `infmoe generate` runs: that is what a user pays
for. Each row records the dtype its matrix products actually ran in, seen below autocast
(HF's grouped_mm experts, for one, are not cast on the CPU).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import operator
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from infmoe.device import autocast_for, uses_bf16
from infmoe.errors import InfmoeError
from infmoe.generation import generate
from infmoe.io import write_text
from infmoe.layers import DenseMLP, FFNLayer, InfiniteMoE, TopKMoE, sampling
from infmoe.layers.base import init_normal_
from infmoe.layers.dispatch import plan_device
from infmoe.models import build_model, get_config
from infmoe.training.step import train_step


@dataclass(frozen=True)
class Shape:
    """A layer shape: model width d, ∞-MoE width H, tokens per training call, and the ∞-MoE
    block size B and d_z of the shape's named config (`<name>-infmoe`)."""

    name: str
    d_model: int
    d_hidden: int
    tokens: int
    block_size: int
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
# Calls per repeat: a one-token call takes about a millisecond, where one stall of the
# machine moves a single timing most, so it gets the most calls.
DECODE_CALLS = {1: 10, 16: 4, 128: 2}
# Each decoding variant's copies hold this many times the L3 cache in weights. Once is not
# enough: the cache is not exactly LRU, and it also holds the activations and the other
# variants' weights, so at 1 × a copy's lines partly survive until it comes round again.
CACHE_FACTOR = 4
DEFAULT_L3 = 32 * 2**20
GENERATE_SAMPLES = (1, 4, 16, "mean")
GENERATE_TOKENS = {"tiny": 128, "gpt2-small": 256}
# A whole generation is hundreds of calls, so its median over a few runs is steadier than
# one layer call's over many; three keep the gpt2-small runs to minutes.
GENERATE_REPEATS = 3
PROMPT_TOKENS = 8
# Per-unit routing trains on the full-width path; the model table adds the same model with
# blocks of this size (the block-sparse path) where the named config routes per unit.
MODEL_BLOCK = 256
GRID_BLOCKS = (16, 32, 64, 128, 256, 512)
GRID_SAMPLES = (1, 2, 4, 8)
# --compile: the ∞-MoE block sizes compiled (at K = 1), the model configs compiled beside
# their eager rows, and the backend (inductor, torch.compile's default; tests use a cheaper one).
COMPILE_BLOCKS = (1, 64)
COMPILE_MODELS = ("dense", "infmoe")
COMPILE_BACKEND = "inductor"
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
    return lambda: InfiniteMoE(shape.d_model, shape.d_hidden, d_z=shape.d_z, block_size=block, n_samples=k,
                               mode=mode, impl=impl)


def _mixtral() -> tuple[type, type] | None:
    """(MixtralConfig, MixtralSparseMoeBlock), or None where transformers does not import."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    return MixtralConfig, MixtralSparseMoeBlock


def transformers_version() -> str | None:
    if _mixtral() is None:
        return None
    import transformers

    return transformers.__version__


class MixtralPeer(FFNLayer):
    """HF transformers' `MixtralSparseMoeBlock`, x (T, d) → (T, d), at the total and active
    parameters of an ∞-MoE of width H at N = 50%: 8 SwiGLU experts of width H/8 · 2/3
    (three matrices where a GELU MLP has two), 4 per token. HF takes (batch, T, d).

    `flops_per_token` counts the router and the three matmuls of each of the top-k experts
    (tests hold it to the matmuls seen at dispatch)."""

    n_experts, top_k = 8, 4

    def __init__(self, d_model: int, d_hidden: int, experts_implementation: str) -> None:
        super().__init__(d_model, d_hidden)
        config_cls, block_cls = _mixtral()
        config = config_cls(hidden_size=d_model, intermediate_size=(d_hidden // self.n_experts) * 2 // 3,
                            num_local_experts=self.n_experts, num_experts_per_tok=self.top_k)
        config._experts_implementation = experts_implementation
        self.block = block_cls(config)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        # HF initialises in `PreTrainedModel.post_init`; the block alone holds torch.empty.
        for p in self.block.parameters():
            init_normal_(p, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.unsqueeze(0)).squeeze(0)

    def active_parameters(self, n_samples: int = 1) -> float:
        experts = self.block.experts
        per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) / self.n_experts
        return self.block.gate.weight.numel() + self.top_k * per_expert

    def flops_per_token(self, n_samples: int = 1, union: float | None = None,
                        executed: bool = False) -> float:
        router = 2 * self.d_model * self.n_experts
        return router + self.top_k * 3 * 2 * self.d_model * self.block.experts.intermediate_dim


def peer_label(experts_implementation: str) -> str:
    return f"HF Mixtral block 4 of 8, {experts_implementation}"


PEER_IMPLEMENTATIONS = ("eager", "grouped_mm")


def dense_variants(shape: Shape) -> dict[str, Callable[[], nn.Module]]:
    """The two baselines: dense MLPs of the active width (N = 50%: H / 2) and of the full width H."""
    return {BASELINE: lambda: DenseMLP(shape.d_model, shape.d_hidden // 2),
            FULL: lambda: DenseMLP(shape.d_model, shape.d_hidden)}


def peer_variants(shape: Shape) -> dict[str, Callable[[], nn.Module]]:
    """The HF Mixtral peers at the shape's widths, where transformers imports; else none."""
    if _mixtral() is None:
        return {}
    return {peer_label(impl): (lambda impl=impl: MixtralPeer(shape.d_model, shape.d_hidden, impl))
            for impl in PEER_IMPLEMENTATIONS}


def layer_variants(shape: Shape, peers: bool = True) -> dict[str, Callable[[], nn.Module]]:
    """The training table's rows: name → constructor, at the shape's widths. The peers where
    `peers` and transformers imports."""
    d, h, b = shape.d_model, shape.d_hidden, shape.block_size
    table = dense_variants(shape) | {infmoe_label(b, 1, configured=True): infmoe_builder(shape, b, 1)}
    table |= {infmoe_label(block, k): infmoe_builder(shape, block, k)
              for block, k in TRAIN_SETTINGS if (block, k) != (b, 1)}
    table |= {infmoe_label(b, 1, "masked"): infmoe_builder(shape, b, 1, "masked"),
              TOPK: lambda: TopKMoE(d, h, n_experts=8, top_k=4)}
    return table | (peer_variants(shape) if peers else {})


def compile_variants(shape: Shape) -> dict[str, Callable[[], nn.Module]]:
    """The compiled rows (`--compile`): compiled name → constructor of the eager layer, both
    dense MLPs, ∞-MoE at each of `COMPILE_BLOCKS` with K = 1, and the peers."""
    table = dense_variants(shape) | {infmoe_label(b, 1): infmoe_builder(shape, b, 1) for b in COMPILE_BLOCKS}
    return {compiled_label(name): build for name, build in (table | peer_variants(shape)).items()}


def decode_variants(shape: Shape) -> dict[str, Callable[[], nn.Module]]:
    """The decoding table's rows: name → constructor; ∞-MoE with impl "auto"."""
    return dense_variants(shape) | {infmoe_label(b, k): infmoe_builder(shape, b, k)
                                    for b in DECODE_BLOCKS for k in DECODE_SAMPLES}


def eager(layer: nn.Module) -> nn.Module:
    """The layer itself, or the one a `torch.compile` wrapper runs."""
    return getattr(layer, "_orig_mod", layer)


def ran_path(layer: nn.Module) -> str | None:
    """The ∞-MoE path the layer's last call ran (`FFNAux.path`); None for layers without paths."""
    aux = getattr(eager(layer), "aux", None)
    return None if aux is None else aux.path


def fixed_noise(layer: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same ∞-MoE draws on every call, so repeats time the same work."""
    layer = eager(layer)
    if not isinstance(layer, InfiniteMoE) or layer.mode == "mean":
        return {}
    g = torch.Generator().manual_seed(0)
    return {"noise": torch.randn(layer.n_samples, x.shape[0], layer.d_z, generator=g).to(x.device)}


Autocast = Callable[[], contextlib.AbstractContextManager]


def layer_step(layer: nn.Module, x: torch.Tensor, backward: bool,
               autocast: Autocast = contextlib.nullcontext) -> Callable[[], None]:
    """One forward (and backward) of `layer` on x (T, d), the forward under `autocast`.
    The output gradient is a real tensor: ``y.sum().backward()`` would hand matmuls a
    stride-0 gradient, which sends the dense MLP's backward to a slow kernel."""
    kwargs = fixed_noise(layer, x)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device) if backward else None

    def step() -> None:
        if backward:
            for p in layer.parameters():
                p.grad = None
            x.grad = None
            with autocast():
                y = layer(x, **kwargs)
            y.backward(dy)
        else:
            with torch.no_grad(), autocast():
                layer(x, **kwargs)
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def cycling(steps: list[Callable[[], None]]) -> Callable[[], None]:
    """One step whose i-th call runs steps[i mod n]."""
    calls = itertools.count()
    return lambda: steps[next(calls) % len(steps)]()


class _MatmulFlops(TorchDispatchMode):
    """Multiply-adds of the matrix products run inside it, per input dtype: seen below
    autocast, so these are the dtypes the kernels got."""

    def __init__(self) -> None:
        super().__init__()
        self.by_dtype: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket
        if op in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten._grouped_mm,
                  torch.ops.aten.mv):
            a, b = args[1:3] if op is torch.ops.aten.addmm else args[:2]
            # (rows, k) x (.., k, n), and (m, rows) x (rows, n) for grouped weight gradients;
            # a matrix-vector product is n = 1
            macs = a.shape[:-1].numel() * a.shape[-1] * (b.shape[-1] if b.dim() > 1 else 1)
            self.by_dtype[a.dtype] = self.by_dtype.get(a.dtype, 0) + macs
        return func(*args, **(kwargs or {}))


def compute_dtype(fn: Callable[[], object]) -> str:
    """The dtype that carried most of the matmul work while fn ran, e.g. "bfloat16"."""
    with _MatmulFlops() as seen:
        fn()
    return str(max(seen.by_dtype, key=seen.by_dtype.get)).removeprefix("torch.") if seen.by_dtype else "none"


def time_all(steps: dict, repeats: int) -> dict:
    """Median seconds per call of each step (key → callable), the steps alternated within
    each repeat, the order rotated by one each repeat."""
    names = list(steps)
    times: dict = {n: [] for n in names}
    for n in names:
        steps[n]()  # warm-up: lazy initialisation, allocator
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def saved_bytes(layer: nn.Module, x: torch.Tensor, autocast: Autocast = contextlib.nullcontext) -> int:
    """Bytes autograd keeps from forward to backward, parameters and the input (and views of
    them, such as one expert's slice of a stacked weight) excluded."""
    known = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        layer(x, **fixed_noise(layer, x))
    return sum(seen.values())


def peak_rss_rise(shape: Shape, name: str, threads: int, precision: str = "fp32") -> int:
    """Run training variant `name` once in a fresh process; the rise of its peak resident set
    in bytes. glibc maps each block over 64 KiB on its own and unmaps it when freed, so the
    resident set follows the live tensors rather than what the allocator keeps cached."""
    cmd = [sys.executable, "-m", "infmoe.bench", "--peak-of", shape.name, str(shape.tokens), name, str(threads),
           precision]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.split()[-1])


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _child_peak(shape_name: str, tokens: int, name: str, threads: int, precision: str) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape = dataclasses.replace(SHAPES[shape_name], tokens=tokens)
    # transformers is imported only for a peer: seconds of start-up for every other row
    layer = layer_variants(shape, peers=name.startswith(peer_label("")))[name]()
    autocast = autocast_for(precision, torch.device("cpu"))
    layer_step(layer, torch.randn(16, shape.d_model, requires_grad=True), True, autocast)()  # lazy inits
    layer.zero_grad(set_to_none=True)
    step = layer_step(layer, torch.randn(shape.tokens, shape.d_model, requires_grad=True), True, autocast)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    before = _rss_kib("VmRSS:")
    step()
    print((_rss_kib("VmHWM:") - before) * 1024)


def matmul_limit(tokens: int, d: int, width: int, repeats: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of the plain matmul (tokens × d) @ (d × width) in `dtype` into a preallocated
    output (so page faults on a fresh result do not count) on this machine, now."""
    a = torch.randn(tokens, d, device=device, dtype=dtype)
    b = torch.randn(d, width, device=device, dtype=dtype)
    c = torch.empty(tokens, width, device=device, dtype=dtype)

    def step() -> None:
        torch.mm(a, b, out=c)
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds = time_all({"mm": step}, repeats)["mm"]
    return 2 * tokens * d * width / seconds / 1e9


def build_layers(shape: Shape, device: torch.device) -> tuple[dict[str, nn.Module], torch.Tensor]:
    """The training table's layers (name → layer, seeded) and its input x (tokens, d)."""
    torch.manual_seed(0)
    layers = {name: build().to(device) for name, build in layer_variants(shape).items()}
    return layers, torch.randn(shape.tokens, shape.d_model, requires_grad=True, device=device)


def _union(layer: nn.Module) -> float | None:
    """The measured union fraction of the layer's last call (∞-MoE only)."""
    layer = eager(layer)
    union = layer.aux.stats.get("union_fraction") if isinstance(layer, FFNLayer) else None
    return None if union is None else float(union)


def executed_flops(layer: nn.Module, n_samples: int, union: float | None, device: torch.device,
                   dtype: torch.dtype, static: bool = False) -> float:
    """Forward FLOPs per token of what the layer's training path runs on `device` in `dtype`:
    `flops_per_token(executed=True)`, which asks the dispatch rule for that path. static:
    the call was compiled, which takes the static plan on any device (`dispatch.plan_device`
    asks the rule for it on the CPU)."""
    layer = eager(layer)
    if not isinstance(layer, InfiniteMoE):
        return layer.flops_per_token(n_samples, union=union, executed=True)
    with plan_device("cuda") if static else contextlib.nullcontext():
        return layer.flops_per_token(n_samples, union=union, executed=True, device=device.type, dtype=dtype)


def _one_line(err: BaseException) -> str:
    """An exception as one table cell."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:160]}".replace("|", "\\|")


def compile_layers(shape: Shape, device: torch.device, x: torch.Tensor, autocast: Autocast
                   ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """`compile_variants(shape)` built (seeded), compiled whole and run once forward+backward
    on x (the compilation, outside any timing): (name → compiled layer, name → why it did
    not compile)."""
    torch.manual_seed(0)
    compiled, failed = {}, {}
    for name, build in compile_variants(shape).items():
        layer = torch.compile(build().to(device), fullgraph=True, backend=COMPILE_BACKEND)
        try:
            layer_step(layer, x, True, autocast)()
            compiled[name] = layer
        except Exception as err:  # the row says so; the others still run
            failed[name] = _one_line(err)
    return compiled, failed


def _over(times: dict, name: str, baseline: str) -> float | None:
    """times[name] / times[baseline], None where the baseline was not timed."""
    return times[name] / times[baseline] if baseline in times else None


def layer_table(shape: Shape, repeats: int, memory: bool, device: torch.device, peak: bool = True,
                precision: str = "fp32", compile: bool = False) -> list[dict]:
    """One row per `layer_variants(shape)` (and, where `compile`, per `compile_variants`):
    forward and forward+backward times on T tokens (compiled rows: forward+backward only),
    as ratios to both dense MLPs (compiled rows: to the compiled ones, and to the same layer
    eager); GFLOP/s needed and executed; memory where `memory`."""
    autocast = autocast_for(precision, device)
    layers, x = build_layers(shape, device)
    compiled, failed = compile_layers(shape, device, x, autocast) if compile else ({}, {})
    fwd = time_all({n: layer_step(m, x, False, autocast) for n, m in layers.items()}, repeats)
    fwd_bwd = time_all({n: layer_step(m, x, True, autocast) for n, m in (layers | compiled).items()}, repeats)
    dtype = torch.bfloat16 if uses_bf16(precision, device) else torch.float32
    limit = matmul_limit(shape.tokens, shape.d_model, shape.d_hidden, repeats, device, dtype)
    eager_times = {name.removesuffix(f" {CONFIGURED}"): t for name, t in fwd_bwd.items() if name in layers}
    rows = []
    for name in [*layers, *(compile_variants(shape) if compile else ())]:
        if name in failed:
            rows.append(dict(shape=shape.name, variant=name, compiled=True, error=failed[name]))
            continue
        layer, is_compiled = (compiled[name], True) if name in compiled else (layers[name], False)
        path, union = ran_path(layer), _union(layer)  # what the last timed call ran
        k = getattr(eager(layer), "n_samples", 1)
        # What the method needs (the measured union of blocks for ∞-MoE, whichever path
        # ran), so GFLOP/s shows how well each layer computes it, and what the path that
        # ran executes, which the matmul limit bounds; backward = 2 x forward.
        flops = 3 * shape.tokens * eager(layer).flops_per_token(k, union=union)
        executed = 3 * shape.tokens * executed_flops(layer, k, union, device, dtype, static=is_compiled)
        base, full = (compiled_label(BASELINE), compiled_label(FULL)) if is_compiled else (BASELINE, FULL)
        t = fwd_bwd[name]
        row = dict(shape=shape.name, variant=name, compiled=is_compiled, path=path, union=union,
                   dtype=compute_dtype(layer_step(eager(layer), x, False, autocast)),
                   fwd_ms=None if is_compiled else 1e3 * fwd[name], fwd_bwd_ms=1e3 * t,
                   vs_dense=_over(fwd_bwd, name, base), vs_full=_over(fwd_bwd, name, full),
                   gflops=flops / t / 1e9, executed_gflops=executed / t / 1e9, matmul_limit_gflops=limit)
        if is_compiled:
            twin = eager_times.get(name.removesuffix(compiled_label("")))
            row["vs_eager"] = None if twin is None else t / twin
        if memory:
            row["saved_mb"] = saved_bytes(layer, x, autocast) / 2**20
            on_cpu = peak and not is_compiled and device.type == "cpu" and sys.platform == "linux"
            peak_bytes = peak_rss_rise(shape, name, torch.get_num_threads(), precision) if on_cpu else None
            row["peak_mb"] = None if peak_bytes is None else peak_bytes / 2**20
        rows.append(row)
    return rows


def saved_table(shape: Shape, device: torch.device, precision: str = "fp32") -> list[dict]:
    """Bytes autograd keeps for the backward of ∞-MoE at B = 1 with each K of `SAVED_SAMPLES`
    on `SAVED_TOKENS` tokens, under training's autocast, and their ratio to K = 1's."""
    autocast = autocast_for(precision, device)
    x = torch.randn(SAVED_TOKENS, shape.d_model, requires_grad=True, device=device)
    rows = []
    for k in SAVED_SAMPLES:
        torch.manual_seed(0)
        layer = infmoe_builder(shape, 1, k)().to(device)
        saved = saved_bytes(layer, x, autocast)
        rows.append(dict(shape=shape.name, variant=infmoe_label(1, k), samples=k, tokens=SAVED_TOKENS,
                         path=ran_path(layer), saved_mb=saved / 2**20))
    for row in rows:
        row["vs_k1"] = row["saved_mb"] / rows[0]["saved_mb"]
    return rows


def l3_cache_bytes(size_file: str = "/sys/devices/system/cpu/cpu0/cache/index3/size") -> int:
    """CPU 0's L3 cache in bytes from sysfs (e.g. "32768K"), else `DEFAULT_L3`."""
    try:
        text = Path(size_file).read_text().strip()
    except OSError:
        return DEFAULT_L3
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper())
    return int(text[:-1]) * scale if scale else int(text)


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def weight_copies(layer: nn.Module, n: int) -> list[nn.Module]:
    """n copies of `layer`, each with parameters of its own, equal to the layer's.

    All copies' parameters live in one allocation, each at a 64-byte aligned offset: every
    fresh CPU allocation above glibc's mmap threshold is a system call and page faults of
    its own, which for the hundreds of small copies a small shape needs took seconds."""
    params = list(layer.parameters())
    if len({p.dtype for p in params}) != 1:
        raise ValueError("weight_copies needs parameters of one dtype")
    align = max(1, 64 // params[0].element_size())
    sizes = [-(-p.numel() // align) * align for p in params]
    flat = torch.empty(n, sum(sizes), dtype=params[0].dtype, device=params[0].device)
    copies = []
    for row in flat:
        views = row.split(sizes)
        memo = {id(p): nn.Parameter(v[: p.numel()].view_as(p).copy_(p.detach()), requires_grad=p.requires_grad)
                for p, v in zip(params, views)}
        copies.append(copy.deepcopy(layer, memo))  # everything but the parameters copied as usual
    return copies


def decode_table(shape: Shape, repeats: int, tokens: tuple[int, ...], device: torch.device) -> list[dict]:
    """One row per `decode_variants(shape)` and T in `tokens`: ms per no-grad call on T
    tokens, each call on the next of the variant's copies (weights from memory, see the
    module docstring), as ratios to both dense MLPs; median of repeats × `DECODE_CALLS`.
    In the weights' dtype, as `infmoe generate` decodes."""
    budget = CACHE_FACTOR * l3_cache_bytes()
    torch.manual_seed(0)
    copies = {}
    for name, build in decode_variants(shape).items():
        layer = build().to(device)
        copies[name] = weight_copies(layer, math.ceil(budget / parameter_bytes(layer)))
    rows = []
    for t in tokens:
        x = torch.randn(t, shape.d_model, device=device)
        steps = {name: cycling([layer_step(c, x, False) for c in cs]) for name, cs in copies.items()}
        calls = repeats * DECODE_CALLS.get(t, 1)
        times = time_all(steps, calls)
        for name, cs in copies.items():
            path, union = ran_path(cs[0]), _union(cs[0])  # what its timed calls ran
            rows.append(dict(shape=shape.name, tokens=t, variant=name, path=path, union=union,
                             dtype=compute_dtype(layer_step(cs[0], x, False)), copies=len(cs),
                             copy_bytes=parameter_bytes(cs[0]),
                             budget_bytes=budget, calls=calls, ms=1e3 * times[name],
                             vs_dense=times[name] / times[BASELINE], vs_full=times[name] / times[FULL]))
    return rows


def model_variants(size: str, compile: bool = False) -> dict[str, tuple[dict, bool]]:
    """label → (build_model arguments, compiled): <size>-{dense,moe,infmoe}, ∞-MoE again with
    blocks of `MODEL_BLOCK` units where the named config routes per unit, and where `compile`
    the `COMPILE_MODELS` configs compiled ("<size>-infmoe --compile", as `infmoe train` spells it)."""
    variants = {f"{size}-{ffn}": (dict(name_or_config=f"{size}-{ffn}"), False) for ffn in ("dense", "moe", "infmoe")}
    if get_config(f"{size}-infmoe").ffn_options.get("block_size", 1) == 1:
        variants[f"{size}-infmoe --block_size {MODEL_BLOCK}"] = (dict(name_or_config=f"{size}-infmoe",
                                                                      block_size=MODEL_BLOCK), False)
    if compile:
        variants |= {f"{size}-{ffn} --compile": (dict(name_or_config=f"{size}-{ffn}"), True) for ffn in COMPILE_MODELS}
    return variants


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_table(size: str, repeats: int, batch: int, seq_len: int, device: torch.device,
                precision: str = "fp32", compile: bool = False) -> list[dict]:
    """Training tokens/s of each of `model_variants(size, compile)`, as ratios to the eager
    dense model: `train_step` on random tokens, the forward compiled for the compiled
    variants (compiled and warmed up first, outside the timing)."""
    autocast = autocast_for(precision, device)
    steps, dtypes, failed = {}, {}, {}
    for label, (kwargs, compiled) in model_variants(size, compile).items():
        torch.manual_seed(0)
        model = build_model(**kwargs).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        idx = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)
        forward = torch.compile(model, backend=COMPILE_BACKEND) if compiled else model

        def step(model=model, forward=forward, optimizer=optimizer, idx=idx) -> None:
            train_step(model, forward, optimizer, [(idx[:, :-1], idx[:, 1:])], autocast=autocast)
            _sync(device)

        def forward_only(model=model, idx=idx) -> None:
            with torch.no_grad(), autocast():
                model(idx[:1, :-1])

        if compiled:
            try:
                step()  # the compilation
            except Exception as err:  # the row says so; the others still run
                failed[label] = _one_line(err)
                continue
        steps[label], dtypes[label] = step, compute_dtype(forward_only)
    times = time_all(steps, repeats)
    dense = times[f"{size}-dense"]
    return [dict(config=name, compiled=compiled, error=failed[name]) if name in failed else
            dict(config=name, compiled=compiled, dtype=dtypes[name], tokens_per_s=batch * seq_len / times[name],
                 vs_dense=dense / times[name], step_ms=1e3 * times[name])
            for name, (_, compiled) in model_variants(size, compile).items()]


def generation_variants(size: str) -> dict[str, tuple[str, dict]]:
    """label → (config, `sampling` arguments): the dense config, and the ∞-MoE config at
    each of `GENERATE_SAMPLES`."""
    variants = {f"{size}-dense": (f"{size}-dense", {})}
    for k in GENERATE_SAMPLES:
        options = dict(mode="mean") if k == "mean" else dict(n_samples=k, mode="sample")
        variants[f"{size}-infmoe {'mean' if k == 'mean' else f'K={k}'}"] = (f"{size}-infmoe", options)
    return variants


def generation_table(size: str, repeats: int, new_tokens: int, device: torch.device) -> list[dict]:
    """Tokens/s of `generate` (KV cache, batch 1, greedy, seed 0, random weights, in the
    weights' dtype as `infmoe generate` runs) making `new_tokens` tokens after a fixed prompt
    of `PROMPT_TOKENS`, per `generation_variants`, as ratios to the dense model's; the runs
    alternated, median of `repeats`."""
    models = {}
    for config in dict.fromkeys(config for config, _ in generation_variants(size).values()):
        torch.manual_seed(0)
        models[config] = build_model(name_or_config=config).to(device)
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()

    def run(model: nn.Module, options: dict, n: int) -> None:
        with sampling(model, **options):
            for _ in generate(model, prompt, max_new_tokens=n, temperature=0, seed=0):  # no stop token: all n
                pass
        _sync(device)

    steps, dtypes = {}, {}
    for label, (config, options) in generation_variants(size).items():
        model = models[config]
        steps[label] = lambda model=model, options=options: run(model, options, new_tokens)
        dtypes[label] = compute_dtype(lambda model=model, options=options: run(model, options, 1))
    times = time_all(steps, repeats)
    dense = times[f"{size}-dense"]
    return [dict(config=generation_variants(size)[label][0], variant=label, new_tokens=new_tokens, runs=repeats,
                 dtype=dtypes[label], tokens_per_s=new_tokens / t, vs_dense=dense / t, ms_per_token=1e3 * t / new_tokens)
            for label, t in times.items()]


def run(shapes: list[str], *, repeats: int, memory: bool, models: list[tuple[str, int, int]],
        device: torch.device, peak: bool = True, precision: str = "fp32",
        decode_tokens: tuple[int, ...] = DECODE_TOKENS, new_tokens: int | None = None, compile: bool = False,
        tokens: int | None = None) -> dict:
    """Training (`tokens` per call, default the shape's own), saved-for-backward (where
    `memory`) and decoding rows for each shape, model training and generation rows for each
    (size, batch, seq_len) (`new_tokens` per generation, default `GENERATE_TOKENS`), the
    compiled rows too where `compile`; training under the autocast that `precision` means on
    `device`, decoding without."""
    sized = [SHAPES[s] if tokens is None else dataclasses.replace(SHAPES[s], tokens=tokens) for s in shapes]
    layers = [row for s in sized for row in layer_table(s, repeats, memory, device, peak, precision, compile)]
    saved = [row for s in sized for row in saved_table(s, device, precision)] if memory else []
    decode = [row for s in sized for row in decode_table(s, repeats, decode_tokens, device)]
    model_rows = [row for size, batch, seq in models
                  for row in model_table(size, repeats, batch, seq, device, precision, compile)]
    generation = [row for size, *_ in models
                  for row in generation_table(size, min(repeats, GENERATE_REPEATS),
                                              new_tokens or GENERATE_TOKENS[size], device)]
    ran = sorted({row["dtype"] for row in layers + decode + model_rows + generation if "dtype" in row})
    machine = dict(torch=torch.__version__, transformers=transformers_version(), threads=torch.get_num_threads(),
                   device=str(device), processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                   l3_bytes=l3_cache_bytes(),
                   gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                   precision=precision, dtype=ran[0] if len(ran) == 1 else "mixed: " + ", ".join(ran),
                   compile_backend=COMPILE_BACKEND if compile else None)
    return dict(machine=machine, repeats=repeats, layers=layers, saved=saved, decode=decode, models=model_rows,
                generation=generation)


def sparse_grid(shape: Shape, repeats: int, blocks: tuple[int, ...] = GRID_BLOCKS,
                samples: tuple[int, ...] = GRID_SAMPLES, precision: str = "fp32") -> str:
    """Forward+backward time of the sparse path over the full path, each cell the two paths
    at the same B and K (same weights, same draws), timed alternately, on the CPU: the data
    behind the host plan's cost model (`dispatch.SPARSE_COST`), as a markdown table. Block sizes that do not divide H
    are left out."""
    x = torch.randn(shape.tokens, shape.d_model, requires_grad=True)
    autocast = autocast_for(precision, x.device)
    blocks = tuple(b for b in blocks if shape.d_hidden % b == 0)
    ratios, ran = {}, set()
    for b, k in itertools.product(blocks, samples):
        steps = {}
        for impl in ("sparse", "full"):
            torch.manual_seed(0)
            layer = InfiniteMoE(shape.d_model, shape.d_hidden, d_z=shape.d_z, block_size=b, n_samples=k, impl=impl)
            steps[impl] = layer_step(layer, x, True, autocast)
        times = time_all(steps, repeats)
        ratios[b, k] = times["sparse"] / times["full"]
        ran.add(compute_dtype(steps["full"]))
    label = dtype_label({"dtype": ran.pop() if len(ran) == 1 else "mixed"})
    lines = [f"fwd+bwd sparse / full, {shape.name} shape (d={shape.d_model}, H={shape.d_hidden}, "
             f"{shape.tokens} tokens), {label}, median of {repeats}", ""]
    lines += markdown_table(["B", *(f"K={k}" for k in samples)],
                    [[str(b), *(f"{ratios[b, k]:.2f}" for k in samples)] for b in blocks])
    return "\n".join(lines)


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


DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16 autocast", "float16": "fp16 autocast", "float64": "fp64"}


def dtype_label(machine: dict) -> str:
    """How the header names the dtype that ran. Results saved before the field existed
    were all fp32: the bench had no other mode then."""
    dtype = machine.get("dtype", "float32")
    return DTYPE_LABELS.get(dtype, dtype)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines, a blank line after it."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in rows), ""]


def number_cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _path(row: dict) -> str:
    """The path cell: "—" for a layer without paths, "-" where the result predates the field."""
    return row.get("path") or ("—" if "path" in row else "-")


def _of_limit(row: dict) -> float | None:
    """Executed GFLOP/s over the matmul limit; None where the result predates the field."""
    return row["executed_gflops"] / row["matmul_limit_gflops"] if "executed_gflops" in row else None


def _layer_lines(result: dict) -> list[str]:
    rows = [r for r in result["layers"] if not r.get("compiled")]
    if not rows:
        return []
    header = ["shape", "variant", "path", "union", "fwd ms", "fwd+bwd ms", "vs dense active", "vs dense full",
              "GFLOP/s", "executed GFLOP/s", "executed of matmul limit", "saved MB", "peak MB"]
    cells = [[r["shape"], r["variant"], _path(r), number_cell(r["union"], ".3f"), f"{r['fwd_ms']:.1f}",
              f"{r['fwd_bwd_ms']:.1f}", f"{r['vs_dense']:.2f}", number_cell(r.get("vs_full"), ".2f"),
              f"{r['gflops']:.0f}", number_cell(r.get("executed_gflops"), ".0f"),
              number_cell(_of_limit(r), ".0%"),
              number_cell(r.get("saved_mb"), ".0f"), number_cell(r.get("peak_mb"), ".0f")] for r in rows]
    lines = ["Training, one FFN layer, forward+backward; ratios to the dense MLP of the active width H/2 and of "
             "the full width H:", "", *markdown_table(header, cells)]
    if "transformers" in result["machine"] and result["machine"]["transformers"] is None:
        lines += ["No HF Mixtral peer rows: transformers does not import here.", ""]
    return lines


def _compiled_lines(result: dict) -> list[str]:
    rows = [r for r in result["layers"] if r.get("compiled")]
    if not rows:
        return []
    header = ["shape", "variant", "path", "union", "fwd+bwd ms", "vs compiled dense active", "vs compiled dense full",
              "vs eager", "GFLOP/s", "executed GFLOP/s", "saved MB"]
    cells = [[r["shape"], r["variant"], f"did not compile: {r['error']}", *["-"] * 8] if "error" in r else
             [r["shape"], r["variant"], _path(r), number_cell(r["union"], ".3f"), f"{r['fwd_bwd_ms']:.1f}",
              number_cell(r["vs_dense"], ".2f"), number_cell(r["vs_full"], ".2f"), number_cell(r["vs_eager"], ".2f"),
              f"{r['gflops']:.0f}", f"{r['executed_gflops']:.0f}", number_cell(r.get("saved_mb"), ".0f")]
             for r in rows]
    return [f"Training, one FFN layer, compiled (`torch.compile(fullgraph=True)`, "
            f"{result['machine'].get('compile_backend')}; compiled before the timing), forward+backward, timed "
            "alternated with the eager rows; ratios to the compiled dense MLPs and to the same layer eager:", "",
            *markdown_table(header, cells)]


def _saved_lines(result: dict) -> list[str]:
    rows = result.get("saved", [])
    if not rows:
        return []
    return [f"Saved for backward, MB: ∞-MoE B=1 on {rows[0]['tokens']} tokens, per K (what autograd keeps "
            "between forward and backward, parameters and input excluded):", "",
            *markdown_table(["shape", "K", "path", "saved MB", "vs K=1"],
                            [[r["shape"], str(r["samples"]), _path(r), f"{r['saved_mb']:.1f}", f"{r['vs_k1']:.2f}"]
                             for r in rows])]


def _decode_lines(result: dict) -> list[str]:
    decode = result.get("decode", [])
    if not decode:
        return []
    budget = decode[0]["budget_bytes"]
    cache = result["machine"].get("l3_bytes") or budget / CACHE_FACTOR
    header = ["shape", "tokens", "variant", "path", "union", "copies x MB", "calls", "ms", "vs dense active",
              "vs dense full"]
    rows = [[r["shape"], str(r["tokens"]), r["variant"], _path(r), number_cell(r["union"], ".3f"),
             f"{r['copies']} x {r['copy_bytes'] / 2**20:.1f}", str(r["calls"]), f"{r['ms']:.3f}", f"{r['vs_dense']:.2f}",
             f"{r['vs_full']:.2f}"] for r in decode]
    return [f"Decoding, one FFN layer, no grad, median of the calls; each call on the next of a variant's copies, "
            f"which hold >= {budget / 2**20:g} MiB of weights ({budget / cache:g} x the {cache / 2**20:g} MiB L3 "
            "cache), so weights come from memory:", "",
            *markdown_table(header, rows)]


def _model_lines(result: dict) -> list[str]:
    lines = []
    if result["models"]:
        compiled = any(r.get("compiled") for r in result["models"])
        lines += ["Whole model, training: the training step (forward, backward, gradient clipping, AdamW)"
                  + ("; --compile rows with the forward compiled as `infmoe train --compile` does" * compiled) + ":",
                  ""]
        lines += markdown_table(["config", "training tokens/s", "vs dense", "ms/step"],
                                [[r["config"], f"did not compile: {r['error']}", "-", "-"] if "error" in r else
                                 [r["config"], f"{r['tokens_per_s']:.0f}", f"{r['vs_dense']:.2f}",
                                  f"{r['step_ms']:.0f}"] for r in result["models"]])
    if result.get("generation"):
        runs = result["generation"][0].get("runs", result["repeats"])
        lines += [f"Whole model, generation: `generate` with a KV cache, batch 1, greedy, random weights; median of "
                  f"{runs} runs:", ""]
        lines += markdown_table(["model", "new tokens", "tokens/s", "vs dense", "ms/token"],
                        [[r["variant"], str(r["new_tokens"]), f"{r['tokens_per_s']:.1f}", f"{r['vs_dense']:.2f}",
                          f"{r['ms_per_token']:.2f}"] for r in result["generation"]])
    return lines


def _target_lines(result: dict) -> list[str]:
    checks = targets(result)
    if not checks:
        return ["Targets: none of their rows were measured in this run (they are set at the tiny and gpt2-small "
                "shapes and the tiny and gpt2-small models)."]
    return ["Targets:", "", *markdown_table(
        ["what", "measured", "target", "met"],
        [[c["what"], f"{c['measured']:.2f}", f"{c['op']} {c['limit']:g}", "yes" if c["met"] else "no"] for c in checks])]


def markdown(result: dict) -> str:
    """The result as markdown tables."""
    m = result["machine"]
    versions = f"torch {m['torch']}" + (f", transformers {m['transformers']}" if m.get("transformers") else "")
    lines = [f"{m['device']} ({m['gpu'] or m['processor']}), {m['threads']} threads, {versions}, "
             f"{dtype_label(m)}; median of {result['repeats']} repeats, variants alternated", ""]
    lines += _layer_lines(result) + _compiled_lines(result) + _saved_lines(result) + _decode_lines(result)
    lines += _model_lines(result) + _target_lines(result)
    return "\n".join(lines).rstrip("\n") + "\n"


def render(path: str | os.PathLike) -> tuple[dict, str]:
    """The result `--json` saved at `path`, and its tables (`markdown`). One-line
    `InfmoeError` when the file is missing, is not JSON, or is not such a result."""
    path = Path(path)
    again = "give a file that infmoe bench --json wrote"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InfmoeError(f"cannot read {path}: {err.strerror or err}; {again}") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InfmoeError(f"{path} is not JSON ({type(err).__name__}): {again}") from None
    if not isinstance(result, dict):
        raise InfmoeError(f"{path} holds a JSON {type(result).__name__}, not a bench result: {again}")
    try:
        return result, markdown(result)
    # Results of older versions lack newer fields and still render; a file that breaks the
    # rendering is foreign or damaged.
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        lacks = f"it has no {err.args[0]!r} where a bench result has one" if isinstance(err, KeyError) else \
            f"its fields are not those of a bench result ({type(err).__name__})"
        raise InfmoeError(f"{path} is not a result of infmoe bench --json: {lacks}; {again}") from None


def save(result: dict, json_path: str | None, markdown_path: str | None) -> None:
    if json_path:
        write_text(json_path, json.dumps(result, indent=1) + "\n")
    if markdown_path:
        write_text(markdown_path, markdown(result))


if __name__ == "__main__":  # the fresh process behind peak_rss_rise
    if sys.argv[1:2] == ["--peak-of"]:
        _child_peak(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6])
