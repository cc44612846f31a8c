"""Errors that mean "the user asked for something impossible".

The command line turns any `InfmoeError` into one line on stderr and exit status 2;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class InfmoeError(Exception):
    """Bad input from the user: a one-line message that names the problem and the fix."""


class ConfigError(InfmoeError, ValueError):
    """An invalid layer option, model config field or config name."""


class DataError(InfmoeError):
    """A corpus that is missing, empty, unreadable, not text, or unreachable."""


class CheckpointError(InfmoeError):
    """A checkpoint that is missing, truncated, foreign, or does not fit the data."""


def invalid(field: str, value: object, allowed: str) -> ConfigError:
    """`ConfigError` in the project's one shape: field, offending value, what is allowed."""
    return ConfigError(f"{field}={value!r} is invalid: {allowed}")


def choose(field: str, value: str, choices: Iterable[str]) -> str:
    """Return `value` if it is one of `choices`, else raise a `ConfigError` listing them."""
    choices = list(choices)
    if value not in choices:
        raise invalid(field, value, "choose one of " + ", ".join(map(repr, choices)))
    return value


def flag(field: str, value: object) -> bool:
    """Return `value` if it is a bool (not 0/1 or a string), else raise a `ConfigError`."""
    if not isinstance(value, bool):
        raise invalid(field, value, "must be true or false")
    return value


def positive_int(field: str, value: object) -> int:
    """Return `value` if it is an int >= 1 (bools excluded), else raise a `ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(field, value, "must be an integer >= 1")
    return value


MAX_SEED = 2**63 - 1  # what torch, numpy and an int64 in a saved config all hold


def seed_int(field: str, value: object) -> int:
    """Return `value` if it is an int in [0, MAX_SEED] (bools excluded), else raise a `ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise invalid(field, value, "must be an integer in [0, 2**63 - 1]")
    return value


def real(field: str, value: object, *, low: float, high: float = float("inf"), open_low: bool = False) -> float:
    """Return `value` as a float if it is a finite number in [low, high] (or (low, high]
    when `open_low`), else raise a `ConfigError` stating the range. Infinity and NaN are
    refused even where the range is open above: no setting means "unbounded" by them, and
    a saved config could not hold them as JSON."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value > high or value < low or (open_low and value == low):
        if high == float("inf"):
            raise invalid(field, value, f"must be a finite number {'>' if open_low else '>='} {low:g}")
        raise invalid(field, value, f"must be a number in {'(' if open_low else '['}{low:g}, {high:g}]")
    return float(value)


def divisor(field: str, value: object, of: int, of_name: str) -> int:
    """Return `value` if it is a positive int dividing `of`, else raise a `ConfigError`."""
    if positive_int(field, value) and of % value:
        raise invalid(field, value, f"must divide {of_name}={of}")
    return value
