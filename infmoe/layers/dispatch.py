"""Which execution path a routed layer takes: the one rule, and the plan it follows.

Two plans exist, and the device decides between them:

- the **host plan** (eager CPU): routing results may be read on the host, where they
  already are, so reading them waits for no device. The sparse path counts each block's
  rows there and chunks them so its temporaries stay small (CPU page faults, see
  `layers.grouped`), and decoding loops over tokens reading only the chosen rows
  (`layers.rows`).
- the **static plan** (CUDA, and anything under `torch.compile`): nothing is read on the
  host. Shapes are the ones the method fixes (each sample keeps exactly n_kept blocks, so
  K · T · n_kept (token, block) pairs), offsets are computed on the device, and a graph
  compiles whole.

`plan_device` lets a test ask for CUDA's plan and run it on CPU tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from infmoe.errors import invalid
from infmoe.layers.grouped import MAX_GROUPS, grouped_mm_supported

# The device type whose plan the layers follow instead of their tensors' own; None: their own.
_PLAN_DEVICE: str | None = None


@contextlib.contextmanager
def plan_device(device_type: str | None) -> Iterator[None]:
    """Within the block, routed layers plan as on `device_type` ("cuda", "cpu"), whatever
    device their tensors are on: CUDA's plan can be run, counted and compiled on a CPU."""
    global _PLAN_DEVICE
    saved, _PLAN_DEVICE = _PLAN_DEVICE, device_type
    try:
        yield
    finally:
        _PLAN_DEVICE = saved


def planned_device(device: torch.device) -> str:
    """The device type whose plan a call on tensors of `device` follows."""
    return _PLAN_DEVICE or device.type


def static_plan(device_type: str) -> bool:
    """Whether a call planned for `device_type` must keep to the static plan: on any device
    but the CPU, and on the CPU too while `torch.compile` traces it."""
    return device_type != "cpu" or torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------
# The rule. Its constants are each plan's own, and measured, not derived: the timings they
# were fitted to, with the machine that ran them, are in docs/speed.md ("Six paths, two
# plans, one rule" and "The sparse / full grid behind impl="auto""), each under the command
# that prints it. The static plan's are first guesses for a GPU, to be refitted from
# benchmarks/gpu_check.py's grid when a GPU is lent.

# Paths a call can take. "sparse" and "rows" plan on the host; "grouped" and "gather" are
# the same methods on the static plan (fixed K · T · n_kept pairs, device offsets).
PATHS = ("masked", "full", "sparse", "grouped", "rows", "gather")
# Without gradients, read only the chosen rows when tokens × (fraction of rows read) is at
# most this; beyond it one pass over every row (the full path) is cheaper.
DECODE_LIMIT = {"host": 0.8, "static": 0.8}
# Grouped-matmul overhead per row against a dense MLP, in units of B: sparse costs
# fraction · (a + b / B) of the full path. Host: fitted to the sparse / full grid of
# `infmoe bench --grid`. Static: a guess until a GPU measures it.
# Compiled on the CPU (the static plan on the CPU's own tensors), the grouped path gathers
# all K · T · n_kept rows at once: a is its time over the compiled full path's at B = 64,
# K = 1, divided by the fraction 0.5 it computes (`python benchmarks/compiled_paths.py`).
# A GLU block (three matrices) costs 3/2 of an MLP block on both paths, which leaves a as it
# is; b, a per-row cost (gathering x, adding into y) that the third matrix does not grow,
# shrinks to b / 1.5 against it. Reasoned, not measured.
SPARSE_COST = {"host": (1.05, 37.0), "static": (1.0, 16.0), "compiled-cpu": (3.1, 0.0)}


def choose_path(layer, *, device: torch.device, dtype: torch.dtype, grad: bool, tokens: int, n_samples: int,
                union: float | None = None, fused: bool = True) -> str:
    """The one rule: the path (one of `PATHS`) an ∞-MoE call will run.

    layer: an `InfiniteMoE` (its impl, gate, block size, N); device: where its tensors are
    (the plan follows `planned_device`); dtype: the FFN's compute dtype (autocast's when on);
    grad: whether gradients are wanted; tokens, n_samples: T and K; union: the measured
    union fraction when known (adaptive K), else the bound; fused: whether the fused full
    path can run this call (adaptive K averages a different K per token: it cannot).

    A forced impl that cannot run raises; nothing is remapped silently. Forced "sparse" and
    "rows" take their static forms ("grouped", "gather") on the static plan.
    """
    plan = "static" if static_plan(planned_device(device)) else "host"
    full_ok = fused and layer.gate != "softmax"  # the full path fuses a threshold gate
    impl = layer.impl
    if impl == "rows" and grad:
        raise invalid("impl", impl, "reads rows without gradients (inference only); use 'auto' to train")
    if impl == "full" and not full_ok:
        raise invalid("impl", impl, "the fused full path needs the sigmoid or constant gate and one K for every "
                      "token; use 'auto', 'masked' or 'sparse'")
    grouped_ok = layer.n_blocks <= MAX_GROUPS and _grouped_runs(device, dtype)
    if impl == "sparse" and plan == "static" and not grouped_ok:
        raise invalid("impl", impl, f"the static plan's grouped matmul takes at most {MAX_GROUPS} groups "
                      f"(this layer has {layer.n_blocks} blocks) in bf16 on a GPU that supports it; "
                      "use larger blocks (units_per_block), or impl 'full' or 'auto'")
    if impl != "auto":
        return {"sparse": "grouped", "rows": "gather"}.get(impl, impl) if plan == "static" else impl

    kept = layer.n_kept / layer.n_blocks
    bound = 1 - (1 - kept) ** n_samples
    # Rows read or computed, as a fraction of H: the host plan computes the union of the K
    # masks; the static plan all K · n_kept blocks of each token (its shapes are fixed).
    fraction = (bound if union is None else union) if plan == "host" else min(1.0, n_samples * kept)
    if not grad and (tokens * fraction <= DECODE_LIMIT[plan] or tokens == 1 and plan == "host"):
        return "rows" if plan == "host" else "gather"
    a, b = SPARSE_COST["compiled-cpu" if plan == "static" and planned_device(device) == "cpu" else plan]
    block = layer.units_per_block * layer.matrices / 2  # B, times 1.5 for a GLU (see SPARSE_COST)
    if fraction * (a + b / block) <= 1 and (plan == "host" or grouped_ok):
        return "sparse" if plan == "host" else "grouped"
    return "full" if full_ok else "masked"


def _grouped_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the static plan's grouped matmul runs on `device` without a host fallback:
    always on CPU tensors (torch's kernel or a loop); on a GPU where torch's grouped kernel
    does. Asked about CUDA on a machine without one (FLOP accounting), it assumes the sm90
    GPU the static plan is written for: bf16 only."""
    if device.type == "cpu":
        return True
    if device.type == "cuda" and not torch.cuda.is_available():
        return dtype == torch.bfloat16
    return grouped_mm_supported(device, dtype)
