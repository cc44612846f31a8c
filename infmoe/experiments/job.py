"""One job of an experiment grid: train (or resume) a run, evaluate it on everything the
report reads (the K sweep, baselines, zero-shot tasks), and write its result JSON.

`run_job` is what each of the grid's processes runs (`infmoe.experiments.runner`); the
training and evaluation code is imported inside the functions, in that process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infmoe.experiments.results import write_result
from infmoe.experiments.spec import Job
from infmoe.training.metrics import METRICS_FILE, read_curve


def run_job(job: Job, eval_tokens: int, samples: list[int], result_path: str, *, adaptive: int | None = None,
            zeroshot_samples: Sequence[int] = ()) -> dict[str, Any]:
    """Train (or resume) one job, evaluate it, write its result JSON. Runs in a worker.
    adaptive, zeroshot_samples: as in `evaluate_job`."""
    import torch

    from infmoe.checkpoint import load_checkpoint
    from infmoe.training import CHECKPOINT, resolve, train

    settings = dict(job.settings, progress=False)
    checkpoint = Path(settings["out_dir"]) / CHECKPOINT
    if checkpoint.exists():
        settings["resume"] = True
    cfg, model_config = resolve(settings)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    done_steps = load_checkpoint(checkpoint).state.get("step", 0) if checkpoint.exists() else 0
    if done_steps < cfg.max_steps:
        result = train(cfg, model_config)
        if result.interrupted_by:
            return {"finished": False, "summary": f"interrupted by {result.interrupted_by} at step {result.step}"}
    record = evaluate_job(job, checkpoint, eval_tokens, samples, adaptive=adaptive,
                          zeroshot_samples=zeroshot_samples)
    write_result(Path(result_path), record)
    head = record["headline"]
    return {"finished": True, "summary": f"val loss {head['loss']:.4f} (ppl {head['perplexity']:.1f})"}


def evaluate_job(job: Job, checkpoint: Path, eval_tokens: int, samples: list[int], *, adaptive: int | None = None,
                 zeroshot_samples: Sequence[int] = ()) -> dict[str, Any]:
    """Everything the report needs about one finished run, evaluated on the device and in
    the precision the run trained with. adaptive: K_max of an adaptive-K row in the sweep
    (∞-MoE runs); zeroshot_samples: the K values at which a zero-shot run is scored again."""
    import torch

    from infmoe.checkpoint import load_checkpoint
    from infmoe.data.tokens import bigram_loss, unigram_loss
    from infmoe.device import autocast_for, pick_device, uses_bf16
    from infmoe.evaluation import evaluate_model
    from infmoe.layers import InfiniteMoE
    from infmoe.params import parameter_report

    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.state["train_config"]
    device = pick_device(cfg.get("device", "auto"))
    model, tokenizer = ckpt.build_model(device).eval(), ckpt.tokenizer()
    result = evaluate_model(model, tokenizer, cfg["data"], samples=samples, adaptive=adaptive,
                            max_tokens=eval_tokens, batch_size=16,
                            seq_len=cfg.get("seq_len"), cache_dir=cfg.get("cache_dir"),
                            autocast=autocast_for(cfg.get("precision", "auto"), device))
    rows, data = result.rows, result.data
    seq_len = cfg.get("seq_len") or model.config.n_ctx
    layers = [f for f in model.ffn_layers() if isinstance(f, InfiniteMoE)]
    trained_k = layers[0].n_samples if layers else 1
    trained_mode = layers[0].mode if layers else "sample"
    headline = next(r for r in rows if r.mode == trained_mode and (r.mode == "mean" or r.n_samples == trained_k))
    report = parameter_report(model.config, job.run, samples=(1,))
    record: dict[str, Any] = {
        "run": job.run, "seed": job.seed, "settings": job.settings, "config": model.config.to_dict(),
        "params": {"total": report.total, "active": report.active[1]},
        "steps": ckpt.state["step"], "tokens_seen": ckpt.state["step"] * cfg["batch_size"] * cfg["grad_accum"]
        * ckpt.state.get("world_size", 1) * seq_len,
        "eval_tokens": result.tokens,
        "headline": headline.to_dict(), "sweep": [r.to_dict() for r in rows],
        "baselines": {"unigram": unigram_loss(data.train, data.valid, data.vocab_size),
                      "bigram": bigram_loss(data.train, data.valid, data.vocab_size)},
        "curve": read_curve(checkpoint.parent / METRICS_FILE),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "precision": "bf16" if uses_bf16(cfg.get("precision", "auto"), device) else "fp32",
    }
    if job.zeroshot:
        record["zeroshot"] = zeroshot(model, tokenizer, job.zeroshot)
        if layers and zeroshot_samples:  # K = the trained K in sample mode is the run above
            record["zeroshot_sweep"] = {
                str(k): record["zeroshot"] if (k, trained_mode) == (trained_k, "sample")
                else zeroshot(model, tokenizer, job.zeroshot, n_samples=k, mode="sample")
                for k in zeroshot_samples}
    return record


def zeroshot(model, tokenizer, tasks: dict[str, str], n_samples: int | None = None,
             mode: str | None = None) -> dict[str, Any]:
    """Task name → `evaluate_task`'s result on the task's jsonl file (`tasks`: name → path),
    at the layers' own K and mode unless given, with each item's correctness (0/1) kept for
    the report's paired tests."""
    from infmoe.evaluation.tasks import load_task
    from infmoe.evaluation.zeroshot import evaluate_task

    out = {}
    for task, path in tasks.items():
        result = evaluate_task(model, tokenizer, load_task(task, path), n_samples=n_samples, mode=mode,
                               progress=False, skip_too_long=True)
        predictions = result.pop("predictions")
        result["correct"] = [int(p["correct"]) for p in predictions]  # per item, for paired tests
        out[task] = result
    return out
