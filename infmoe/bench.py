"""`infmoe bench`: what the FFN variants cost, as ratios measured in one process.

Five tables, each row a ratio to a baseline timed in the same run:

- **Training, one layer** (per shape, T tokens, forward+backward): a dense MLP of the ∞-MoE's
  *active* width H/2 (the baseline), a dense MLP of the full width H, ∞-MoE as the shape's
  named config builds it (`tiny-infmoe`: B = 64; `gpt2-small-infmoe`: B = 1, per unit), at
  B = 64 and 256 with K = 1 and B = 64 with K = 4, one masked-reference row, our top-k MoE
  (4 of 8), and the peers: HF transformers' `MixtralSparseMoeBlock` at equal total and
  active parameters (`MixtralPeer`), eager and grouped_mm, when transformers imports. Each
  row names the path it took (`InfiniteMoE.plan`), the measured union of its K masks, its
  time over both dense MLPs, and its GFLOP/s against a plain matmul of the same FLOPs timed
  in the same run (the most this machine does with one matrix product). GFLOP/s counts what
  each method needs (`FFNLayer.flops_per_token`; ∞-MoE at the measured union, the Mixtral
  peer its router and the three matmuls of each of its top-k experts), 3 × the forward.
- **Decoding, one layer** (no grad, T = 1, 16, 128 tokens per call): both dense MLPs and
  ∞-MoE at B = 1 and 64, K = 1, 4, 16 and mode "mean", each on the path `impl="auto"` takes.
  At T = 1 the cost is reading weights, and a layer timed over and over is served from the
  CPU cache (a gpt2-small dense MLP of the active width is 19 MB, this machine's L3 32 MiB),
  while in a model every layer's weights are evicted by the other layers' reads. So each
  variant cycles through copies of itself whose weights total `CACHE_FACTOR` × the L3
  cache, the i-th call on copy i mod n: a copy comes round again only after the others
  have been read, and its weights come from memory.
- **Whole model, training**: tokens/s (forward, backward, AdamW step) of the dense, top-k
  MoE and ∞-MoE configs of a size (and ∞-MoE with blocks where the config routes per unit),
  over the dense model's.
- **Whole model, generation**: tokens/s of `infmoe.generation.generate` (KV cache, batch 1,
  greedy, fixed seed, random weights; the short prompt's prefill included) for the dense
  config and the ∞-MoE config at K = 1, 4, 16 and mode "mean", over the dense model's.
- **Targets** (`TARGETS`, one table): each ratio the speed work aims at, measured, its
  target, met or not; a target whose rows this run did not measure is left out.

`--grid` instead prints fwd+bwd time of the sparse path over the full path, per block size
and K (the data behind `InfiniteMoE.sparse_pays`).

Timing: all variants of a table in one process, alternated within each repeat (order
rotated) so drift in the machine's speed hits them alike; the median over repeats. Memory:
bytes autograd keeps between forward and backward (``saved``) and the rise of peak resident
memory over one forward+backward in a fresh process (``peak``; CPU only).

Precision: training rows run under the autocast a training run of the same ``precision``
setting uses (`infmoe.device`; "auto" is bf16 on CUDA, fp32 on the CPU), and decoding and
generation rows in the weights' dtype, as `infmoe generate` runs: that is what a user pays
for. Each row records the dtype its matrix products actually ran in, seen below autocast
(HF's grouped_mm experts, for one, are not cast on the CPU).
"""

from __future__ import annotations

import contextlib
import copy
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
from infmoe.generation import generate
from infmoe.io import write_text
from infmoe.layers import DenseMLP, FFNLayer, InfiniteMoE, TopKMoE, sampling
from infmoe.layers.base import init_normal_
from infmoe.models import build_model, get_config


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


def infmoe_label(block: int, samples: int | str, impl: str = "auto", configured: bool = False) -> str:
    """A row's name, e.g. "∞-MoE B=64 K=4", "∞-MoE B=1 mean", "∞-MoE masked B=1 K=1",
    "∞-MoE B=1 K=1 (as configured)"; samples is K or "mean"."""
    k = "mean" if samples == "mean" else f"K={samples}"
    name = f"∞-MoE {'' if impl == 'auto' else impl + ' '}B={block} {k}"
    return f"{name} {CONFIGURED}" if configured else name


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


