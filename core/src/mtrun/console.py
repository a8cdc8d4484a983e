"""One way to make a rich console, so that nothing mtrun prints depends on who reads it.

On a terminal rich wraps to the terminal's width, which is what a person wants. Elsewhere (a
log file, a pipe, a test capturing output, CI) rich falls back to 80 columns, or to whatever
``COLUMNS`` says, and would break a long file path or message across lines: a grep for the
path then finds nothing, and a test passes or fails with the width of whoever runs it. So when
the stream is not a terminal, lines are never wrapped and tables get room to lay out.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

__all__ = ["make_console"]

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
