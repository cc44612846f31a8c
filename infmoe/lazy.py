"""A package's public names, loaded on first use (PEP 562 module `__getattr__`).

Importing such a package imports none of its modules: `import infmoe.launch` stays free of
torch until the command has made Ctrl-C quiet, `import infmoe.hf` needs no transformers, and
importing one module of a package never runs its siblings (so two of them may sit on either
side of another module: `infmoe.hf.export` → `infmoe.loading` → `infmoe.hf.reading`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, tuple[str, ...]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`, for `exports`: module → names it defines.

    Use as ``__getattr__, __dir__ = lazy_exports(__name__, {...})``; `__dir__` lists the
    package's `__all__`. A name, once loaded, is stored in the package, so later lookups do
    not reach `__getattr__`."""
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return list(getattr(sys.modules[package], "__all__", sorted(home)))

    return __getattr__, __dir__
