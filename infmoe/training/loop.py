"""The training loop: one function, `train`, from settings to a checkpoint.

Randomness is re-seeded at every step from (seed, step, rank): a run resumed at step s
draws exactly the noise and the batches the uninterrupted run drew, and every rank of a
distributed run samples its own ∞-MoE noise, reproducibly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from infmoe.checkpoint import CHECKPOINT_FILE as CHECKPOINT
from infmoe.checkpoint import Checkpoint, check_finite, load_checkpoint, save_checkpoint
from infmoe.data import prepare, unigram_loss
from infmoe.device import autocast_for, pick_device
from infmoe.errors import CheckpointError, ConfigError, InfmoeError
from infmoe.evaluation import eval_batches, evaluate_loss, perplexity
from infmoe.io import OutputError, check_writable, folder_lock, remove_stale_temporaries
from infmoe.loading import load_model_and_tokenizer
from infmoe.models import GPT, GPTConfig
from infmoe.randomness import derive_seed
from infmoe.training.batches import WindowSampler
from infmoe.training.config import TrainConfig
from infmoe.training.distributed import (
    World, all_reduce_sum, full_state, gradient_sync, init_world, load_optimizer_state, shutdown, weights_finite, wrap)
from infmoe.training.metrics import MetricsLog, RoutingMonitor
from infmoe.training.optim import build_optimizer, lr_at
from infmoe.training.step import clip_gradients, micro_step

# Settings a resumed run must share with the run it continues, or its losses would differ.
# Not `data`: the prepared tokens are compared instead, so a moved corpus still resumes.
_RESUME_INVARIANTS = ("tokenizer", "tokenizer_vocab", "seq_len", "seed")


class TrainingDiverged(InfmoeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    step: int
    val_loss: float | None
    unigram_loss: float
    interrupted_by: str | None = None
    rank: int = 0
    start: int = 0  # the step this session began at (a resumed checkpoint's)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, model_config: GPTConfig, *,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `model_config` as `cfg` says. Returns where the checkpoint is and how it ended.

    Run under torchrun, every process calls this; rank 0 writes logs and checkpoints.
    on_step(step, loss) is called after every optimizer step (tests use it to interrupt).
    """
    world, device = init_world(cfg.parallel, pick_device(cfg.device))
    try:
        # One writer per run folder: two runs into one folder would interleave their logs
        # and overwrite each other's checkpoints.
        with folder_lock(cfg.out_dir, fix="wait for it to end or choose another --out_dir") if world.is_main \
                else contextlib.nullcontext():
            return _train(cfg, model_config, world, device, on_step)
    finally:
        shutdown(world)


