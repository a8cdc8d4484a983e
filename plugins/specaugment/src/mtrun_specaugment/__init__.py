"""mtrun plugin: SpecAugment time / frequency masks (``augmenter`` named ``specaugment``)."""

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
    """Register ``specaugment`` as an augmenter (stage ``features``)."""
    from mtrun_specaugment.augmenter import SpecAugment

    registry.augmenter("specaugment", SpecAugment)
