"""Checkpoints: one safetensors file, written to a temporary name and renamed into place.

Tensors: ``model.<name>`` for the weights (the tied output head is stored once, as the
token embedding) and, in training checkpoints, ``optim.<parameter name>.<key>`` for the
AdamW state and ``extra.<name>`` for other run state, all full (unsharded) tensors.
Everything else (model config, training state, tokenizer files) is JSON in the
safetensors header under the key ``infmoe``, so loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from infmoe.errors import CheckpointError, InfmoeError
from infmoe.io import atomic_path
from infmoe.models import GPT, GPTConfig

FORMAT = "infmoe-checkpoint-1"
CHECKPOINT_FILE = "checkpoint.safetensors"  # its name inside a run folder of infmoe train
_TIED = "lm_head.weight"


@dataclass
class Checkpoint:
    """A loaded checkpoint. `state` is the free-form training state saved with it."""

    path: Path
    config: GPTConfig
    weights: dict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)
    tokenizer_files: dict[str, str] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def build_model(self, device: str | torch.device = "cpu") -> GPT:
        with torch.device("meta"):
            model = GPT(self.config)
        model.load_state_dict(self.weights, strict=False, assign=True)
        model.lm_head.weight = model.wte.weight  # `assign` replaced the tied parameter
        return model.to(device)

    def tokenizer(self):
        """The tokenizer the model was trained with (its files travel in the checkpoint)."""
        from infmoe.data.tokenizer import tokenizer_from_files

        if not self.tokenizer_files:
            raise CheckpointError(f"{self.path} carries no tokenizer: it was saved without one; re-save it from training")
        tokenizer = tokenizer_from_files(self.tokenizer_files, lambda name: f"{name} inside {self.path}",
                                         "re-save the checkpoint from training")
        if tokenizer.vocab_size != self.config.vocab_size:
            raise CheckpointError(f"{self.path}: tokenizer vocabulary {tokenizer.vocab_size} != model vocab_size "
                                  f"{self.config.vocab_size}; the checkpoint is inconsistent")
        return tokenizer


def save_checkpoint(
    path: str | os.PathLike,
    model: GPT,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    tokenizer_files: dict[str, str] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model`'s config and weights (or `weights`, e.g. gathered from FSDP shards) and
    an optimizer state keyed by parameter name ({"state": {name: {key: tensor}},
    "param_groups": [...]}) to `path` atomically: the previous file survives any failure.
    Raises `OutputError` with one line when the folder cannot be written, and
    `CheckpointError` when a weight is NaN or infinite (nothing is written then)."""
    path = Path(path)
    weights = model.state_dict() if weights is None else weights
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in weights.items() if k != _TIED}
    bad = non_finite(tensors)
    if bad:  # the last line of defence: a diverged model must never replace a good checkpoint
        raise CheckpointError(f"refusing to write {path}: {len(bad)} weight tensors are not finite "
                              f"(e.g. {bad[0][len('model.'):]}); the previous file is kept")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "state": state or {},
        "tokenizer_files": tokenizer_files or {},
    }
    if optimizer_state is not None:
        for name, entries in optimizer_state["state"].items():
            for key, value in entries.items():
                tensors[f"optim.{name}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
        meta["optimizer_groups"] = optimizer_state["param_groups"]
    for key, value in (extra_tensors or {}).items():
        tensors[f"extra.{key}"] = value.detach().contiguous().cpu()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"infmoe": json.dumps(meta)})
    return path


def load_checkpoint(path: str | os.PathLike, *, with_optimizer: bool = False) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; `CheckpointError` (one line) if the
    file is missing, truncated, not safetensors, or not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}: check the path (infmoe train writes <out_dir>/checkpoint.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get("infmoe")
            if header is None:
                raise CheckpointError(f"{path} is a safetensors file but not an infmoe checkpoint: give a file written by infmoe train")
            meta = json.loads(header)
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} has checkpoint format {meta.get('format')!r}, expected {FORMAT!r}: re-save it with this version of infmoe")
            keys = list(f.keys())
            weights = {k[len("model."):]: f.get_tensor(k) for k in keys if k.startswith("model.")}
            optim = {k: f.get_tensor(k) for k in keys if k.startswith("optim.")} if with_optimizer else {}
            extra = {k[len("extra."):]: f.get_tensor(k) for k in keys if k.startswith("extra.")}
    except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first}): it may be truncated; use a complete file") from None
    try:
        config = GPTConfig.from_dict(meta["config"])
    except (InfmoeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} holds an invalid model config ({err}): it was not written by this infmoe") from None
    check_weights(path, config, weights)
    checkpoint = Checkpoint(path, config, weights, meta.get("state", {}), meta.get("tokenizer_files", {}), extra=extra)
    if with_optimizer and "optimizer_groups" in meta:
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in optim.items():
            name, entry = key[len("optim."):].rsplit(".", 1)
            state.setdefault(name, {})[entry] = value
        checkpoint.optimizer = {"state": state, "param_groups": meta["optimizer_groups"]}
    return checkpoint


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [name for name, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def check_finite(weights: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """A one-line `CheckpointError` naming the first tensor of `weights` with a NaN or
    infinity: a model from a run that diverged (written by an older version or another tool)."""
    bad = non_finite(weights)
    if bad:
        raise CheckpointError(f"{where} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): the run "
                              f"that wrote it diverged; use an earlier checkpoint or train again with a lower --lr")


def check_weights(path: Path, config: GPTConfig, weights: dict[str, torch.Tensor]) -> None:
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config).state_dict().items() if k != _TIED}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if weights[k].shape != expected[k])
    if missing or extra or wrong:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else f"shape of {wrong[:3]}"
        raise CheckpointError(f"{path} does not match its own model config ({detail}): the file is damaged or foreign")
