"""Write an infmoe model as a Hugging Face folder, and read such a folder back.

`save_hf` / `export_hf` need `transformers` (for the config and tokenizer files);
`load_hf_dir` does not: it reads config.json and model.safetensors directly.

Writing is safe: every file is first written into a hidden staging folder inside the
output folder, then renamed into place (config.json last), so a failure mid-way leaves the
previous files whole; a non-empty folder that is not an earlier infmoe export is refused
before anything is written.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from infmoe.checkpoint import Checkpoint, check_weights
from infmoe.data.tokenizer import BPE_FILE, Tokenizer, load_tokenizer
from infmoe.errors import CheckpointError, InfmoeError
from infmoe.hf.fields import MODEL_TYPE, config_fields, gpt_config
from infmoe.hf.format import (
    ARCHITECTURE,
    AUTO_MAP,
    CONFIG_FILE,
    GENERATION_FILE,
    TIED_WEIGHT,
    WEIGHT_PREFIX,
    WEIGHTS_FILE,
    read_config,
    read_weights,
)
from infmoe.hf.standalone import is_generated, write_standalone
from infmoe.io import OutputError, readable_by_umask, write_errors, write_failure
from infmoe.models import GPT

_STAGING = ".infmoe-export-"


def export_hf(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export the checkpoint (or earlier export) at `checkpoint_path` into `out_dir`; see `save_hf`."""
    from infmoe.loading import load_model_and_tokenizer  # loading reads exports with this module

    model, tokenizer = load_model_and_tokenizer(checkpoint_path)
    return save_hf(model, tokenizer, out_dir)


def save_hf(model: GPT, tokenizer: Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write `model` and `tokenizer` into `out_dir` as a Hugging Face folder:

    config.json (model_type "infmoe", `auto_map` to the code below), model.safetensors,
    generation_config.json, tokenizer.json + tokenizer_config.json, and
    configuration_infmoe.py + modeling_infmoe.py. Returns `out_dir`.

    Raises `OutputError` (one line) when `out_dir` is a file, is non-empty and not an infmoe
    export, or cannot be written.
    """
    out_dir = Path(out_dir)
    _check_output_dir(out_dir)
    check_vocab(tokenizer, model.config.vocab_size, "the model to export")
    if importlib.util.find_spec("transformers") is None:
        raise InfmoeError("exporting in Hugging Face format needs transformers: pip install 'transformers>=5.0'")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=out_dir))
        try:
            _write_files(model, tokenizer, staging)
            names = sorted(os.listdir(staging), key=lambda name: name == CONFIG_FILE)  # config.json last
            for name in names:
                readable_by_umask(staging / name)  # some writers create files 0600
                os.replace(staging / name, out_dir / name)
            _remove_stale_code(out_dir, keep=set(names))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except write_errors() as err:  # safetensors wraps a full disk in its own error type
        raise write_failure(out_dir, err) from None
    return out_dir


def _remove_stale_code(out_dir: Path, keep: set[str]) -> None:
    """Delete generated code files an earlier export wrote and this one did not (a module
    renamed since), so the folder holds one model definition. Only files that carry the
    generator's header are touched."""
    for path in out_dir.glob("*.py"):
        if path.name not in keep and is_generated(path):
            path.unlink()


def _write_files(model: GPT, tokenizer: Tokenizer, folder: Path) -> None:
    from transformers import GenerationConfig

    from infmoe.hf.configuration_infmoe import InfmoeConfig
    from infmoe.hf.tokenizer import save_hf_tokenizer

    weights = {WEIGHT_PREFIX + name: tensor.detach().contiguous().cpu()
               for name, tensor in model.state_dict().items() if name != TIED_WEIGHT}
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    eot = tokenizer.eot_id
    config = InfmoeConfig(**config_fields(model.config), bos_token_id=eot, eos_token_id=eot)
    config.architectures = [ARCHITECTURE]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = str(model.wte.weight.dtype).removeprefix("torch.")
    generation = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    (folder / GENERATION_FILE).write_text(generation.to_json_string(), encoding="utf-8")
    save_hf_tokenizer(tokenizer, folder, model_max_length=model.config.n_ctx)
    # Generated from the source, not copied: the folder must load where infmoe is not installed.
    write_standalone(folder)
    (folder / CONFIG_FILE).write_text(config.to_json_string(), encoding="utf-8")


def _check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} is a file: give a folder for the export")
    if not out_dir.is_dir() or is_hf_export(out_dir):
        return
    if any(not entry.name.startswith(_STAGING) for entry in out_dir.iterdir()):
        raise OutputError(f"{out_dir} is not empty and not an infmoe export, so it was left untouched: "
                          f"choose a new or empty folder")


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