def layer_variants(shape: Shape, peers: bool = True) -> dict[str, Callable[[], nn.Module]]:
    """The training table's rows: name → constructor, at the shape's widths. The peers where
    `peers` and transformers imports."""
    d, h, b = shape.d_model, shape.d_hidden, shape.block_size
    table = dense_variants(shape) | {infmoe_label(b, 1, configured=True): infmoe_builder(shape, b, 1)}
    table |= {infmoe_label(block, k): infmoe_builder(shape, block, k)
              for block, k in TRAIN_SETTINGS if (block, k) != (b, 1)}
    table |= {infmoe_label(b, 1, "masked"): infmoe_builder(shape, b, 1, "masked"),
              TOPK: lambda: TopKMoE(d, h, n_experts=8, top_k=4)}
    if peers and _mixtral() is not None:
        table |= {peer_label(impl): (lambda impl=impl: MixtralPeer(d, h, impl)) for impl in PEER_IMPLEMENTATIONS}
    return table


def decode_variants(shape: Shape) -> dict[str, Callable[[], nn.Module]]:
    """The decoding table's rows: name → constructor; ∞-MoE with impl "auto"."""
    return dense_variants(shape) | {infmoe_label(b, k): infmoe_builder(shape, b, k)
                                    for b in DECODE_BLOCKS for k in DECODE_SAMPLES}


def planned_path(layer: nn.Module, tokens: int, grad: bool) -> str | None:
    """The ∞-MoE path a call on `tokens` tokens takes (`InfiniteMoE.plan`); None for others."""
    if not isinstance(layer, InfiniteMoE):
        return None
    return layer.plan(tokens, 1 if layer.mode == "mean" else layer.n_samples, grad)


