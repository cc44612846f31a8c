"""What the bench measures of memory: bytes saved for backward, the peak resident set of
one step in a fresh process (`python -m infmoe.bench --peak-of`), and weight copies that
outgrow the CPU's L3 cache so decoding reads its weights from memory."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from infmoe.bench.harness import Autocast, fixed_noise, layer_step
from infmoe.bench.peers import peer_label
from infmoe.bench.variants import SHAPES, Shape, layer_variants
from infmoe.device import autocast_for

# Each decoding variant's copies hold this many times the L3 cache in weights. Once is not
# enough: the cache is not exactly LRU, and it also holds the activations and the other
# variants' weights, so at 1 × a copy's lines partly survive until it comes round again.
CACHE_FACTOR = 4
DEFAULT_L3 = 32 * 2**20


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
    # `python -m infmoe.bench`: the package's __main__ runs `print_peak_rss_rise`
    cmd = [sys.executable, "-m", __package__, "--peak-of", shape.name, str(shape.tokens), name, str(threads),
           precision]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.split()[-1])


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def print_peak_rss_rise(shape_name: str, tokens: int, name: str, threads: int, precision: str) -> None:
    """The fresh process behind `peak_rss_rise` (`python -m infmoe.bench --peak-of ...`):
    one forward+backward of the variant, and the rise of the peak resident set, in bytes,
    printed as the last word of stdout."""
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