def _train(cfg: TrainConfig, model_config: GPTConfig, world: World, device: torch.device,
           on_step: Callable[[int, float], None] | None) -> TrainResult:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CHECKPOINT
    if world.is_main:
        check_writable(out_dir)
        remove_stale_temporaries(ckpt_path)  # left by a process killed mid-write; never our live file
        if ckpt_path.exists() and not cfg.resume:
            raise CheckpointError(f"{out_dir} already holds a checkpoint: pass --resume to continue it, "
                                  "or choose another --out_dir")

    initial = None
    if cfg.init_from:  # a checkpoint, export or GPT-2 folder: its config and tokenizer rule
        initial, tokenizer = load_model_and_tokenizer(cfg.init_from)
        model_config = initial.config
    data = _prepare_once(cfg, world, tokenizer if initial is not None else cfg.tokenizer)
    if initial is None:
        model_config = model_config.replace(vocab_size=data.vocab_size)
    seq_len = cfg.seq_len or model_config.n_ctx
    sampler = WindowSampler(data.train, seq_len, cfg.seed)
    val_batches = eval_batches(data.valid, seq_len, cfg.batch_size, cfg.eval_tokens)
    baseline = unigram_loss(data.train, data.valid, data.vocab_size)
    saved_tokenizer = data.tokenizer.files()

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(model_config).to(device)
    if initial is not None:
        model.load_state_dict(initial.state_dict())
    monitor = RoutingMonitor()
    ckpt = _resumable(ckpt_path, cfg, model_config, data.meta, world) if cfg.resume else None
    if ckpt is not None:
        model.load_state_dict(ckpt.weights, strict=False)
        monitor.load_state(ckpt.extra, device)
    engine = wrap(model, world, device)
    optimizer = build_optimizer(model, cfg)
    if ckpt is not None:
        load_optimizer_state(model, optimizer, ckpt.optimizer, world)
    start = int(ckpt.state["step"]) if ckpt is not None else 0
    end = min(cfg.max_steps, cfg.stop_at or cfg.max_steps)
    if start > end:
        raise ConfigError(f"--resume: the checkpoint in {out_dir} is at step {start}, past the "
                          f"{'--stop_at' if end < cfg.max_steps else '--max_steps'} of {end}; nothing would "
                          "be trained: raise it above the checkpoint's step")
    forward = torch.compile(engine) if cfg.compile else engine
    autocast = autocast_for(cfg.precision, device)
    log = MetricsLog(out_dir, resume_step=start if ckpt else None, tensorboard=cfg.tensorboard) if world.is_main else None
    last_good = start if ckpt is not None else None

    def diverged(what: str) -> None:
        where = f"the last good checkpoint (step {last_good}) is kept at {ckpt_path}" if last_good is not None \
            else "no checkpoint was written"
        raise TrainingDiverged(f"{what}; training stopped and {where}: lower --lr, raise --warmup_steps "
                               "or lower --grad_clip")

    def save(step: int, val_loss: float | None) -> None:
        if not weights_finite(model, world):  # every rank decides alike, so none waits in a collective
            diverged(f"the weights became non-finite by step {step}")
        weights, optimizer_state = full_state(model, optimizer, world)  # a collective under FSDP
        if world.is_main:
            state = {"step": step, "train_config": dataclasses.asdict(cfg), "world_size": world.world_size,
                     "val_loss": val_loss, "data": {"source": cfg.data, "meta": data.meta}, "unigram_loss": baseline,
                     "interval": {"loss_sum": interval_loss, "steps": interval_steps}}
            save_checkpoint(ckpt_path, model, weights=weights, optimizer_state=optimizer_state, state=state,
                            tokenizer_files=saved_tokenizer, extra_tensors=monitor.state())

    tokens_per_step = global_batch(cfg, world) * seq_len
    val_loss = None
    bar = tqdm(total=end, initial=start, disable=not cfg.progress or not world.is_main, unit="step", dynamic_ncols=True)
    # The logging interval still open at the checkpoint goes on where it was, so a resumed
    # run logs the averages the uninterrupted run logs; only the steps timed here count for
    # tokens/s.
    interval = ckpt.state.get("interval", {}) if ckpt is not None else {}
    interval_loss, interval_steps = float(interval.get("loss_sum", 0.0)), int(interval.get("steps", 0))
    interval_start, timed_steps = time.perf_counter(), 0
    model.train()
    step, stopped_by = start, None
    try:
        with _StopFlag() as stop:
            step = start
            while step < end:
                torch.manual_seed(derive_seed(cfg.seed, step, world.rank))
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    x, y = sampler.batch(step, micro, cfg.batch_size, cfg.grad_accum, world.rank, world.world_size)
                    with gradient_sync(engine, world, micro == cfg.grad_accum - 1):
                        out = micro_step(model, forward, x.to(device), y.to(device), micro_batches=cfg.grad_accum,
                                         autocast=autocast)
                    loss_sum += out.loss.detach()
                    monitor.update(model.routing_stats())
                loss = all_reduce_sum(loss_sum, world).item() / (cfg.grad_accum * world.world_size)
                if not math.isfinite(loss):
                    diverged(f"the loss became {loss} at step {step + 1}, so the step was not applied")
                grad_norm = clip_gradients(model, cfg.grad_clip)
                # A finite loss can still have a non-finite gradient; clipping by an infinite norm
                # multiplies by 0 · inf = NaN, so the update would write NaN into every weight.
                if not torch.isfinite(grad_norm):
                    diverged(f"the gradient norm became {float(grad_norm)} at step {step + 1} (loss {loss:.4g}), "
                             "so the step was not applied")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                interval_loss, interval_steps, timed_steps = interval_loss + loss, interval_steps + 1, timed_steps + 1
                bar.update(1)
                if on_step is not None:
                    on_step(step, loss)

                # Not at --stop_at: its open interval is saved and closes when the run resumes.
                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    elapsed = time.perf_counter() - interval_start
                    values = {"train/loss": interval_loss / interval_steps, "train/lm_loss": float(out.lm_loss.detach()),
                              "train/aux_loss": float(out.aux_loss.detach()), "train/lr": lr,
                              "train/grad_norm": float(grad_norm),
                              "train/tokens_per_s": tokens_per_step * timed_steps / elapsed}
                    values.update(monitor.summary())
                    if log is not None:
                        log.log(step, values)
                    bar.set_postfix(loss=f"{values['train/loss']:.3f}", tok_s=f"{values['train/tokens_per_s']:.0f}")
                    interval_start, interval_loss, interval_steps, timed_steps = time.perf_counter(), 0.0, 0, 0
                if step % cfg.eval_interval == 0 or step == end:
                    val_loss = evaluate_loss(engine, val_batches, device, autocast=autocast,
                                             rank=world.rank, world_size=world.world_size)
                    if not math.isfinite(val_loss):
                        diverged(f"the validation loss became {val_loss} at step {step}")
                    if log is not None:
                        log.log(step, {"val/loss": val_loss, "val/perplexity": perplexity(val_loss)})
                    if world.is_main:
                        bar.write(f"step {step}: validation loss {val_loss:.4f} (unigram baseline {baseline:.4f})")
                if step % cfg.save_interval == 0 or step == end or stop.signal:
                    save(step, val_loss)
                    last_good = step
                if stop.signal:
                    break
        stopped_by = stop.signal
    except OutputError as err:  # a full disk mid-run: say what survived and how to go on
        _close(bar, log, quietly=True)
        kept = f"the checkpoint of step {last_good} is kept" if last_good is not None else "no checkpoint was written"
        raise OutputError(f"{err}; {kept}: continue with --resume") from None
    except BaseException:
        _close(bar, log, quietly=True)
        raise
    _close(bar, log)
    return TrainResult(out_dir, ckpt_path, step, val_loss, baseline, stopped_by, world.rank, start)


