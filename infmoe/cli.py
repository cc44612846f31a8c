"""The `infmoe` command: one entry point, one subcommand per task.

Bad input (any `InfmoeError`, or an argparse mistake) prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from infmoe.errors import ConfigError, InfmoeError
from infmoe.models import config_names, get_config
from infmoe.params import parameter_report


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """``--key value`` or ``--key=value`` pairs → {key: value}, values typed as YAML
    scalars (``--d_z 32`` gives 32, ``--capacity_factor null`` gives None)."""
    out: dict[str, Any] = {}
    tokens = list(tokens)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}: config overrides look like --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if not tokens or tokens[0].startswith("--"):
                raise ConfigError(f"config override --{key} has no value: write --{key} VALUE")
            value = tokens.pop(0)
        out[key.replace("-", "_")] = _scalar(value)
    return out


def _scalar(text: str) -> Any:
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def cmd_params(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    samples = _int_list("--samples", args.samples)
    reports = [parameter_report(get_config(c, **overrides), c, samples) for c in args.configs or config_names()]
    if args.json:
        print(json.dumps([r.__dict__ for r in reports], indent=2))
        return
    table = Table(title="parameters and forward FLOPs per token (≤: upper bound on the union of K masks)")
    for column in ["config", "ffn", "total"] + [f"active K={k}" for k in samples] + [f"FLOPs K={k}" for k in samples]:
        table.add_column(column, justify="left" if column in ("config", "ffn") else "right")
    for r in reports:
        mark = {k: "" if r.exact[k] else "≤" for k in samples}
        table.add_row(r.name, r.ffn, _si(r.total), *(mark[k] + _si(r.active[k]) for k in samples),
                      *(mark[k] + _si(r.flops[k]) for k in samples))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of integers, e.g. 1,2,4") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"{flag} {text!r}: every K must be >= 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="infmoe", description="∞-MoE: mixture of experts with a continuous expert index.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("params", help="total/active parameters and FLOPs per token of named configs",
                       description="Print total and active parameters and forward FLOPs per token. "
                                   "Trailing --key value pairs override config fields for every config.")
    p.add_argument("configs", nargs="*", help=f"config names or .json/.yaml files (default: all of {', '.join(config_names())})")
    p.add_argument("--samples", default="1,2,4", help="routing samples K to report, e.g. 1,2,4")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_params)
    return parser


def split_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--key value`` config overrides from the subcommand's own arguments,
    so an override's value is never taken for a positional argument."""
    argv = list(argv)
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = next((t for t in argv if not t.startswith("-")), None)
    if sub is None or command not in sub.choices:
        return argv, []
    known = sub.choices[command]._option_string_actions
    own, overrides = [], []
    while argv:
        token = argv.pop(0)
        name = token.partition("=")[0]
        if token.startswith("--") and len(token) > 2 and name not in known:
            overrides.append(token)
            if "=" not in token and argv and not argv[0].startswith("--"):
                overrides.append(argv.pop(0))
        else:
            own.append(token)
    return own, overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    own, rest = split_overrides(parser, sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    try:
        args.handler(args, parse_overrides(rest))
    except InfmoeError as err:
        print(f"infmoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
