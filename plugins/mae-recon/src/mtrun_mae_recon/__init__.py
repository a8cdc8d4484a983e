"""mtrun plugin: FLAP / AudioMAE masked reconstruction (``objective`` named ``mae-recon``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtrun import hookimpl

if TYPE_CHECKING:
    from mtrun import Registry

__all__ = ["mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry: Registry) -> None:
    """Register ``mae-recon`` as an objective."""
    from mtrun_mae_recon.objective import MaeReconstruction

    registry.objective("mae-recon", MaeReconstruction)
