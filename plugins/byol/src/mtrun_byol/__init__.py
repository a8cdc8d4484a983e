"""BYOL for mtrun: the objective of SLAP (Siamese Language-Audio Pretraining).

Registered through the ``byol`` entry point in the ``mtrun`` group. The objective imports
torch, so it is imported when the registry is filled, not when this package is imported.
"""

from __future__ import annotations

from mtrun import hookimpl

__all__ = ["mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry) -> None:
    from mtrun_byol.objective import Byol

    registry.objective("byol", Byol)
