"""Training settings as one dataclass; model settings stay in `GPTConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from infmoe.errors import ConfigError, choose, invalid, positive_int, real, seed_int
from infmoe.layers import current_option_names, ffn_option_names
from infmoe.models import GPTConfig, get_config


@dataclass
class TrainConfig:
    """Everything `infmoe train` needs besides the model config.

    The defaults train tiny-infmoe on the embedded corpus in a few minutes on 2 CPU cores.
    batch_size is sequences per process per micro-step; one optimizer step sees
    batch_size · grad_accum · world_size sequences of seq_len tokens.
    """

    config: str = "tiny-infmoe"  # model config name or .json/.yaml file
    init_from: str | None = None  # start from these weights (checkpoint, export, GPT-2 folder); its config rules
    data: str = "embedded"  # see infmoe.data.prepare
    out_dir: str = "runs/default"
    tokenizer: str = "auto"  # auto | gpt2 | bpe
    tokenizer_vocab: int = 4096  # size of a trained BPE
    cache_dir: str | None = None  # prepared-data cache (default $INFMOE_CACHE or ~/.cache/infmoe)
    encoding_errors: str = "strict"  # non-UTF-8 bytes: fail (strict) or become U+FFFD (replace)
    seq_len: int | None = None  # None: the model's n_ctx
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 400  # length of the learning-rate schedule
    stop_at: int | None = None  # stop (with a checkpoint) before max_steps, e.g. to split a job
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_tokens: int = 131072
    log_interval: int = 10
    save_interval: int = 200
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parallel: str = "auto"  # under torchrun: auto (= ddp) | ddp | fsdp
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    threads: int | None = None  # CPU threads; None leaves torch's default
    progress: bool = True
    tensorboard: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        for name in self.text_fields():
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise invalid(name, value, "must be text (a path or a name); quote it in YAML")
        for name in ("tokenizer_vocab", "batch_size", "grad_accum", "max_steps", "eval_interval",
                     "eval_tokens", "log_interval", "save_interval"):
            positive_int(name, getattr(self, name))
        for name in ("seq_len", "stop_at", "threads"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.warmup_steps < 0 or self.warmup_steps >= self.max_steps:
            raise ConfigError(f"warmup_steps={self.warmup_steps} is invalid: must lie in [0, max_steps={self.max_steps})")
        seed_int("seed", self.seed)
        real("lr", self.lr, low=0, open_low=True)
        real("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        real("weight_decay", self.weight_decay, low=0)
        real("beta1", self.beta1, low=0, high=0.9999)
        real("beta2", self.beta2, low=0, high=0.9999)
        real("grad_clip", self.grad_clip, low=0)
        choose("tokenizer", self.tokenizer, ("auto", "gpt2", "bpe"))
        choose("precision", self.precision, ("auto", "fp32", "bf16"))
        choose("parallel", self.parallel, ("auto", "none", "ddp", "fsdp"))
        choose("encoding_errors", self.encoding_errors, ("strict", "replace"))

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def text_fields(cls) -> set[str]:
        """Settings that hold text (paths, names): read from the command line as written."""
        return {f.name for f in dataclasses.fields(cls) if f.type in ("str", "str | None")}


def partition_settings(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Partition --key value overrides into (training fields, model config fields)."""
    train = {k: v for k, v in overrides.items() if k in TrainConfig.fields()}
    model = {k: v for k, v in overrides.items() if k not in train}
    return train, model


def resolve(overrides: dict[str, Any]) -> tuple[TrainConfig, GPTConfig]:
    """Build (TrainConfig, GPTConfig) from command-line overrides; every key is checked
    before any compute, so a typo is one clear error, not a failed run."""
    train_fields, model_fields = partition_settings(overrides)
    train = TrainConfig(**train_fields)
    ffn = model_fields.get("ffn", get_config(train.config).ffn)
    model_fields = current_option_names(ffn, model_fields)  # an option's old name is its new one
    allowed = {f.name for f in dataclasses.fields(GPTConfig)} | set(ffn_option_names(ffn))
    for key in model_fields:
        if key not in allowed:
            raise ConfigError(
                f"unknown option --{key}: not a training option (see --help) nor a model field or "
                f"ffn={ffn!r} option ({', '.join(sorted(allowed - {'ffn_options'}))})"
            )
    if train.init_from is not None and model_fields:
        raise ConfigError(f"--init_from takes the model config from {train.init_from}: drop "
                          + ", ".join(f"--{k}" for k in model_fields))
    model = get_config(train.config, **model_fields)
    if train.seq_len is not None and train.seq_len > model.n_ctx:
        raise ConfigError(f"seq_len={train.seq_len} is invalid: must be <= the model's n_ctx={model.n_ctx}")
    return train, model
