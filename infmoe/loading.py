"""Every place a model can come from, behind one call: a checkpoint file of `infmoe train`,
its run folder, an exported Hugging Face folder, or a Hugging Face GPT-2 folder.

Used by every command that takes MODEL and by training's ``--init_from``, so they accept the
same things and refuse the same things (a missing path, a damaged file, non-finite weights)
with the same one-line errors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from infmoe.checkpoint import CHECKPOINT_FILE, check_finite, load_checkpoint
from infmoe.data.tokenizer import Tokenizer
from infmoe.errors import CheckpointError
from infmoe.hf.format import CONFIG_FILE, read_config
from infmoe.hf.gpt2 import import_gpt2
from infmoe.hf.reading import folder_tokenizer, load_hf_dir
from infmoe.models import GPT


@dataclass
class LoadedModel:
    """A model on the CPU in eval mode, its tokenizer, the checkpoint or folder it came
    from, and the training corpus it names (None for exports and GPT-2 folders)."""

    model: GPT
    tokenizer: Tokenizer
    path: Path
    data_source: str | None = None


def model_path(path: str | os.PathLike) -> Path:
    """The file or folder to read for MODEL `path`: a run folder (one holding
    checkpoint.safetensors and no config.json) means its checkpoint file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a checkpoint file, a run folder of infmoe train, "
                              f"or an exported Hugging Face folder")
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        if (path / CHECKPOINT_FILE).is_file():
            return path / CHECKPOINT_FILE
        raise CheckpointError(f"{path} is a folder with neither {CHECKPOINT_FILE} (a run folder of infmoe train) "
                              f"nor {CONFIG_FILE} (an exported or Hugging Face folder): give one of those")
    return path


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Read MODEL `path` (see `model_path`); one-line `CheckpointError` when it is missing,
    damaged, foreign, or holds weights that are not finite."""
    path = model_path(path)
    source = None
    if path.is_file():
        checkpoint = load_checkpoint(path)
        model, tokenizer = checkpoint.build_model(), checkpoint.tokenizer()
        source = checkpoint.state.get("data", {}).get("source")
    elif read_config(path).get("model_type") == "gpt2":
        model = import_gpt2(path)
        tokenizer = folder_tokenizer(path, model.config.vocab_size)
    else:
        model, tokenizer = load_hf_dir(path)
    check_finite(model.state_dict(), path)
    return LoadedModel(model.eval(), tokenizer, path, source)


def load_model_and_tokenizer(path: str | os.PathLike) -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) of `load_model`."""
    loaded = load_model(path)
    return loaded.model, loaded.tokenizer
