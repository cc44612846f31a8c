"""`infmoe bench`: what the FFN variants cost, as ratios measured in one process.

Layer table, per shape: forward and forward+backward time and memory of a dense MLP of the
∞-MoE's *active* width (the baseline, ratio 1), a dense MLP of the full width H, ∞-MoE on
the masked reference path, ∞-MoE on the sparse path at K = 1, 2, 4, 8 (with the measured
union of the K masks), and a top-k MoE of equal total and active width. Achieved GFLOP/s
is set against a plain matmul of the same FLOPs timed in the same run: the most this
machine does with one matrix product, our "physical limit".

Model table: whole-model training tokens/s (forward, backward, AdamW step) of the dense,
top-k MoE and ∞-MoE configs of a size, as ratios to the dense model.

Timing: all variants in one process, alternated within each repeat (order rotated) so
drift in the machine's speed hits them alike; the median over repeats. Memory: bytes
autograd keeps between forward and backward (``saved``) and the rise of peak resident
memory over one forward+backward in a fresh process (``peak``; CPU only).

Precision: the forwards run under the autocast a training run of the same ``precision``
setting uses (`infmoe.device`; "auto" is bf16 on CUDA, fp32 on the CPU), since that is
what a user pays for; each row records the dtype its matrix products actually ran in.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from infmoe.device import autocast_for, uses_bf16
from infmoe.io import write_text
from infmoe.layers import DenseMLP, InfiniteMoE, TopKMoE
from infmoe.models import build_model, get_config


@dataclass(frozen=True)
class Shape:
    """A layer shape: model width d, ∞-MoE width H, tokens per call, ∞-MoE block size."""

    name: str
    d_model: int
    d_hidden: int
    tokens: int
    block_size: int
    d_z: int


SHAPES = {
    "tiny": Shape("tiny", 192, 1536, 2048, 64, 16),
    "gpt2-small": Shape("gpt2-small", 768, 6144, 2048, 256, 48),
    "quick": Shape("quick", 128, 1024, 256, 64, 16),
}
BASELINE = "dense, active width"


def layer_variants(shape: Shape) -> dict[str, Callable[[], torch.nn.Module]]:
    """name → constructor, at the shape's widths (N = 50%, so active width = H / 2)."""
    d, h, b = shape.d_model, shape.d_hidden, shape.block_size

    def infmoe(impl: str, k: int) -> Callable[[], torch.nn.Module]:
        return lambda: InfiniteMoE(d, h, d_z=shape.d_z, block_size=b, n_samples=k, impl=impl)

    table = {
        BASELINE: lambda: DenseMLP(d, h // 2),
        "dense, full width H": lambda: DenseMLP(d, h),
        f"∞-MoE masked B={b} K=1": infmoe("masked", 1),
    }
    table |= {f"∞-MoE sparse B={b} K={k}": infmoe("sparse", k) for k in (1, 2, 4, 8)}
    table |= {"top-k MoE 4 of 8 (grouped)": lambda: TopKMoE(d, h, n_experts=8, top_k=4)}
    return table


def fixed_noise(layer: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same ∞-MoE draws on every call, so repeats time the same work."""
    if not isinstance(layer, InfiniteMoE):
        return {}
    g = torch.Generator().manual_seed(0)
    return {"noise": torch.randn(layer.n_samples, x.shape[0], layer.d_z, generator=g).to(x.device)}


Autocast = Callable[[], contextlib.AbstractContextManager]


def layer_step(layer: torch.nn.Module, x: torch.Tensor, backward: bool,
               autocast: Autocast = contextlib.nullcontext) -> Callable[[], None]:
    """One forward (and backward) of `layer` on x (T, d), the forward under `autocast`.
    The output gradient is a real tensor: ``y.sum().backward()`` would hand matmuls a
    stride-0 gradient, which sends the dense MLP's backward to a slow kernel."""
    kwargs = fixed_noise(layer, x)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)

    def step() -> None:
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        if backward:
            with autocast():
                y = layer(x, **kwargs)
            y.backward(dy)
        else:
            with torch.no_grad(), autocast():
                layer(x, **kwargs)
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    return step


class _MatmulFlops(TorchDispatchMode):
    """Multiply-adds of the matrix products run inside it, per input dtype: seen below
    autocast, so these are the dtypes the kernels got."""

    def __init__(self) -> None:
        super().__init__()
        self.by_dtype: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket
        if op in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten._grouped_mm):
            a, b = args[1:3] if op is torch.ops.aten.addmm else args[:2]
            # (rows, k) x (.., k, n), and (m, rows) x (rows, n) for grouped weight gradients
            macs = a.shape[:-1].numel() * a.shape[-1] * b.shape[-1]
            self.by_dtype[a.dtype] = self.by_dtype.get(a.dtype, 0) + macs
        return func(*args, **(kwargs or {}))


