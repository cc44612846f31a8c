"""Counting the ops of a pass that need device data on the host.

On a GPU each of them stalls the host until the device has caught up (a synchronisation),
and under `torch.compile` each is a graph break or a data-dependent shape. A path meant for
the static plan should count none; run it on CPU tensors under
`infmoe.layers.dispatch.plan_device("cuda")`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Tensor methods that read data on the host without passing through the dispatcher on CPU.
_HOST_READS = {"tolist", "numpy", "__array__"}


def count_data_dependent_ops(fn: Callable[[], object]) -> Counter:
    """Run fn() and count, by op name, every call that reads tensor data on the host or
    whose output shape depends on tensor values:

    - ops tagged data_dependent_output (aten.item, aten._local_scalar_dense: `.item()`,
      `bool(t)`, `int(t)`, ...) or dynamic_output_shape (aten.nonzero, aten.bincount,
      aten.unique*, aten.masked_select, ...), except the two such ops whose shape is static
      in the form used: aten.index.Tensor with integer indices only, and
      aten.repeat_interleave.Tensor given output_size;
    - indexing or index_put with a boolean mask (a hidden nonzero);
    - `Tensor.tolist()` and `.numpy()`, which on CPU bypass the dispatcher.

    Ops inside an op that the dispatcher treats as one (a custom op, torch's own kernels)
    are not seen: they are that op's business.
    """
    counts: Counter = Counter()
    with _CountHostReads(counts), _CountDataDependent(counts):
        fn()
    return counts


def _has_mask(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


class _CountDataDependent(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tags = func.tags
        aten = torch.ops.aten
        if func is aten.index.Tensor:
            dependent = _has_mask(args[1])
        elif func in (aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
            dependent = _has_mask(args[1])
        elif func is aten.repeat_interleave.Tensor:
            dependent = kwargs.get("output_size") is None
        else:
            dependent = torch.Tag.data_dependent_output in tags or torch.Tag.dynamic_output_shape in tags
        if dependent:
            self.counts[str(func)] += 1
        return func(*args, **kwargs)


class _CountHostReads(TorchFunctionMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", None)
        if name in _HOST_READS:
            self.counts[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))
