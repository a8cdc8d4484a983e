"""The ``textswap`` augmenter for mtrun: hard-negative captions by keyword swaps (DuET-MC).

Registered through the ``textswap`` entry point in the ``mtrun`` group. See
:mod:`mtrun_textswap.augmenter` for what it writes into ``batch["hard_negatives"]``.
"""

from __future__ import annotations

from mtrun.hookspecs import hookimpl

__all__ = ["mtrun_register_components"]


@hookimpl
def mtrun_register_components(registry) -> None:
    from mtrun_textswap.augmenter import TextSwap

    registry.augmenter("textswap", TextSwap)
