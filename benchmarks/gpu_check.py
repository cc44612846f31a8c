"""The one prepared GPU check: everything this project wants to know from a GPU, in one command.

    python benchmarks/gpu_check.py                     # on a CUDA machine: docs/gpu.md + docs/gpu.json
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu-check   # dry run, any machine
    python benchmarks/gpu_check.py --only tests,profile --out /tmp/gpu-check   # rerun some stages

Stages, each in a fresh process with its own time budget (seconds on one H100/H200):

1. environment (20): torch, CUDA, GPU, memory, bf16, `torch._grouped_mm` (and whether it
   runs in bf16 here), CPU threads, the project's dependencies.
2. tests (90): the suite's own tests on the GPU: ``python -m pytest -q tests/layers -k cuda``
   (the layer tests' CUDA cases: every path against its reference, on this device), then
   ``python -m pytest -q tests/models/test_compile.py`` (whole models compile, and read
   nothing on the host). The CPU dry run runs ``tests/layers/test_dispatch.py -k cpu``.
3. bench (55): ``python -m infmoe.cli bench --device cuda --precision bf16 --shapes gpt2-small
   --models '' --tokens 16384``: the layer, saved-for-backward and decoding tables at a
   GEMM-bound size, their markdown embedded.
4. compile (120): the same with ``--compile --models tiny``: compiled layers beside eager
   ones, and tiny models trained compiled against eager; the compiled targets.
5. training (50): 30 steps of gpt2-small dense, top-k MoE, ∞-MoE and ∞-MoE with B = 256 at
   16 × 1024 tokens per step (`infmoe.training.step.train_step`), steps 6-30 timed:
   tokens/s, MFU, peak memory.
6. profile (60): one training step of gpt2-small-infmoe at B = 1 and B = 256 under
   torch.profiler: kernel time by category (GEMM, attention, selection, gather/scatter/index,
   elementwise, other) and idle time against the step's wall time; device-to-host syncs per
   step; peak memory at K = 1 and K = 4.
7. generation (55): greedy decoding of 256 tokens with the KV cache, dense against ∞-MoE at
   K = 1, 4, 16 and mean mode.

The budgets sum to 450 s, so the whole run stays under 8 minutes. A stage that raises,
crashes or runs out of time is recorded as failed, with the error and the tail of its
output, and the next stage runs; what a stage finished before it failed is kept. The report
is rewritten after every stage (atomically), so even a run killed from outside leaves one.
Exit status: 0 when every stage passed, 1 when one failed, 2 for bad input (including
"no CUDA device here" without ``--device cpu``). docs/gpu_check.md says more.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's infmoe, installed or not

# stdlib only, both: the parent does not import torch before it must
from infmoe.io import write_text
from infmoe.markdown import markdown_table, number_cell

TOTAL_BUDGET_S = 450.0
# Dense bf16 tensor-core peaks in TFLOP/s (datasheet figures without sparsity), matched in
# this order against the device name; GH200's name contains "H200" and its GPU is H100-class.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0))
DEPENDENCIES = ("numpy", "pyyaml", "safetensors", "tokenizers", "tiktoken", "rich", "tqdm", "pytest")
TAIL_CHARS = 4000


# --------------------------------------------------------------------------- shared helpers


def run_command(cmd: list[str], timeout: float, own_group: bool = False) -> dict:
    """Run cmd from the repository root with stdout and stderr merged; never longer than
    `timeout`. own_group: the command gets a process group of its own, killed whole on
    timeout (the stage processes, whose own commands then die with them)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=own_group)
    def kill() -> None:
        if own_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()

    try:
        out, timed_out = proc.communicate(timeout=max(0.1, timeout))[0], False
    except subprocess.TimeoutExpired:
        kill()
        out, timed_out = proc.communicate()[0], True
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): leave nothing running on the GPU
        kill()
        raise
    return dict(rc=proc.returncode, seconds=time.perf_counter() - start, timed_out=timed_out,
                tail=(out or "")[-TAIL_CHARS:])


def stage_command(cmd: list[str], opts) -> dict:
    """`run_command` for a stage's own command, in the stage's time less a few seconds to
    report in."""
    return run_command(cmd, opts.deadline - time.time() - 3)


def check_time(done: dict, cmd: list[str]) -> None:
    if done["timed_out"]:
        raise TimeoutError(f"{shlex.join(cmd[1:])} ran out of the stage's time and was killed after "
                           f"{done['seconds']:.1f} s")


def describe(err: BaseException) -> dict:
    """An exception as the report shows it: type, its first lines, where it was raised."""
    lines = str(err).strip().splitlines() or [""]
    return dict(type=type(err).__name__, message="\n".join(lines[:5])[:1000],
                traceback="".join(traceback.format_exception(err)[-6:])[-TAIL_CHARS:])


def parse_model(label: str) -> tuple[str, dict]:
    """"gpt2-small-infmoe --units_per_block 256" → the config name and its overrides, read as
    ``infmoe train`` reads them."""
    from infmoe.cli import parse_overrides

    name, *rest = shlex.split(label)
    return name, parse_overrides(rest)


def peak_tflops(gpu: str | None) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if gpu and key in gpu), None)


def failed_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("ok") is False]


# --------------------------------------------------------------------------- 1. environment


