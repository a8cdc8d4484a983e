"""The ``infonce`` objective for mtrun: symmetric InfoNCE over the global batch.

Registered through the ``infonce`` entry point in the ``mtrun`` group. With ``hard_negatives =
true`` it provides the ``hard_negatives`` capability: it uses ``batch.hard_negatives``
(:class:`mtrun.HardNegatives`, written by augmenters such as TextSwap); see
:mod:`mtrun_infonce.objective` for how.
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
