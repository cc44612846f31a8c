"""Write an infmoe model as a Hugging Face folder (reading one back: `infmoe.hf.reading`).

`save_hf` / `export_hf` need `transformers`, for the config and tokenizer files.

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

from infmoe.data.tokenizer import Tokenizer
from infmoe.errors import InfmoeError
from infmoe.hf.fields import config_fields
from infmoe.hf.format import (
    ARCHITECTURE,
    AUTO_MAP,
    CONFIG_FILE,
    GENERATION_FILE,
    TIED_WEIGHT,
    WEIGHT_PREFIX,
    WEIGHTS_FILE,
)
from infmoe.hf.reading import check_vocab, is_hf_export
from infmoe.hf.standalone import is_generated, write_standalone
from infmoe.io import OutputError, readable_by_umask, write_errors, write_failure
from infmoe.loading import load_model_and_tokenizer
from infmoe.models import GPT

_STAGING = ".infmoe-export-"


def export_hf(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export the checkpoint (or earlier export) at `checkpoint_path` into `out_dir`; see `save_hf`."""
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
