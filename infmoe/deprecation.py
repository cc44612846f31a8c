"""Old names that infmoe still accepts after a rename: each warns once, in one line.

A renamed option, module or command keeps working under its old name, so that configs,
checkpoints, experiment specs and scripts written before the rename still run; the warning
names the new spelling. Imports nothing outside the standard library and `infmoe.errors`:
the layers use it, and an export's standalone copy of them may import nothing else
(`infmoe.hf.standalone`).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from infmoe.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
_warned: set[str] = set()  # old names already warned about in this process


class RenamedWarning(FutureWarning):
    """An old name was used. A FutureWarning, not a DeprecationWarning: Python shows those
    to the users of a library by default, and it is users whose configs hold the old names."""


def renamed(old: str, new: str, what: str = "") -> None:
    """Warn, the first time in this process that `old` is used, that it is now `new`.
    what: the kind of name, e.g. "the ∞-MoE option" (the message: "<what> <old> is now <new>; ...")."""
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(f"{what + ' ' if what else ''}{old} is now {new}; the old name still works for now",
                  RenamedWarning, stacklevel=3)


def new_names(settings: Mapping[str, Any], renames: Mapping[str, str], what: str = "") -> dict[str, Any]:
    """`settings` with each old key of `renames` ({old: new}) replaced by its new one, in
    place (the order stays), warning once per old name. A `ConfigError` when a setting is
    given under both names, which would leave it unclear which one counts."""
    for old, new in renames.items():
        if old in settings:
            if new in settings:
                raise ConfigError(f"{old} and {new} are one option ({old} is its old name): give only {new}")
            renamed(old, new, what)
    return {renames.get(key, key): value for key, value in settings.items()}


def renamed_keywords(renames: Mapping[str, str], what: str = "") -> Callable[[F], F]:
    """Decorator: the function also takes each old keyword of `renames` ({old: new}) as its
    new one (`new_names`). Its signature, as `inspect.signature` reads it, has the new names only."""
    def wrap(function: F) -> F:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **new_names(kwargs, renames, what))
        return call  # type: ignore[return-value]
    return wrap


@contextlib.contextmanager
def one_line_warnings(prog: str) -> Iterator[None]:
    """Within the block, show a `RenamedWarning` as one line ``<prog>: warning: ...`` on
    stderr (the command line's style) instead of Python's file:line and source line."""
    with warnings.catch_warnings():  # restores showwarning (and the filters) on the way out
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, RenamedWarning):
                print(f"{prog}: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
