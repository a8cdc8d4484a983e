"""Progress display: a rich bar on a terminal, plain log lines otherwise (rank 0 only).

Batch jobs and CI capture stdout to files, where a redrawn bar becomes noise; there a line every
``log_every`` steps carries the same numbers.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

__all__ = ["Progress"]


def _format(values: dict[str, Any]) -> str:
    parts = []
    for key in ("loss", "lr", "samples_per_s"):
        if key in values and values[key] is not None:
            v = float(values[key])
            parts.append(f"{key} {v:.2e}" if key == "lr" else f"{key} {v:.4g}" if key == "loss" else f"{key} {v:.1f}")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``, as the terminal bar shows time."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Shows training progress.

    Args:
        total_steps: Steps in the whole run.
        start_step: Steps already done (when resuming).
        enabled: False on ranks other than 0.
        log_every: Plain-line interval when the stream is not a terminal.
        stream: Where to write (stdout by default).
        clock: Seconds now (``time.monotonic``); plain lines show the time elapsed and an
            estimate of the time left, from the steps done since start.
    """

    def __init__(self, total_steps: int, *, start_step: int = 0, enabled: bool = True, log_every: int = 10,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.total = total_steps
        self.enabled = enabled
        self._clock, self._started, self._start_step = clock, clock(), start_step
        self.log_every = max(1, log_every)
        self.stream = stream or sys.stdout
        self._bar = None
        self._task = None
        if enabled and self.stream.isatty():
            from mtrun.console import make_console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
            from rich.progress import TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=make_console(file=self.stream),
            )
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")
            self._bar.start()

    def update(self, step: int, epoch: int, values: dict[str, Any] | None = None) -> None:
        """Advance to ``step`` (steps done); ``values`` are shown when given."""
        if not self.enabled:
            return
        if self._bar is not None:
            kwargs = {"info": _format(values)} if values else {}
            self._bar.update(self._task, completed=step, **kwargs)
        elif values is not None and (step % self.log_every == 0 or step == self.total):
            elapsed = self._clock() - self._started
            done = step - self._start_step
            left = f"  left {_clock(elapsed / done * (self.total - step))}" if done > 0 and step < self.total else ""
            print(f"step {step}/{self.total}  epoch {epoch}  {_format(values)}  elapsed {_clock(elapsed)}{left}",
                  file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line that does not disturb the bar (evaluation results, checkpoint paths)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
