"""One way to make a rich console, so that nothing mtrun prints depends on who reads it.

On a terminal rich wraps to the terminal's width, which is what a person wants. Elsewhere (a
log file, a pipe, a test capturing output, CI) rich falls back to 80 columns, or to whatever
``COLUMNS`` says, and would break a long file path or message across lines: a grep for the
path then finds nothing, and a test passes or fails with the width of whoever runs it. So when
the stream is not a terminal, lines are never wrapped and tables get room to lay out.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence, TextIO

__all__ = ["make_console", "print_table"]

_UNWRAPPED_WIDTH = 1000
"""Width given to tables when the output is not a terminal: they size to their content."""


def make_console(*, stderr: bool = False, file: TextIO | None = None, **kwargs: Any):
    """A ``rich.console.Console`` on ``file`` (or stdout/stderr) that only wraps on a terminal."""
    from rich.console import Console

    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return Console(file=stream, **kwargs)
    kwargs.setdefault("width", _UNWRAPPED_WIDTH)
    kwargs.setdefault("soft_wrap", True)
    return Console(file=stream, **kwargs)


def print_table(console: Any, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table of plain strings (no markup): a rich table on a terminal; elsewhere aligned
    text with the last column unpadded, one row a line, so a pipe or log gets no padding to
    the widest help text and no wrapped path. A cell's line breaks become ``"; "`` there."""
    if console.is_terminal:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=escape(title))
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        console.print(table)
        return
    flat = [[cell.replace("\n", "; ") for cell in row] for row in [list(columns), *rows]]
    widths = [max(len(row[i]) for row in flat) for i in range(len(columns) - 1)]
    console.print(title, markup=False, highlight=False)
    for row in flat:
        line = "  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]])
        console.print(line.rstrip(), markup=False, highlight=False)
