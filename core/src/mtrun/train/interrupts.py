"""Ctrl-C and SIGTERM during training: finish the step, save it, then stop.

A signal that lands mid-step would otherwise lose every step since the last periodic
checkpoint. While :class:`StopRequests` is installed, the first SIGINT or SIGTERM only records
itself; the training loop checks :attr:`StopRequests.requested` after each step, writes a
checkpoint and raises ``KeyboardInterrupt`` (the command line then prints how to resume). A
second signal interrupts at once, for a step that takes too long.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["StopRequests"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Defers SIGINT/SIGTERM to the next step boundary between :meth:`install` and
    :meth:`restore`.

    Inactive (signals behave as before) when ``enabled`` is false or outside the main thread,
    where Python cannot install handlers. The trainer disables it under DDP: ranks would see
    the request after different steps and wait on each other's collectives.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal_name: str | None = None
        self.forced = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def install(self) -> None:
        if self.enabled:
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