def compute_dtype(fn: Callable[[], object]) -> str:
    """The dtype that carried most of the matmul work while fn ran, e.g. "bfloat16"."""
    with _MatmulFlops() as seen:
        fn()
    return str(max(seen.by_dtype, key=seen.by_dtype.get)).removeprefix("torch.") if seen.by_dtype else "none"


def time_all(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each step, the steps alternated within each repeat."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        steps[n]()  # warm-up: lazy initialisation, allocator
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def saved_bytes(layer: torch.nn.Module, x: torch.Tensor, autocast: Autocast = contextlib.nullcontext) -> int:
    """Bytes autograd keeps from forward to backward, parameters and the input excluded."""
    known = {p.data_ptr() for p in layer.parameters()} | {x.data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in known:
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        layer(x, **fixed_noise(layer, x))
    return sum(seen.values())


def peak_rss_rise(shape: Shape, name: str, threads: int, precision: str = "fp32") -> int:
    """Run variant `name` once in a fresh process; the rise of its peak resident set in
    bytes. glibc maps each block over 64 KiB on its own and unmaps it when freed, so the
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
    layer = layer_variants(shape)[name]()
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


def build_layers(shape: Shape, device: torch.device) -> tuple[dict[str, torch.nn.Module], torch.Tensor]:
    """The layer table's layers (name → layer, seeded) and its input x (tokens, d)."""
    torch.manual_seed(0)
    layers = {name: build().to(device) for name, build in layer_variants(shape).items()}
    return layers, torch.randn(shape.tokens, shape.d_model, requires_grad=True, device=device)


def layer_table(shape: Shape, repeats: int, memory: bool, device: torch.device, peak: bool = True,
                precision: str = "fp32") -> list[dict]:
    autocast = autocast_for(precision, device)
    layers, x = build_layers(shape, device)
    fwd = time_all({n: layer_step(m, x, False, autocast) for n, m in layers.items()}, repeats)
    fwd_bwd = time_all({n: layer_step(m, x, True, autocast) for n, m in layers.items()}, repeats)
    dtype = torch.bfloat16 if uses_bf16(precision, device) else torch.float32
    limit = matmul_limit(shape.tokens, shape.d_model, shape.d_hidden, repeats, device, dtype)
    base = fwd_bwd[BASELINE]
    rows = []
    for name, layer in layers.items():
        ran = compute_dtype(layer_step(layer, x, False, autocast))
        union = layer.aux.stats.get("union_fraction")
        union = None if union is None else float(union)
        # What the method needs (the measured union of blocks for ∞-MoE, whichever path
        # ran), so GFLOP/s shows how well each layer computes it; backward = 2 x forward.
        flops = 3 * shape.tokens * layer.flops_per_token(getattr(layer, "n_samples", 1), union=union)
        row = dict(shape=shape.name, variant=name, union=union, dtype=ran, fwd_ms=1e3 * fwd[name],
                   fwd_bwd_ms=1e3 * fwd_bwd[name], vs_dense=fwd_bwd[name] / base,
                   gflops=flops / fwd_bwd[name] / 1e9, matmul_limit_gflops=limit)
        if memory:
            row["saved_mb"] = saved_bytes(layer, x, autocast) / 2**20
            on_cpu = peak and device.type == "cpu" and sys.platform == "linux"
            peak_bytes = peak_rss_rise(shape, name, torch.get_num_threads(), precision) if on_cpu else None
            row["peak_mb"] = None if peak_bytes is None else peak_bytes / 2**20
        rows.append(row)
    return rows


def model_variants(size: str) -> dict[str, dict]:
    """label → build_model arguments: <size>-{dense,moe,infmoe}, and ∞-MoE again with the
    layer table's block size where the named config routes finer (gpt2-small: per unit)."""
    variants = {f"{size}-{ffn}": dict(name_or_config=f"{size}-{ffn}") for ffn in ("dense", "moe", "infmoe")}
    block = SHAPES[size].block_size
    if get_config(f"{size}-infmoe").ffn_options.get("block_size", 1) != block:
        variants[f"{size}-infmoe --block_size {block}"] = dict(name_or_config=f"{size}-infmoe", block_size=block)
    return variants


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
            if device.type == "cuda":
                torch.cuda.synchronize()

        def forward(model=model, idx=idx) -> None:
            with torch.no_grad(), autocast():
                model(idx[:1])

        steps[label], dtypes[label] = step, compute_dtype(forward)
    times = time_all(steps, repeats)
    dense = times[f"{size}-dense"]
    return [dict(config=name, dtype=dtypes[name], tokens_per_s=batch * seq_len / t, vs_dense=dense / t,
                 step_ms=1e3 * t) for name, t in times.items()]


def run(shapes: list[str], *, repeats: int, memory: bool, models: list[tuple[str, int, int]],
        device: torch.device, peak: bool = True, precision: str = "fp32") -> dict:
    """Layer rows for each shape and model rows for each (size, batch, seq_len), the
    forwards under the autocast that `precision` means on `device`."""
    layers = [row for s in shapes for row in layer_table(SHAPES[s], repeats, memory, device, peak, precision)]
    model_rows = [row for size, batch, seq in models
                  for row in model_table(size, repeats, batch, seq, device, precision)]
    ran = sorted({row["dtype"] for row in layers + model_rows})
    machine = dict(torch=torch.__version__, threads=torch.get_num_threads(), device=str(device),
                   processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                   gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                   precision=precision, dtype=ran[0] if len(ran) == 1 else "mixed: " + ", ".join(ran))
    return dict(machine=machine, repeats=repeats, layers=layers, models=model_rows)


def sparse_grid(shape: Shape, repeats: int, blocks=(32, 64, 128, 256, 512), samples=(1, 2, 4, 8),
                precision: str = "fp32") -> str:
    """Forward+backward time of the sparse path over the masked path for each B and K, on
    the CPU: the data behind `InfiniteMoE.uses_sparse`, as a markdown table."""
    x = torch.randn(shape.tokens, shape.d_model, requires_grad=True)
    autocast = autocast_for(precision, x.device)

    def layer(b: int, k: int, impl: str) -> InfiniteMoE:
        return InfiniteMoE(shape.d_model, shape.d_hidden, d_z=shape.d_z, block_size=b, n_samples=k, impl=impl)

    steps = {"masked": layer_step(layer(256, 1, "masked"), x, True, autocast)}
    steps |= {(b, k): layer_step(layer(b, k, "sparse"), x, True, autocast) for b in blocks for k in samples}
    times = time_all(steps, repeats)
    ran = dtype_label({"dtype": compute_dtype(steps["masked"])})
    lines = [f"fwd+bwd sparse / masked, {shape.name} shape (d={shape.d_model}, H={shape.d_hidden}, "
             f"{shape.tokens} tokens), {ran}, median of {repeats}", "",
             "| B | " + " | ".join(f"K={k}" for k in samples) + " |", "|---" * (len(samples) + 1) + "|"]
    lines += ["| " + " | ".join([str(b)] + [f"{times[(b, k)] / times['masked']:.2f}" for k in samples]) + " |"
              for b in blocks]
    return "\n".join(lines) + "\n"


DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16 autocast", "float16": "fp16 autocast", "float64": "fp64"}


def dtype_label(machine: dict) -> str:
    """How the header names the dtype that ran. Results saved before the field existed
    were all fp32: the bench had no other mode then."""
    dtype = machine.get("dtype", "float32")
    return DTYPE_LABELS.get(dtype, dtype)


def markdown(result: dict) -> str:
    """The result as markdown tables."""
    m = result["machine"]
    lines = [f"{m['device']} ({m['gpu'] or m['processor']}), {m['threads']} threads, torch {m['torch']}, "
             f"{dtype_label(m)}; median of {result['repeats']} repeats, variants alternated", ""]
    if result["layers"]:
        lines += ["| shape | variant | union | fwd ms | fwd+bwd ms | vs dense (active) | GFLOP/s | of matmul limit"
                  " | saved MB | peak MB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["layers"]:
            cells = [r["shape"], r["variant"], _fmt(r["union"], ".3f"), f"{r['fwd_ms']:.1f}", f"{r['fwd_bwd_ms']:.1f}",
                     f"{r['vs_dense']:.2f}", f"{r['gflops']:.0f}", f"{r['gflops'] / r['matmul_limit_gflops']:.0%}",
                     _fmt(r.get("saved_mb"), ".0f"), _fmt(r.get("peak_mb"), ".0f")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if result["models"]:
        lines += ["| config | training tokens/s | vs dense | ms/step |", "|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['tokens_per_s']:.0f} | {r['vs_dense']:.2f} | {r['step_ms']:.0f} |"
                  for r in result["models"]]
    checks = targets(result)
    if checks:
        lines += ["", *checks]
    return "\n".join(lines) + "\n"


def targets(result: dict) -> list[str]:
    """The speed targets of docs/speed.md, checked against the rows of `result` (markdown lines)."""
    rows = {(r["shape"], r["variant"]): r for r in result["layers"]}
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in result["layers"]):
        b = SHAPES[shape].block_size
        get = {name: rows.get((shape, name)) for name in
               (BASELINE, "dense, full width H", f"∞-MoE masked B={b} K=1", f"∞-MoE sparse B={b} K=1",
                f"∞-MoE sparse B={b} K=8")}
        if None in get.values():
            continue
        dense, full, masked, k1, k8 = get.values()
        checks = [
            ("sparse K=1 / equal-active dense, fwd+bwd", k1["fwd_bwd_ms"] / dense["fwd_bwd_ms"], 1.3),
            ("sparse K=1 / masked, fwd+bwd", k1["fwd_bwd_ms"] / masked["fwd_bwd_ms"], 0.6),
            ("sparse K=8 / full-width dense, fwd+bwd", k8["fwd_bwd_ms"] / full["fwd_bwd_ms"], 1.1),
        ]
        if dense.get("peak_mb") and k1.get("peak_mb") and k8.get("peak_mb"):
            checks += [("peak memory, sparse K=1 / equal-active dense", k1["peak_mb"] / dense["peak_mb"], 1.5),
                       ("peak memory, sparse K=8 / equal-active dense", k8["peak_mb"] / dense["peak_mb"], 1.5)]
        lines += [f"| {shape} | {name} | {value:.2f} | <= {limit} | {'yes' if value <= limit else 'no'} |"
                  for name, value, limit in checks]
    for r in result["models"]:
        if "infmoe" in r["config"]:
            lines.append(f"| model | {r['config']} training tokens/s / dense | {r['vs_dense']:.2f} | >= 0.75 | "
                         f"{'yes' if r['vs_dense'] >= 0.75 else 'no'} |")
    return ["| shape | ratio | measured | target | met |", "|---|---|---|---|---|", *lines] if lines else []


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def save(result: dict, json_path: str | None, markdown_path: str | None) -> None:
    if json_path:
        write_text(json_path, json.dumps(result, indent=1) + "\n")
    if markdown_path:
        write_text(markdown_path, markdown(result))


if __name__ == "__main__":  # the fresh process behind peak_rss_rise
    if sys.argv[1:2] == ["--peak-of"]:
        _child_peak(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
