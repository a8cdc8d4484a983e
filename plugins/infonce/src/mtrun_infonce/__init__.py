"""The ``infonce`` objective for mtrun: symmetric InfoNCE over the global batch.

Registered through the ``infonce`` entry point in the ``mtrun`` group. See
:mod:`mtrun_infonce.objective` for the ``batch["hard_negatives"]`` contract that hard-negative
augmenters (TextSwap) follow.
"""

from __future__ import annotations

from mtrun import hookimpl

__all__ = ["mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry) -> None:
    from mtrun_infonce.objective import InfoNCE

    registry.objective("infonce", InfoNCE)