def _close(bar, log: MetricsLog | None, quietly: bool = False) -> None:
    """Close the progress bar and the logs; `quietly` while another error is on its way out."""
    bar.close()
    if log is not None:
        with contextlib.suppress(OutputError) if quietly else contextlib.nullcontext():
            log.close()


def global_batch(cfg: TrainConfig, world: World) -> int:
    """Sequences per optimizer step, over all ranks and micro-steps."""
    return cfg.batch_size * cfg.grad_accum * world.world_size


def _prepare_once(cfg: TrainConfig, world: World, tokenizer):
    """Rank 0 of each node tokenizes; the others then find the cache ready."""
    def run():
        return prepare(cfg.data, cache_dir=cfg.cache_dir, tokenizer=tokenizer, vocab_size=cfg.tokenizer_vocab,
                       encoding_errors=cfg.encoding_errors, progress=cfg.progress and world.is_main)

    data = run() if world.local_rank == 0 else None
    if world.distributed:
        torch.distributed.barrier()
    return data if data is not None else run()


def _same_data(saved: dict, current: dict) -> bool:
    """Whether two prepared-data metas hold the same tokens: by content where both recorded it
    (so a corpus that was copied or touched still resumes), else by the source fingerprint."""
    key = "content_sha256" if "content_sha256" in saved and "content_sha256" in current else "fingerprint"
    return saved.get(key) == current.get(key)


def _resumable(path: Path, cfg: TrainConfig, model_config: GPTConfig, data_meta: dict, world: World) -> Checkpoint:
    """The checkpoint to continue from, after checking the run can continue exactly."""
    if not path.exists():
        raise CheckpointError(f"--resume: there is no {CHECKPOINT} in {path.parent}; drop --resume to start a new run")
    ckpt = load_checkpoint(path, with_optimizer=True)
    check_finite(ckpt.weights, path)
    if ckpt.config != model_config:
        diff = [k for k, v in model_config.to_dict().items() if ckpt.config.to_dict().get(k) != v]
        raise CheckpointError(f"--resume: the checkpoint's model config differs in {', '.join(diff)}; "
                              "drop those overrides or train into a new --out_dir")
    saved = ckpt.state.get("train_config", {})
    changed = [k for k in _RESUME_INVARIANTS if saved.get(k) != getattr(cfg, k)]
    saved_batch = saved.get("batch_size", 0) * saved.get("grad_accum", 0) * ckpt.state.get("world_size", 1)
    if saved_batch != global_batch(cfg, world):
        changed.append(f"the global batch (batch_size x grad_accum x ranks: {saved_batch} before, "
                       f"{global_batch(cfg, world)} now)")
    if changed:
        verb = "differs" if len(changed) == 1 else "differ"
        raise CheckpointError(f"--resume: {', '.join(changed)} {verb} from the checkpoint's run, so it cannot "
                              "continue exactly; use the same values or a new --out_dir")
    if not _same_data(ckpt.state.get("data", {}).get("meta", {}), data_meta):
        raise CheckpointError("--resume: the prepared data differs from the checkpoint's (the corpus changed?); "
                              "restore it or train into a new --out_dir")
    if ckpt.optimizer is None:
        raise CheckpointError(f"--resume: {path} holds no optimizer state; it cannot be continued exactly")
    return ckpt
