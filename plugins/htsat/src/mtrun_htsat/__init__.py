"""mtrun plugin: the HTS-AT audio encoder (``audio_encoder`` named ``htsat``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtrun.hookspecs import hookimpl
from mtrun_htsat.encoder import PRESETS, HtsatEncoder

if TYPE_CHECKING:
    from mtrun.registry import Registry

__all__ = ["PRESETS", "HtsatEncoder", "mtrun_register_components"]


@hookimpl
def mtrun_register_components(registry: Registry) -> None:
    """Register ``htsat`` as an audio encoder."""
    registry.audio_encoder("htsat", HtsatEncoder)
