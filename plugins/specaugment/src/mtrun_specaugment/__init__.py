"""mtrun plugin: SpecAugment time / frequency masks (``augmenter`` named ``specaugment``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtrun.hookspecs import hookimpl

if TYPE_CHECKING:
    from mtrun.registry import Registry

__all__ = ["mtrun_register_components"]


@hookimpl
def mtrun_register_components(registry: Registry) -> None:
    """Register ``specaugment`` as an augmenter (stage ``features``)."""
    from mtrun_specaugment.augmenter import SpecAugment

    registry.augmenter("specaugment", SpecAugment)
