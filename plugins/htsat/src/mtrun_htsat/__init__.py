"""mtrun plugin: the HTS-AT audio encoder (``audio_encoder`` named ``htsat``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtrun import hookimpl
from mtrun_htsat.encoder import PRESETS, HtsatEncoder

if TYPE_CHECKING:
    from mtrun import Registry

__all__ = ["PRESETS", "HtsatEncoder", "mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry: Registry) -> None:
    """Register ``htsat`` as an audio encoder."""
    registry.audio_encoder("htsat", HtsatEncoder)
