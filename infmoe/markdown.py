"""Markdown tables, the one way every generated report writes them (the bench, the
experiment report, benchmarks/gpu_check.py). Pure strings: no torch."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_row(cells: Sequence[str]) -> str:
    """One table line: "| a | b |"."""
    return "| " + " | ".join(cells) + " |"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table's lines: the header, its rule, one line per row of cells. No blank
    line around it: a caller that writes text after the table adds one."""
    return [markdown_row(header), "|" + "---|" * len(header), *map(markdown_row, rows)]


def number_cell(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`, or "-" where there is none."""
    return "-" if value is None else format(value, spec)
