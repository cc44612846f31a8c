"""Read a Hugging Face folder written by `infmoe.hf.export` back into our `GPT` and
`Tokenizer`, without `transformers`: config.json and model.safetensors are read directly.

The writer (`infmoe.hf.export`) and `infmoe.loading` both build on this module, and it on
neither, so reading an export never needs the code that writes one.
"""

from __future__ import annotations

import os
from pathlib import Path

from infmoe.checkpoint import Checkpoint, check_weights
from infmoe.data.tokenizer import BPE_FILE, Tokenizer, load_tokenizer
from infmoe.errors import CheckpointError, InfmoeError
from infmoe.hf.fields import MODEL_TYPE, gpt_config
from infmoe.hf.format import CONFIG_FILE, WEIGHT_PREFIX, WEIGHTS_FILE, read_config, read_weights
from infmoe.models import GPT


def is_hf_export(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder whose config.json names model_type "infmoe"."""
    try:
        return read_config(Path(path)).get("model_type") == MODEL_TYPE
    except InfmoeError:
        return False


def load_hf_dir(path: str | os.PathLike) -> tuple[GPT, Tokenizer]:
    """Read an export written by `save_hf` back into our `GPT` (on the CPU) and our
    `Tokenizer`; K and mode come from config.json's n_samples and mode. One-line
    `CheckpointError` for a folder that is not a complete infmoe export."""
    path = Path(path)
    data = read_config(path)
    if data.get("model_type") != MODEL_TYPE:
        hint = " (a GPT-2 folder: import it with infmoe.hf.import_gpt2)" if data.get("model_type") == "gpt2" else ""
        raise CheckpointError(f"{path} holds a {data.get('model_type')!r} model, not an infmoe export{hint}: "
                              f"give a folder written by infmoe export --hf")
    try:
        config = gpt_config(data)
    except InfmoeError as err:
        raise CheckpointError(f"{path / CONFIG_FILE} holds an invalid model config ({err}): export it again") from None
    weights = read_weights(path / WEIGHTS_FILE)
    if not all(name.startswith(WEIGHT_PREFIX) for name in weights):
        raise CheckpointError(f"{path / WEIGHTS_FILE} does not hold infmoe weights: export it again")
    weights = {name[len(WEIGHT_PREFIX):]: tensor for name, tensor in weights.items()}
    check_weights(path / WEIGHTS_FILE, config, weights)
    model = Checkpoint(path, config, weights).build_model()
    return model, folder_tokenizer(path, config.vocab_size)


def folder_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    """Our `Tokenizer` from the tokenizer.json in a Hugging Face folder, checked against the
    model's `vocab_size`."""
    if not (path / BPE_FILE).is_file():
        raise CheckpointError(f"{path} has no {BPE_FILE}: save the tokenizer beside the model "
                              f"(infmoe export --hf writes it; for transformers, tokenizer.save_pretrained)")
    return check_vocab(load_tokenizer(path), vocab_size, str(path))


def check_vocab(tokenizer: Tokenizer, vocab_size: int, where: str) -> Tokenizer:
    """`tokenizer` if all its ids index an embedding of `vocab_size` rows, else a one-line error."""
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"{where}: tokenizer has {tokenizer.vocab_size} ids, model vocab_size is "
                              f"{vocab_size}; pair the model with the tokenizer it was trained with")
    return tokenizer
