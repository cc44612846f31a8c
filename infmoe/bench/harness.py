"""How the bench times and counts: one layer's step, steps timed alternated, the matmul
work and dtype seen below autocast, and the FLOPs a layer's path executes."""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from infmoe.device import synchronize
from infmoe.layers import FFNLayer, InfiniteMoE
from infmoe.layers.dispatch import plan_device


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
        synchronize(x.device)

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


def matmul_limit(tokens: int, d: int, width: int, repeats: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of the plain matmul (tokens × d) @ (d × width) in `dtype` into a preallocated
    output (so page faults on a fresh result do not count) on this machine, now."""
    a = torch.randn(tokens, d, device=device, dtype=dtype)
    b = torch.randn(d, width, device=device, dtype=dtype)
    c = torch.empty(tokens, width, device=device, dtype=dtype)

    def step() -> None:
        torch.mm(a, b, out=c)
        synchronize(device)

    seconds = time_all({"mm": step}, repeats)["mm"]
    return 2 * tokens * d * width / seconds / 1e9


def union_of(layer: nn.Module) -> float | None:
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
