"""The ``textswap`` augmenter for mtrun: hard-negative captions by keyword swaps (DuET-MC).

Registered through the ``textswap`` entry point in the ``mtrun`` group. It writes
``batch.hard_negatives`` (:class:`mtrun.HardNegatives`); see :mod:`mtrun_textswap.augmenter`.
"""

from __future__ import annotations

from mtrun import hookimpl

__all__ = ["mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry) -> None:
    from mtrun_textswap.augmenter import TextSwap

    registry.augmenter("textswap", TextSwap)
