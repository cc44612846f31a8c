"""The bench's tables, each row a ratio to a baseline timed in the same run, and `run`,
which makes them all; `sparse_grid`, the sparse path over the full one per B and K."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import platform
import sys

import torch
from torch import nn

from infmoe.bench.harness import (Autocast, compute_dtype, cycling, eager, executed_flops, layer_step,
                                  matmul_limit, ran_path, time_all, union_of)
from infmoe.bench.memory import (CACHE_FACTOR, l3_cache_bytes, parameter_bytes, peak_rss_rise, saved_bytes,
                                 weight_copies)
from infmoe.bench.peers import transformers_version
from infmoe.bench.rendering import dtype_label
from infmoe.bench.variants import (BASELINE, CONFIGURED, DECODE_TOKENS, FULL, GENERATE_TOKENS, GRID_BLOCKS,
                                   GRID_SAMPLES, SAVED_SAMPLES, SAVED_TOKENS, SHAPES, Shape, compile_variants,
                                   compiled_label, decode_variants, generation_variants, infmoe_builder,
                                   infmoe_label, layer_variants, model_variants)
from infmoe.device import autocast_for, synchronize, uses_bf16
from infmoe.generation import generate
from infmoe.layers import InfiniteMoE, sampling
from infmoe.markdown import markdown_table
from infmoe.models import build_model
from infmoe.training.step import train_step

# Calls per repeat: a one-token call takes about a millisecond, where one stall of the
# machine moves a single timing most, so it gets the most calls.
DECODE_CALLS = {1: 10, 16: 4, 128: 2}
# A whole generation is hundreds of calls, so its median over a few runs is steadier than
# one layer call's over many; three keep the gpt2-small runs to minutes.
GENERATE_REPEATS = 3
PROMPT_TOKENS = 8
# torch.compile's backend for the compiled rows (inductor, its default; tests use a cheaper one)
COMPILE_BACKEND = "inductor"


def build_layers(shape: Shape, device: torch.device) -> tuple[dict[str, nn.Module], torch.Tensor]:
    """The training table's layers (name → layer, seeded) and its input x (tokens, d)."""
    torch.manual_seed(0)
    layers = {name: build().to(device) for name, build in layer_variants(shape).items()}
    return layers, torch.randn(shape.tokens, shape.d_model, requires_grad=True, device=device)


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
        path, union = ran_path(layer), union_of(layer)  # what the last timed call ran
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


def decode_table(shape: Shape, repeats: int, tokens: tuple[int, ...], device: torch.device) -> list[dict]:
    """One row per `decode_variants(shape)` and T in `tokens`: ms per no-grad call on T
    tokens, each call on the next of the variant's copies (weights from memory, see
    `infmoe.bench`), as ratios to both dense MLPs; median of repeats × `DECODE_CALLS`.
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
            path, union = ran_path(cs[0]), union_of(cs[0])  # what its timed calls ran
            rows.append(dict(shape=shape.name, tokens=t, variant=name, path=path, union=union,
                             dtype=compute_dtype(layer_step(cs[0], x, False)), copies=len(cs),
                             copy_bytes=parameter_bytes(cs[0]),
                             budget_bytes=budget, calls=calls, ms=1e3 * times[name],
                             vs_dense=times[name] / times[BASELINE], vs_full=times[name] / times[FULL]))
    return rows


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
            synchronize(device)

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
        synchronize(device)

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
            layer = InfiniteMoE(shape.d_model, shape.d_hidden, d_z=shape.d_z, units_per_block=b, n_samples=k, impl=impl)
            steps[impl] = layer_step(layer, x, True, autocast)
        times = time_all(steps, repeats)
        ratios[b, k] = times["sparse"] / times["full"]
        ran.add(compute_dtype(steps["full"]))
    label = dtype_label({"dtype": ran.pop() if len(ran) == 1 else "mixed"})
    lines = [f"fwd+bwd sparse / full, {shape.name} shape (d={shape.d_model}, H={shape.d_hidden}, "
             f"{shape.tokens} tokens), {label}, median of {repeats}", ""]
    lines += markdown_table(["B", *(f"K={k}" for k in samples)],
                            [[str(b), *(f"{ratios[b, k]:.2f}" for k in samples)] for b in blocks]) + [""]
    return "\n".join(lines)