def environment(opts) -> Iterator[dict]:
    import torch

    device = torch.device(opts.device)
    info: dict[str, object] = dict(python=platform.python_version(), torch=torch.__version__,
                                   cuda=torch.version.cuda, cpu_threads=torch.get_num_threads(), cpus=os.cpu_count(),
                                   grouped_mm=hasattr(torch, "_grouped_mm"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= dict(gpu=props.name, gpus=torch.cuda.device_count(), memory_gib=round(props.total_memory / 2**30, 1),
                     capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                     bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version(),
                     tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                     float32_matmul_precision=torch.get_float32_matmul_precision())
        smi = run_command(["nvidia-smi", "--query-gpu=driver_version,power.limit,clocks.max.sm",
                           "--format=csv,noheader"], 10) if shutil.which("nvidia-smi") else None
        info["nvidia_smi"] = smi["tail"].strip() if smi and smi["rc"] == 0 else "unavailable"
    else:
        info |= dict(gpu=None, processor=platform.processor() or platform.machine())
    info["peak_bf16_tflops"] = peak_tflops(info.get("gpu"))
    info["grouped_mm_bf16"] = _probe_grouped_mm(device) if info["grouped_mm"] else "absent"
    for dist in DEPENDENCIES:
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = "missing"
    for item, value in info.items():
        yield dict(item=item, value=value)


def _probe_grouped_mm(device) -> str:
    """Whether `torch._grouped_mm` runs in bf16 on `device`, with the weights row-major and
    column-major (kernels have required either; ∞-MoE's w_in is a column-major view), and
    how far each lands from per-group fp32 products of the same bf16 inputs."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, generator=g).to(device, torch.bfloat16)
    b = torch.randn(4, 32, 16, generator=g).to(device, torch.bfloat16)
    offs = torch.tensor([16, 32, 48, 64], dtype=torch.int32, device=device)
    want = torch.cat([a[16 * i: 16 * (i + 1)].float() @ b[i].float() for i in range(4)])
    answers = []
    for layout, weights in [("row-major", b), ("column-major", b.transpose(1, 2).contiguous().transpose(1, 2))]:
        try:
            got = torch._grouped_mm(a, weights, offs=offs).float()
            answers.append(f"{layout}: runs, relative error {((got - want).norm() / want.norm()).item():.1e}")
        except Exception as err:  # the answer is the point: which error this torch gives here
            answers.append(f"{layout}: fails, {type(err).__name__}: {_one_line(str(err))}")
    return "; ".join(answers)


def environment_table(rows: list[dict]) -> list[str]:
    return markdown_table(["item", "value"], [[r["item"], f"`{r['value']}`"] for r in rows]) + [""]


def environment_summary(rows: list[dict]) -> list[str]:
    info = {r["item"]: r["value"] for r in rows}
    where = f"{info['gpu']} ({info.get('memory_gib')} GiB, sm {info.get('capability')})" if info.get("gpu") else "CPU"
    missing = [d for d in DEPENDENCIES if info.get(d) == "missing"]
    return [f"environment: {where}, torch {info['torch']}, CUDA {info['cuda']}; torch._grouped_mm in bf16: "
            f"{info.get('grouped_mm_bf16')}" + (f"; missing packages: {', '.join(missing)}" if missing else "")]


# --------------------------------------------------------------------------- 2. tests

# The layer tests take a `device` fixture, "cpu" always and "cuda" where a GPU is (tests/layers/
# conftest.py): on a GPU `-k cuda` selects exactly the CUDA cases of the very tests the CPU
# runs. Then the model tests that compile whole and read nothing on the host. The CPU dry run
# runs the dispatch rule's CPU cases: real tests, in seconds.
TEST_RUNS = {"cuda": (("tests/layers", "-k", "cuda"), ("tests/models/test_compile.py",)),
             "cpu": (("tests/layers/test_dispatch.py", "-k", "cpu"),)}
PYTEST = ("-m", "pytest", "-q")
COUNTS = ("passed", "failed", "skipped", "deselected", "errors")


def tests_shown(opts) -> list[str]:
    """The tests stage's commands as a user types them."""
    return [shlex.join(["python", *PYTEST, *args]) for args in TEST_RUNS[opts.device]]


def tests(opts) -> Iterator[dict]:
    for args, shown in zip(TEST_RUNS[opts.device], tests_shown(opts)):
        cmd = [sys.executable, *PYTEST, "-p", "no:cacheprovider", *args]
        done = stage_command(cmd, opts)
        counts = dict.fromkeys(COUNTS, 0)
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)\b", done["tail"]):
            counts["errors" if word.startswith("error") else word] = int(n)
        # A run where every case skipped or was deselected has checked nothing.
        yield dict(counts, command=shown, rc=done["rc"], timed_out=done["timed_out"], seconds=done["seconds"],
                   tail=done["tail"], ok=done["rc"] == 0 and counts["passed"] > 0)
        check_time(done, cmd)


def tests_table(rows: list[dict]) -> list[str]:
    lines = markdown_table(["command", *COUNTS, "exit status", "seconds"],
                           [[f"`{r['command']}`", *(str(r[c]) for c in COUNTS),
                             str(r["rc"]) + (" (timed out)" if r["timed_out"] else ""), f"{r['seconds']:.1f}"]
                            for r in rows]) + [""]
    for r in rows:
        lines += [f"Tail of `{r['command']}`:", "", "```", *r["tail"].strip().splitlines()[-15:], "```", ""]
    return lines


def tests_summary(rows: list[dict]) -> list[str]:
    return [f"tests: `{r['command']}`: {r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped, "
            f"{r['errors']} errors" for r in rows]


def _one_line(text: str) -> str:
    return text.splitlines()[0].replace("|", "\\|")[:200] if text else ""


# --------------------------------------------------------------------------- 3. bench, 4. compile

# Layer shapes a GPU runs GEMM-bound: 16 × 1024 tokens per call, as the training stage's steps.
GPU_TOKENS = 16 * 1024


def bench_command(opts, json_path: str = "bench-gpu.json", markdown_path: str = "bench-gpu.md",
                  compile: bool = False) -> list[str]:
    """`infmoe bench` for the bench stage (eager: layer, saved-for-backward and decoding tables;
    the whole models are the training and generation stages' work), or with `compile` for the
    compile stage (compiled layers beside eager ones, and the tiny models compiled)."""
    if opts.quick:  # the smallest run the bench's command line allows
        sizes = ["--shapes", "quick", "--models", "", "--repeats", "1", "--no-memory"]
    elif compile:
        sizes = ["--shapes", "gpt2-small", "--models", "tiny", "--tokens", str(GPU_TOKENS), "--no-memory"]
    else:
        sizes = ["--shapes", "gpt2-small", "--models", "", "--tokens", str(GPU_TOKENS)]
    return ["-m", "infmoe.cli", "bench", *["--compile"] * compile, "--device", opts.device, "--precision",
            opts.precision, *sizes, "--json", json_path, "--markdown", markdown_path]


def bench(opts, compile: bool = False) -> Iterator[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(Path(tmp) / "bench.json"), str(Path(tmp) / "bench.md")]
        cmd = [sys.executable, *bench_command(opts, *paths, compile=compile)]
        done = stage_command(cmd, opts)
        files = [Path(p).read_text() if Path(p).exists() else None for p in paths]
    yield dict(rc=done["rc"], timed_out=done["timed_out"], seconds=done["seconds"], tail=done["tail"],
               result=json.loads(files[0]) if files[0] else None, markdown=files[1], ok=done["rc"] == 0)
    check_time(done, cmd)


def bench_compiled(opts) -> Iterator[dict]:
    return bench(opts, compile=True)


def bench_table(rows: list[dict]) -> list[str]:
    r = rows[0]
    if r["markdown"]:
        return [r["markdown"].strip(), ""]
    return [f"No tables: exit status {r['rc']}{' (timed out)' if r['timed_out'] else ''}. Tail of the output:", "",
            "```", *r["tail"].strip().splitlines()[-25:], "```", ""]


def bench_summary(rows: list[dict], stage: str = "bench") -> list[str]:
    md = rows[0]["markdown"] or ""
    header = md.splitlines()[0] if md else "no output"
    lines = [f"{stage}: {header}; targets met: {md.count('| yes |')}, missed: {md.count('| no |')}"]
    result = rows[0]["result"] or {}
    failed = [r.get("variant") or r["config"] for r in result.get("layers", []) + result.get("models", [])
              if "error" in r]
    return lines + ([f"{stage}: did not compile: {', '.join(failed)}"] if failed else [])


def compile_summary(rows: list[dict]) -> list[str]:
    return bench_summary(rows, "compile")


# --------------------------------------------------------------------------- 5. training


def train_models(opts) -> list[str]:
    if opts.train_configs:
        return [label.strip() for label in opts.train_configs.split(",")]
    size = "tiny" if opts.quick else "gpt2-small"
    return [f"{size}-dense", f"{size}-moe", f"{size}-infmoe", f"{size}-infmoe --units_per_block 256"]


# quick: tokens per step, steps, warm-up steps, and a model small enough for seconds on a CPU
TRAIN = {"full": dict(tokens=GPU_TOKENS, steps=30, warmup=5), "quick": dict(tokens=2 * 64, steps=4, warmup=1)}
QUICK_MODEL = dict(n_layer=1, d_model=64, n_head=2, vocab_size=512, n_ctx=64)


def training(opts) -> Iterator[dict]:
    import torch

    from infmoe.device import autocast_for, uses_bf16

    device = torch.device(opts.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_tflops(gpu) if uses_bf16(opts.precision, device) else None
    dense = None
    for label in train_models(opts):
        row = dict(config=label, precision="bf16 autocast" if uses_bf16(opts.precision, device) else "fp32")
        try:
            row |= _train(label, opts, device, autocast_for(opts.precision, device))
        except Exception as err:  # recorded; the next config still runs
            row |= dict(error=describe(err), ok=False)
        if "tokens_per_s" in row:
            dense = row["tokens_per_s"] if dense is None and "-dense" in label else dense
            row["vs_dense"] = row["tokens_per_s"] / dense if dense else None
            flops = row["tokens_per_s"] * 1e9
            row["mfu"] = flops * row["gflops_per_token"] / (peak * 1e12) if peak else None
            row["executed_of_peak"] = flops * row["executed_gflops_per_token"] / (peak * 1e12) if peak else None
        row["peak_tflops"] = peak
        yield row
        if device.type == "cuda":
            torch.cuda.empty_cache()


def build(label: str, opts, device, **overrides):
    """The model `label` names (quick: shrunk to `QUICK_MODEL`), seeded, on `device`; its
    optimizer as training builds it; and the training config behind both."""
    import torch

    from infmoe.models import build_model
    from infmoe.training.config import TrainConfig
    from infmoe.training.optim import build_optimizer

    name, options = parse_model(label)
    torch.manual_seed(0)
    model = build_model(name, **(QUICK_MODEL if opts.quick else {}), **options, **overrides).to(device)
    cfg = TrainConfig()
    return model, build_optimizer(model, cfg), cfg


def flops_per_token(model, k: int, device, dtype) -> dict[str, float]:
    """Training GFLOP per token (3 × the forward): what the method needs ("model", the MFU's
    numerator) and what the path training takes on `device` in `dtype` executes ("executed";
    the FFNs' own count, `infmoe.bench.executed_flops`)."""
    from infmoe.bench import executed_flops
    from infmoe.params import model_flops_per_token

    needed = model_flops_per_token(model, k)
    extra = sum(executed_flops(f, k, None, device, dtype) - f.flops_per_token(k) for f in model.ffn_layers())
    return dict(model=3 * needed / 1e9, executed=3 * (needed + extra) / 1e9)


def _train(label: str, opts, device, autocast) -> dict:
    """Training throughput of one config; on running out of GPU memory the same tokens per
    step again as more, smaller micro-batches (gradient accumulation)."""
    import torch

    from infmoe.device import uses_bf16

    plan = TRAIN["quick" if opts.quick else "full"]
    model, optimizer, cfg = build(label, opts, device)
    seq = min(model.config.n_ctx, 64 if opts.quick else 1024)
    k = max([getattr(f, "n_samples", 1) for f in model.ffn_layers()])
    flops = flops_per_token(model, k, device, torch.bfloat16 if uses_bf16(opts.precision, device) else torch.float32)
    sequences, oom = plan["tokens"] // seq, []
    for accum in (1, 2, 4, 8):
        try:
            measured = _train_steps(model, optimizer, cfg, sequences // accum, accum, seq, plan, device, autocast)
            break
        except torch.cuda.OutOfMemoryError:
            oom.append(sequences // accum)
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    else:
        raise torch.cuda.OutOfMemoryError(f"out of memory even at micro-batch {oom[-1]} x {seq}")
    return measured | dict(micro_batch=sequences // accum, grad_accum=accum, seq_len=seq, oom_at=oom,
                           tokens_per_step=sequences * seq, gflops_per_token=flops["model"],
                           executed_gflops_per_token=flops["executed"])


def random_batches(model, micro: int, accum: int, seq: int, device, generator) -> list[tuple]:
    """`accum` micro-batches (x, y) of `micro` random sequences of `seq` tokens."""
    import torch

    idx = [torch.randint(0, model.config.vocab_size, (micro, seq + 1), device=device, generator=generator)
           for _ in range(accum)]
    return [(i[:, :-1], i[:, 1:]) for i in idx]


def _train_steps(model, optimizer, cfg, micro: int, accum: int, seq: int, plan: dict, device, autocast) -> dict:
    """The training loop's step (`infmoe.training.step.train_step`) on random tokens; the
    steps after the warm-up timed between synchronisations."""
    import torch

    from infmoe.device import synchronize
    from infmoe.training.step import train_step

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator(device).manual_seed(0)
    losses = []
    for step in range(plan["steps"]):
        if step == plan["warmup"]:
            synchronize(device)
            start = time.perf_counter()
        batches = random_batches(model, micro, accum, seq, device, g)
        loss = train_step(model, model, optimizer, batches, grad_clip=cfg.grad_clip, autocast=autocast)
        if step in (0, plan["steps"] - 1):
            losses.append(loss.item())
    synchronize(device)
    timed = plan["steps"] - plan["warmup"]
    seconds = (time.perf_counter() - start) / timed
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(step_ms=1e3 * seconds, tokens_per_s=micro * accum * seq / seconds, timed_steps=timed,
                peak_mem_gib=peak, loss_first=losses[0], loss_last=losses[-1], ok=all(map(math.isfinite, losses)))


def training_table(rows: list[dict]) -> list[str]:
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["config"], r["precision"], f"{r['error']['type']}: {_one_line(r['error']['message'])}",
                          *["-"] * 8])
            continue
        cells.append([r["config"], r["precision"], f"{r['micro_batch']} x {r['seq_len']} x {r['grad_accum']}",
                      f"{r['tokens_per_s']:.0f}", number_cell(r["vs_dense"], ".2f"), f"{r['step_ms']:.1f}",
                      f"{r['gflops_per_token']:.3g}", number_cell(r["mfu"], ".1%"),
                      number_cell(r["executed_of_peak"], ".1%"), number_cell(r["peak_mem_gib"], ".1f"),
                      f"{r['loss_first']:.3f} → {r['loss_last']:.3f}"])
    return markdown_table(["config", "precision", "batch x seq x accum", "tokens/s", "vs dense", "ms/step",
                           "training GFLOP/token", "MFU", "executed FLOPs / peak", "peak GiB", "loss first → last"],
                          cells) + [""]


def training_summary(rows: list[dict]) -> list[str]:
    done = [r for r in rows if "tokens_per_s" in r]
    lines = [f"training: {r['config']} {r['tokens_per_s']:.0f} tokens/s "
             f"({number_cell(r['vs_dense'], '.2f')} x dense"
             + (f", MFU {r['mfu']:.1%})" if r["mfu"] is not None else ")") for r in done]
    if done and done[0]["peak_tflops"] is None:
        lines.append("training: MFU omitted: no bf16 peak is known for this device (or it ran without bf16)")
    return lines


# --------------------------------------------------------------------------- 6. profile

# One training step of the ∞-MoE config at each block size (B = 1: per unit; B = 256: blocks),
# at the training stage's tokens per step, under the stage's precision (bf16 autocast on CUDA).
PROFILE = {"full": dict(config="gpt2-small-infmoe", tokens=GPU_TOKENS, seq=1024),
           "quick": dict(config="tiny-infmoe", tokens=2 * 64, seq=64)}
PROFILE_BLOCKS = (1, 256)
PROFILE_SAMPLES = (1, 4)  # peak memory at each K
WALL_STEPS = 3
# CUDA kernels (or, on the CPU, aten operators) by name, into the first category that matches;
# the rest is "other": reductions, norms, softmax, the loss, copies between devices, memset.
KERNEL_CATEGORIES = (
    ("attention", r"flash|fmha|attention|sdpa"),
    ("GEMM", r"gemm|gemv|nvjet|xmma|cutlass|cublas|matmul|splitk|\b(add|b)?mm\b|grouped_mm"),
    ("selection", r"topk|sort|radix|bitonic"),
    ("gather/scatter/index", r"gather|scatter|index|embedding|nonzero"),
    ("elementwise", r"elementwise|triton_poi|pointwise|multi_tensor|foreach|gelu|tanh|add|mul|div|copy|fill|where"),
)
CATEGORIES = (*(name for name, _ in KERNEL_CATEGORIES), "other")


def kernel_category(name: str) -> str:
    return next((cat for cat, pattern in KERNEL_CATEGORIES if re.search(pattern, name, re.IGNORECASE)), "other")


def profile(opts) -> Iterator[dict]:
    import torch

    from infmoe.device import autocast_for

    device = torch.device(opts.device)
    plan = PROFILE["quick" if opts.quick else "full"]
    for block in PROFILE_BLOCKS:
        row = dict(config=f"{plan['config']} --units_per_block {block}", block=block)
        try:
            row |= _profile(row["config"], plan, opts, device, autocast_for(opts.precision, device))
        except Exception as err:  # recorded; the next block size still runs
            row |= dict(error=describe(err), ok=False)
        yield row
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _profile(label: str, plan: dict, opts, device, autocast) -> dict:
    """Wall time (median of `WALL_STEPS` synchronised steps), kernel time per category from
    one profiled step, idle = wall - kernel time, the step's device-to-host syncs, and peak
    memory at each K of `PROFILE_SAMPLES`."""
    import torch
    from torch.profiler import ProfilerActivity

    from infmoe.device import synchronize
    from infmoe.layers import sampling
    from infmoe.training.step import train_step

    model, optimizer, cfg = build(label, opts, device)
    batches = random_batches(model, plan["tokens"] // plan["seq"], 1, plan["seq"], device,
                             torch.Generator(device).manual_seed(0))

    def step() -> None:
        train_step(model, model, optimizer, batches, grad_clip=cfg.grad_clip, autocast=autocast)

    step()  # lazy initialisation, the optimizer's state, kernel selection
    walls = []
    for _ in range(WALL_STEPS):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        walls.append(time.perf_counter() - start)
    wall = sorted(walls)[len(walls) // 2]
    cuda = device.type == "cuda"
    with torch.profiler.profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        step()
        synchronize(device)
    kernels = kernel_seconds(prof, cuda)
    syncs = count_syncs(step) if cuda else None
    peaks, paths = {}, {}
    for k in PROFILE_SAMPLES:
        with sampling(model, n_samples=k):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            step()
            synchronize(device)
        peaks[str(k)] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        paths[str(k)] = model.ffn_layers()[0].aux.path
    return dict(tokens=plan["tokens"], wall_ms=1e3 * wall, kernel_ms={c: 1e3 * t for c, t in kernels.items()},
                idle_ms=1e3 * (wall - sum(kernels.values())), kernels="CUDA kernels" if cuda else "CPU operators",
                syncs=None if syncs is None else len(syncs), sync_sites=_most_common(syncs) if syncs else [],
                peak_gib=peaks, paths=paths, ok=True)


def kernel_seconds(prof, cuda: bool) -> dict[str, float]:
    """Seconds per category of the profiled step: each CUDA kernel's time, or on the CPU each
    aten operator's self time (its children's excluded, so nothing counts twice)."""
    from torch.autograd import DeviceType

    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.key_averages():
        if cuda and event.device_type == DeviceType.CUDA:
            totals[kernel_category(event.key)] += event.self_device_time_total / 1e6
        elif not cuda and event.key.startswith("aten::"):
            totals[kernel_category(event.key)] += event.self_cpu_time_total / 1e6
    return totals


def count_syncs(step: Callable[[], None]) -> list[str]:
    """The places ("file:line") of the device-to-host synchronisations during one call of
    step: torch warns at each while its sync debug mode is "warn"."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]


def _most_common(sites: list[str], n: int = 5) -> list[str]:
    return [f"{site} ({count})" for site, count in Counter(sites).most_common(n)]


def profile_table(rows: list[dict]) -> list[str]:
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["config"], f"{r['error']['type']}: {_one_line(r['error']['message'])}",
                          *["-"] * (len(CATEGORIES) + 5)])
            continue
        share = {c: f"{ms:.1f} ({ms / r['wall_ms']:.0%})" for c, ms in r["kernel_ms"].items()}
        cells.append([r["config"], "/".join(r["paths"].values()), f"{r['wall_ms']:.1f}",
                      *(share[c] for c in CATEGORIES), f"{r['idle_ms']:.1f} ({r['idle_ms'] / r['wall_ms']:.0%})",
                      "n/a" if r["syncs"] is None else str(r["syncs"]),
                      *(_gib(r["peak_gib"][str(k)]) for k in PROFILE_SAMPLES)])
    done = [r for r in rows if "error" not in r]
    source = done[0]["kernels"] if done else "kernels"
    lines = [f"One training step (`train_step`) of {rows[0].get('tokens', '?')} tokens; per category the time of "
             f"its {source} in ms (share of the step's wall time, the median of {WALL_STEPS} unprofiled steps); "
             "idle = wall - that time; device-to-host syncs counted with torch.cuda.set_sync_debug_mode('warn'); "
             "peak = torch.cuda.max_memory_allocated over a step at each K:", ""]
    lines += markdown_table(["config", "path at K=" + "/".join(map(str, PROFILE_SAMPLES)), "wall ms", *CATEGORIES,
                             "idle", "D2H syncs", *(f"peak GiB K={k}" for k in PROFILE_SAMPLES)], cells) + [""]
    for r in done:
        if r["sync_sites"]:
            lines += [f"Syncs of {r['config']}, where (count): {', '.join(r['sync_sites'])}", ""]
    return lines


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"  # None: no GPU memory to count


def profile_summary(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if "error" in r:
            continue
        gemm, idle = r["kernel_ms"]["GEMM"] / r["wall_ms"], r["idle_ms"] / r["wall_ms"]
        syncs = "n/a" if r["syncs"] is None else r["syncs"]
        peaks = "/".join(_gib(r["peak_gib"][str(k)]) for k in PROFILE_SAMPLES)
        lines.append(f"profile: {r['config']}: {r['wall_ms']:.1f} ms/step, GEMM {gemm:.0%} of it, idle {idle:.0%}; "
                     f"D2H syncs per step: {syncs}; peak GiB at K={'/'.join(map(str, PROFILE_SAMPLES))}: {peaks}")
    return lines


# --------------------------------------------------------------------------- 7. generation

GENERATE = {"full": dict(new_tokens=256, repeats=2), "quick": dict(new_tokens=16, repeats=1)}


def generation(opts) -> Iterator[dict]:
    import torch

    from infmoe.generation import generate
    from infmoe.layers import sampling
    from infmoe.models import build_model

    device, size = torch.device(opts.device), "tiny" if opts.quick else "gpt2-small"
    plan = GENERATE["quick" if opts.quick else "full"]
    settings = {f"{size}-dense": (f"{size}-dense", {})}
    settings |= {f"{size}-infmoe K={k}": (f"{size}-infmoe", dict(n_samples=k)) for k in (1, 4, 16)}
    settings[f"{size}-infmoe mean"] = (f"{size}-infmoe", dict(mode="mean"))
    models, dense = {}, None
    prompt = torch.randint(0, 512, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    for label, (name, knobs) in settings.items():
        row = dict(setting=label, new_tokens=plan["new_tokens"])
        try:
            if name not in models:
                torch.manual_seed(0)
                models[name] = build_model(name, **(QUICK_MODEL if opts.quick else {})).to(device).eval()
            with sampling(models[name], **knobs):
                list(generate(models[name], prompt, max_new_tokens=4, temperature=0, seed=0))  # lazy inits
                times = []
                for _ in range(plan["repeats"]):
                    start = time.perf_counter()
                    out = list(generate(models[name], prompt, max_new_tokens=plan["new_tokens"], temperature=0, seed=0))
                    times.append(time.perf_counter() - start)  # each token reached the host: synchronised
            path = models[name].ffn_layers()[0].aux.path  # what the last decoding step ran
            row |= dict(seconds=min(times), tokens_per_s=len(out) / min(times), path=path or "dense",
                        dtype=str(next(models[name].parameters()).dtype).removeprefix("torch."),
                        ok=len(out) == plan["new_tokens"])
            dense = row["tokens_per_s"] if name.endswith("-dense") else dense
            row["vs_dense"] = row["tokens_per_s"] / dense if dense else None
        except Exception as err:  # recorded; the next setting still runs
            row |= dict(error=describe(err), ok=False)
        yield row


def generation_table(rows: list[dict]) -> list[str]:
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["setting"], f"{r['error']['type']}: {_one_line(r['error']['message'])}", *["-"] * 5])
        else:
            cells.append([r["setting"], r["path"], r["dtype"], str(r["new_tokens"]), f"{r['tokens_per_s']:.1f}",
                          f"{1e3 / r['tokens_per_s']:.2f}", number_cell(r["vs_dense"], ".2f")])
    return markdown_table(["setting", "FFN path", "weights", "new tokens", "tokens/s", "ms/token", "vs dense"],
                          cells) + [""]


def generation_summary(rows: list[dict]) -> list[str]:
    return [f"generation: {r['setting']} {r['tokens_per_s']:.1f} tokens/s, "
            f"{number_cell(r['vs_dense'], '.2f')} x dense" for r in rows if "tokens_per_s" in r]


# --------------------------------------------------------------------------- the stages


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    budget: float
    run: Callable[[argparse.Namespace], Iterator[dict]]
    table: Callable[[list[dict]], list[str]]
    summary: Callable[[list[dict]], list[str]]
    command: Callable[[argparse.Namespace], str] | None = None  # a command of its own, else --only NAME


STAGES = {s.name: s for s in [
    Stage("environment", "Environment", 20, environment, environment_table, environment_summary),
    Stage("tests", "The layer tests on this device, and the compile tests", 90, tests, tests_table, tests_summary,
          lambda opts: " && ".join(tests_shown(opts))),
    Stage("bench", "infmoe bench", 55, bench, bench_table, bench_summary,
          lambda opts: shlex.join(["python", *bench_command(opts)])),
    Stage("compile", "infmoe bench --compile", 120, bench_compiled, bench_table, compile_summary,
          lambda opts: shlex.join(["python", *bench_command(opts, compile=True)])),
    Stage("training", "Training throughput", 50, training, training_table, training_summary),
    Stage("profile", "Profile of one training step", 60, profile, profile_table, profile_summary),
    Stage("generation", "Generation with the KV cache", 55, generation, generation_table, generation_summary),
]}
assert sum(s.budget for s in STAGES.values()) <= TOTAL_BUDGET_S


def reproduce(stage: Stage, opts) -> str:
    if stage.command:
        return stage.command(opts)
    flags = ["--only", stage.name, "--device", opts.device, "--precision", opts.precision, "--out", "/tmp/gpu-check"]
    flags += ["--quick"] * opts.quick
    if stage.name == "training" and opts.train_configs:
        flags += ["--train-configs", opts.train_configs]
    return shlex.join(["python", "benchmarks/gpu_check.py", *flags])


def child(opts) -> int:
    """Run one stage in this process, its rows saved after each one (so a stage killed for
    time keeps what it finished); its own exception goes into the result."""
    result: dict = dict(rows=[])
    try:
        for row in STAGES[opts.stage].run(opts):
            result["rows"].append(row)
            write_text(opts.result, json.dumps(result, default=str))
    except Exception as err:
        result["error"] = describe(err)
    write_text(opts.result, json.dumps(result, default=str))
    return 1 if "error" in result else 0


def _failure(kind: str, message: str) -> dict:
    return dict(type=kind, message=message, traceback="")


def pending(stage: Stage, opts) -> dict:
    """A stage's entry in the report before it runs."""
    return dict(name=stage.name, title=stage.title, status="not run", budget_s=opts.budgets.get(stage.name, stage.budget),
                reproduce=reproduce(stage, opts), rows=[], seconds=0.0)


def run_stage(stage: Stage, opts, argv: list[str], deadline: float) -> dict:
    budget = min(opts.budgets.get(stage.name, stage.budget), deadline - time.time())
    entry = pending(stage, opts) | dict(budget_s=round(budget, 1))
    if budget < 1:
        return entry | dict(status="failed", error=_failure("TimeoutError", "not run: the total budget is spent"))
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--stage", stage.name, "--result",
               str(result_path), "--deadline", repr(time.time() + budget)]
        done = run_command(cmd, budget, own_group=True)
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
    entry |= dict(rows=result.get("rows", []), seconds=round(done["seconds"], 1))
    if done["timed_out"]:
        error = _failure("TimeoutError", f"the stage ran out of its {budget:g} s budget and was killed")
    elif "error" in result:
        error = result["error"]
    elif done["rc"] != 0 or not result:
        error = _failure("Crash", f"the stage process exited with status {done['rc']}")
    elif failed_rows(entry["rows"]) or not entry["rows"]:
        n = len(failed_rows(entry["rows"]))
        error = _failure("Results", f"{n} of {len(entry['rows'])} failed (see below)")
    else:
        return entry | dict(status="passed")
    return entry | dict(status="failed", error=error, output_tail=done["tail"])


# --------------------------------------------------------------------------- the report


def render(report: dict) -> str:
    stages = report["stages"]
    env = {r["item"]: r["value"] for s in stages if s["name"] == "environment" for r in s["rows"]}
    found = (f"{env.get('gpu') or 'no GPU (CPU: ' + str(env.get('processor')) + ')'}, torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}") if env else "an environment the environment stage did not report"
    ran = [s for s in stages if s["status"] != "not run"]
    passed = [s["name"] for s in ran if s["status"] == "passed"]
    failed = [s["name"] for s in ran if s["status"] == "failed"]
    lines = ["# GPU check", "", f"Written by `{report['command']}` (benchmarks/gpu_check.py; how to run it: "
             "[gpu_check.md](gpu_check.md)), started {0} UTC on host `{1}`, device `{2}`{3}.".format(
                 report["started"], report["host"], report["device"], ", quick sizes" if report["quick"] else ""),
             "", f"Found: {found}.", "",
             *(["A dry run on the CPU: it shows that the check runs and reports; its numbers say nothing about a GPU.",
                ""] if report["device"] == "cpu" else []),
             f"{len(passed)} of {len(stages)} stages passed" + (f"; failed: {', '.join(failed)}" if failed else "")
             + f"; {sum(s['seconds'] for s in ran):.0f} s of the {report['budget_s']:.0f} s budget"
             + ("" if report["finished"] else "; **still running or interrupted**") + ".", ""]
    for i, s in enumerate(stages, 1):
        lines += [f"## {i}. {s['title']}: {s['status']}", ""]
        if s["status"] == "not run":
            lines += ["Not run (yet).", ""]
            continue
        lines += [f"Reproduce: `{s['reproduce']}` ({s['seconds']:.1f} s of a {s['budget_s']:.0f} s budget)", ""]
        if s.get("error"):
            e = s["error"]
            lines += [f"**Failed: {e['type']}: {_one_line(e['message'])}**", ""]
            details = (e.get("traceback") or "").strip() or (s.get("output_tail") or "").strip()
            if details:
                lines += ["```", *details.splitlines()[-20:], "```", ""]
        if s["rows"]:
            lines += _guarded_render(STAGES[s["name"]].table, s["rows"])
            lines += _row_errors(s["rows"])
    lines += ["## What this shows / what failed", ""]
    for s in ran:
        if s["status"] == "passed":
            lines += [f"- {line}" for line in _guarded_render(STAGES[s["name"]].summary, s["rows"])]
    if not failed:
        lines.append("- no stage failed")
    for s in ran:
        if s["status"] == "failed":
            lines.append(f"- **{s['name']} failed**: {s['error']['type']}: {_one_line(s['error']['message'])}")
            lines += [f"  - {_label(r)}: {r['error']['type']}: {_one_line(r['error']['message'])}"
                      for r in s["rows"] if "error" in r][:8]
    return "\n".join(lines) + "\n"


def _guarded_render(render_rows: Callable[[list[dict]], list[str]], rows: list[dict]) -> list[str]:
    """A stage's rows as its renderer writes them, or, if rendering breaks on rows a failure
    left odd, the raw rows: the report must come out whatever happened."""
    try:
        return render_rows(rows)
    except Exception as err:
        return [f"(rendering failed: {type(err).__name__}: {err}; raw rows in gpu.json)", ""]


def _row_errors(rows: list[dict]) -> list[str]:
    """The tracebacks of the first three failed rows (gpu.json has them all)."""
    lines = []
    for r in [r for r in rows if r.get("error", {}).get("traceback")][:3]:
        lines += [f"Traceback of {_label(r)}:", "", "```", *r["error"]["traceback"].strip().splitlines()[-12:],
                  "```", ""]
    return lines


def _label(row: dict) -> str:
    return " ".join(str(row[k]) for k in ("config", "setting", "command", "precision") if row.get(k) is not None)


def write_report(report: dict, out: Path) -> None:
    write_text(out / "gpu.json", json.dumps(report, indent=1, default=str) + "\n")
    write_text(out / "gpu.md", render(report))


# --------------------------------------------------------------------------- command line


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the running stage is killed, the report kept


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"gpu_check: error: {message} (see --help)\n")


def parse(argv: list[str]) -> argparse.Namespace:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run)")
    p.add_argument("--precision", default="auto", help="auto (bf16 autocast on CUDA, fp32 on the CPU), bf16 or fp32")
    p.add_argument("--quick", action="store_true", help="tiny shapes and models: seconds (the CPU dry run)")
    p.add_argument("--out", default=str(ROOT / "docs"), help="folder for gpu.md and gpu.json (default: docs/)")
    p.add_argument("--only", default=None, metavar="STAGE,...", help="run these stages: " + ", ".join(STAGES))
    p.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                   help="another time budget for a stage (repeatable)")
    p.add_argument("--train-configs", default=None, metavar="'CONFIG [--key value],...'",
                   help="the training stage's models instead of dense, moe, infmoe, infmoe --units_per_block 256")
    for hidden in ("--stage", "--result", "--deadline"):  # how the parent starts a stage process
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS, type=float if hidden == "--deadline" else str)
    opts = p.parse_args(argv)
    if opts.device not in ("cuda", "cpu"):
        p.error(f"--device {opts.device!r} is invalid: use cuda or cpu")
    if opts.precision not in ("auto", "bf16", "fp32"):
        p.error(f"--precision {opts.precision!r} is invalid: use auto, bf16 or fp32")
    if opts.precision == "auto":  # what training's "auto" means, spelled out for every command shown
        opts.precision = "bf16" if opts.device == "cuda" else "fp32"
    opts.stages = opts.only.split(",") if opts.only else list(STAGES)
    opts.budgets = {}
    for item in opts.budget:
        name, _, seconds = item.partition("=")
        if name not in STAGES or not re.fullmatch(r"\d+(\.\d+)?", seconds):
            p.error(f"--budget {item!r} is invalid: use STAGE=SECONDS with a stage of {', '.join(STAGES)}")
        opts.budgets[name] = float(seconds)
    for name in opts.stages:
        if name not in STAGES:
            p.error(f"--only: unknown stage {name!r}: choose from {', '.join(STAGES)}")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse(argv)
    if opts.stage:
        return child(opts)
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed here: install torch (a CUDA build for the check) first")
        return 2
    if opts.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is available here (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}); use --device cpu --quick for a dry run")
        return 2
    out = Path(opts.out)
    gpus = torch.cuda.device_count() if opts.device == "cuda" else 0  # counts without creating a context
    print(f"gpu_check: torch {torch.__version__}, CUDA build {torch.version.cuda}, {gpus} CUDA device(s), "
          f"device {opts.device}; report in {out}", flush=True)
    report = dict(command=shlex.join(["python", "benchmarks/gpu_check.py", *argv]), host=platform.node(),
                  device=opts.device, quick=opts.quick, precision=opts.precision, budget_s=TOTAL_BUDGET_S,
                  started=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), finished=None,
                  stages=[pending(STAGES[n], opts) for n in opts.stages])
    deadline = time.time() + TOTAL_BUDGET_S
    write_report(report, out)
    signal.signal(signal.SIGTERM, _interrupted)
    for i, name in enumerate(opts.stages):
        try:
            report["stages"][i] = entry = run_stage(STAGES[name], opts, argv, deadline)
        except KeyboardInterrupt:
            report["stages"][i] |= dict(status="failed", error=_failure("Interrupted", "stopped from outside"))
            write_report(report, out)
            print(f"gpu_check: interrupted in stage {name}; the report so far is in {out / 'gpu.md'}")
            return 130
        write_report(report, out)
        error = f": {entry['error']['type']}: {_one_line(entry['error']['message'])}" if entry.get("error") else ""
        print(f"[{i + 1}/{len(opts.stages)}] {name}: {entry['status']} in {entry['seconds']:.1f} s{error}", flush=True)
        if name == "environment":
            print("gpu_check: found " + "; ".join(_guarded_render(environment_summary, entry["rows"])), flush=True)
    report["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    write_report(report, out)
    failed = [s["name"] for s in report["stages"] if s["status"] != "passed"]
    print(f"gpu_check: wrote {out / 'gpu.md'} and {out / 'gpu.json'}; "
          + (f"failed: {', '.join(failed)}" if failed else "every stage passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
