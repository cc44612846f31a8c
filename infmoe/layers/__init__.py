"""Feed-forward variants behind one interface (see `base.FFNLayer`).

Adding a variant: one new file with an `FFNLayer` subclass, plus one line in `FFN_TYPES`.
Its keyword-only constructor arguments become the keys a model config may set in
``ffn_options``; a renamed one keeps its old name in the class's ``RENAMED_OPTIONS``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from infmoe.deprecation import new_names
from infmoe.errors import ConfigError, choose, invalid
from infmoe.layers.base import FFNAux, FFNLayer
from infmoe.layers.dense import DenseMLP
from infmoe.layers.glu import GLU
from infmoe.layers.infinite_moe import InfiniteMoE, draw_train_samples, sampling
from infmoe.layers.topk_moe import TopKMoE

FFN_TYPES: dict[str, type[FFNLayer]] = {
    "dense": DenseMLP,
    "glu": GLU,
    "moe": TopKMoE,
    "infmoe": InfiniteMoE,
}


def ffn_option_names(ffn: str) -> list[str]:
    """The keyword-only options the variant `ffn` accepts."""
    params = inspect.signature(FFN_TYPES[choose("ffn", ffn, FFN_TYPES)]).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def current_option_names(ffn: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` (FFN options, or flat overrides that hold some) with each old name of a
    renamed option of `ffn` replaced by its new one; warns once per old name."""
    renames = FFN_TYPES[choose("ffn", ffn, FFN_TYPES)].RENAMED_OPTIONS
    return new_names(settings, renames, f"the ffn={ffn!r} option")


def build_ffn(ffn: str, d_model: int, d_hidden: int, options: dict | None = None) -> FFNLayer:
    """Construct the variant named `ffn`; unknown option keys raise a `ConfigError`."""
    options = current_option_names(ffn, options or {})
    allowed = ffn_option_names(ffn)
    for key in options:
        if key not in allowed:
            raise invalid(f"ffn_options.{key}", options[key],
                          f"ffn={ffn!r} accepts " + (", ".join(allowed) or "no options"))
    params = inspect.signature(FFN_TYPES[ffn]).parameters
    for name in allowed:
        if params[name].default is inspect.Parameter.empty and name not in options:
            raise ConfigError(f"ffn={ffn!r} needs the option {name!r}: set ffn_options.{name}")
    return FFN_TYPES[ffn](d_model, d_hidden, **options)


__all__ = ["FFN_TYPES", "FFNAux", "FFNLayer", "DenseMLP", "GLU", "TopKMoE", "InfiniteMoE",
           "sampling", "draw_train_samples", "build_ffn", "current_option_names", "ffn_option_names"]