def fixed_noise(layer: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same ∞-MoE draws on every call, so repeats time the same work."""
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
    cmd = [sys.executable, "-m", "infmoe.bench", "--peak-of", shape.name, name, str(threads), precision]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.split()[-1])


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _child_peak(shape_name: str, name: str, threads: int, precision: str) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape = SHAPES[shape_name]
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
    union = layer.aux.stats.get("union_fraction") if isinstance(layer, FFNLayer) else None
    return None if union is None else float(union)


def layer_table(shape: Shape, repeats: int, memory: bool, device: torch.device, peak: bool = True,
                precision: str = "fp32") -> list[dict]:
    """One row per `layer_variants(shape)`: forward and forward+backward times on T tokens,
    as ratios to both dense MLPs; GFLOP/s; memory where `memory`."""
    autocast = autocast_for(precision, device)
    layers, x = build_layers(shape, device)
    fwd = time_all({n: layer_step(m, x, False, autocast) for n, m in layers.items()}, repeats)
    fwd_bwd = time_all({n: layer_step(m, x, True, autocast) for n, m in layers.items()}, repeats)
    dtype = torch.bfloat16 if uses_bf16(precision, device) else torch.float32
    limit = matmul_limit(shape.tokens, shape.d_model, shape.d_hidden, repeats, device, dtype)
    rows = []
    for name, layer in layers.items():
        ran = compute_dtype(layer_step(layer, x, False, autocast))
        union = _union(layer)
        # What the method needs (the measured union of blocks for ∞-MoE, whichever path
        # ran), so GFLOP/s shows how well each layer computes it; backward = 2 x forward.
        flops = 3 * shape.tokens * layer.flops_per_token(getattr(layer, "n_samples", 1), union=union)
        row = dict(shape=shape.name, variant=name, path=planned_path(layer, shape.tokens, grad=True), union=union,
                   dtype=ran, fwd_ms=1e3 * fwd[name], fwd_bwd_ms=1e3 * fwd_bwd[name],
                   vs_dense=fwd_bwd[name] / fwd_bwd[BASELINE], vs_full=fwd_bwd[name] / fwd_bwd[FULL],
                   gflops=flops / fwd_bwd[name] / 1e9, matmul_limit_gflops=limit)
        if memory:
            row["saved_mb"] = saved_bytes(layer, x, autocast) / 2**20
            on_cpu = peak and device.type == "cpu" and sys.platform == "linux"
            peak_bytes = peak_rss_rise(shape, name, torch.get_num_threads(), precision) if on_cpu else None
            row["peak_mb"] = None if peak_bytes is None else peak_bytes / 2**20
        rows.append(row)
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
            ran = compute_dtype(layer_step(cs[0], x, False))
            rows.append(dict(shape=shape.name, tokens=t, variant=name, path=planned_path(cs[0], t, grad=False),
                             union=_union(cs[0]), dtype=ran, copies=len(cs), copy_bytes=parameter_bytes(cs[0]),
                             budget_bytes=budget, calls=calls, ms=1e3 * times[name],
                             vs_dense=times[name] / times[BASELINE], vs_full=times[name] / times[FULL]))
    return rows


def model_variants(size: str) -> dict[str, dict]:
    """label → build_model arguments: <size>-{dense,moe,infmoe}, and ∞-MoE again with blocks
    of `MODEL_BLOCK` units where the named config routes per unit."""
    variants = {f"{size}-{ffn}": dict(name_or_config=f"{size}-{ffn}") for ffn in ("dense", "moe", "infmoe")}
    if get_config(f"{size}-infmoe").ffn_options.get("block_size", 1) == 1:
        variants[f"{size}-infmoe --block_size {MODEL_BLOCK}"] = dict(name_or_config=f"{size}-infmoe",
                                                                     block_size=MODEL_BLOCK)
    return variants


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_table(size: str, repeats: int, batch: int, seq_len: int, device: torch.device,
                precision: str = "fp32") -> list[dict]:
    """Training tokens/s of each of `model_variants(size)`, as ratios to the dense model."""
    autocast = autocast_for(precision, device)
    steps, dtypes = {}, {}
    for label, kwargs in model_variants(size).items():
        torch.manual_seed(0)
        model = build_model(**kwargs).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        idx = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)

        def step(model=model, optimizer=optimizer, idx=idx) -> None:
            with autocast():
                loss = model(idx, idx).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)

        def forward(model=model, idx=idx) -> None:
            with torch.no_grad(), autocast():
                model(idx[:1])

        steps[label], dtypes[label] = step, compute_dtype(forward)
    times = time_all(steps, repeats)
    dense = times[f"{size}-dense"]
    return [dict(config=name, dtype=dtypes[name], tokens_per_s=batch * seq_len / t, vs_dense=dense / t,
                 step_ms=1e3 * t) for name, t in times.items()]


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
        decode_tokens: tuple[int, ...] = DECODE_TOKENS, new_tokens: int | None = None) -> dict:
    """Training and decoding rows for each shape, model training and generation rows for
    each (size, batch, seq_len) (`new_tokens` per generation, default `GENERATE_TOKENS`),
    training under the autocast that `precision` means on `device`, decoding without."""
    layers = [row for s in shapes for row in layer_table(SHAPES[s], repeats, memory, device, peak, precision)]
    decode = [row for s in shapes for row in decode_table(SHAPES[s], repeats, decode_tokens, device)]
    model_rows = [row for size, batch, seq in models
                  for row in model_table(size, repeats, batch, seq, device, precision)]
    generation = [row for size, *_ in models
                  for row in generation_table(size, min(repeats, GENERATE_REPEATS),
                                              new_tokens or GENERATE_TOKENS[size], device)]
    ran = sorted({row["dtype"] for row in layers + decode + model_rows + generation})
    machine = dict(torch=torch.__version__, transformers=transformers_version(), threads=torch.get_num_threads(),
                   device=str(device), processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                   l3_bytes=l3_cache_bytes(),
                   gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                   precision=precision, dtype=ran[0] if len(ran) == 1 else "mixed: " + ", ".join(ran))
    return dict(machine=machine, repeats=repeats, layers=layers, decode=decode, models=model_rows,
                generation=generation)


def sparse_grid(shape: Shape, repeats: int, blocks: tuple[int, ...] = GRID_BLOCKS,
                samples: tuple[int, ...] = GRID_SAMPLES, precision: str = "fp32") -> str:
    """Forward+backward time of the sparse path over the full path, each cell the two paths
    at the same B and K (same weights, same draws), timed alternately, on the CPU: the data
    behind `InfiniteMoE.sparse_pays`, as a markdown table. Block sizes that do not divide H
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
    lines += _table(["B", *(f"K={k}" for k in samples)],
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
    Target("model: gpt2-small-infmoe generate tokens/s at K=1 / dense",
           (_GENERATE[1], ("generate", "gpt2-small-dense")), _ratio, ">=", 0.8),
    Target("model: gpt2-small-infmoe generate tokens/s falls with K (least of K=1/K=4, K=4/K=16)",
           (_GENERATE[1], _GENERATE[4], _GENERATE[16]), _least_step, ">=", 1),
)


def measurements(result: dict) -> dict[tuple, float]:
    """Every number a target reads, by row key: ("train", shape, variant) → fwd+bwd ms,
    ("decode", shape, tokens, variant) → ms, ("model", config) → training tokens/s,
    ("generate", variant) → generation tokens/s. A shape's as-configured ∞-MoE row is also
    ("train", shape, CONFIGURED)."""
    values: dict[tuple, float] = {}
    for r in result["layers"]:
        values["train", r["shape"], r["variant"]] = r["fwd_bwd_ms"]
        if r["variant"].endswith(CONFIGURED):
            values["train", r["shape"], CONFIGURED] = r["fwd_bwd_ms"]
    for r in result.get("decode", []):
        values["decode", r["shape"], r["tokens"], r["variant"]] = r["ms"]
    for r in result["models"]:
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


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines, a blank line after it."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in rows), ""]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _path(row: dict) -> str:
    """The path cell: "—" for a layer without paths, "-" where the result predates the field."""
    return row.get("path") or ("—" if "path" in row else "-")


def _layer_lines(result: dict) -> list[str]:
    if not result["layers"]:
        return []
    header = ["shape", "variant", "path", "union", "fwd ms", "fwd+bwd ms", "vs dense active", "vs dense full",
              "GFLOP/s", "of matmul limit", "saved MB", "peak MB"]
    rows = [[r["shape"], r["variant"], _path(r), _fmt(r["union"], ".3f"), f"{r['fwd_ms']:.1f}",
             f"{r['fwd_bwd_ms']:.1f}", f"{r['vs_dense']:.2f}", _fmt(r.get("vs_full"), ".2f"), f"{r['gflops']:.0f}",
             f"{r['gflops'] / r['matmul_limit_gflops']:.0%}", _fmt(r.get("saved_mb"), ".0f"),
             _fmt(r.get("peak_mb"), ".0f")] for r in result["layers"]]
    lines = ["Training, one FFN layer, forward+backward; ratios to the dense MLP of the active width H/2 and of "
             "the full width H:", "", *_table(header, rows)]
    if "transformers" in result["machine"] and result["machine"]["transformers"] is None:
        lines += ["No HF Mixtral peer rows: transformers does not import here.", ""]
    return lines


def _decode_lines(result: dict) -> list[str]:
    decode = result.get("decode", [])
    if not decode:
        return []
    budget = decode[0]["budget_bytes"]
    cache = result["machine"].get("l3_bytes") or budget / CACHE_FACTOR
    header = ["shape", "tokens", "variant", "path", "union", "copies x MB", "calls", "ms", "vs dense active",
              "vs dense full"]
    rows = [[r["shape"], str(r["tokens"]), r["variant"], _path(r), _fmt(r["union"], ".3f"),
             f"{r['copies']} x {r['copy_bytes'] / 2**20:.1f}", str(r["calls"]), f"{r['ms']:.3f}", f"{r['vs_dense']:.2f}",
             f"{r['vs_full']:.2f}"] for r in decode]
    return [f"Decoding, one FFN layer, no grad, median of the calls; each call on the next of a variant's copies, "
            f"which hold >= {budget / 2**20:g} MiB of weights ({budget / cache:g} x the {cache / 2**20:g} MiB L3 "
            "cache), so weights come from memory:", "",
            *_table(header, rows)]


def _model_lines(result: dict) -> list[str]:
    lines = []
    if result["models"]:
        lines += ["Whole model, training: forward, backward, AdamW step:", ""]
        lines += _table(["config", "training tokens/s", "vs dense", "ms/step"],
                        [[r["config"], f"{r['tokens_per_s']:.0f}", f"{r['vs_dense']:.2f}", f"{r['step_ms']:.0f}"]
                         for r in result["models"]])
    if result.get("generation"):
        runs = result["generation"][0].get("runs", result["repeats"])
        lines += [f"Whole model, generation: `generate` with a KV cache, batch 1, greedy, random weights; median of "
                  f"{runs} runs:", ""]
        lines += _table(["model", "new tokens", "tokens/s", "vs dense", "ms/token"],
                        [[r["variant"], str(r["new_tokens"]), f"{r['tokens_per_s']:.1f}", f"{r['vs_dense']:.2f}",
                          f"{r['ms_per_token']:.2f}"] for r in result["generation"]])
    return lines


def _target_lines(result: dict) -> list[str]:
    checks = targets(result)
    if not checks:
        return ["Targets: none of their rows were measured in this run (they are set at the tiny and gpt2-small "
                "shapes and the gpt2-small models)."]
    return ["Targets:", "", *_table(["what", "measured", "target", "met"],
                  [[c["what"], f"{c['measured']:.2f}", f"{c['op']} {c['limit']:g}", "yes" if c["met"] else "no"]
                   for c in checks])]


def markdown(result: dict) -> str:
    """The result as markdown tables."""
    m = result["machine"]
    versions = f"torch {m['torch']}" + (f", transformers {m['transformers']}" if m.get("transformers") else "")
    lines = [f"{m['device']} ({m['gpu'] or m['processor']}), {m['threads']} threads, {versions}, "
             f"{dtype_label(m)}; median of {result['repeats']} repeats, variants alternated", ""]
    lines += _layer_lines(result) + _decode_lines(result) + _model_lines(result) + _target_lines(result)
    return "\n".join(lines).rstrip("\n") + "\n"


def save(result: dict, json_path: str | None, markdown_path: str | None) -> None:
    if json_path:
        write_text(json_path, json.dumps(result, indent=1) + "\n")
    if markdown_path:
        write_text(markdown_path, markdown(result))


if __name__ == "__main__":  # the fresh process behind peak_rss_rise
    if sys.argv[1:2] == ["--peak-of"]:
        _child_peak(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
