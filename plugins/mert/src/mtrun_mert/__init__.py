"""mtrun plugin: the MERT-v1 audio encoder (``audio_encoder`` named ``mert``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtrun import hookimpl
from mtrun_mert.encoder import PRESETS, MertEncoder

if TYPE_CHECKING:
    from mtrun import Registry

__all__ = ["PRESETS", "MertEncoder", "mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry: Registry) -> None:
    """Register ``mert`` as an audio encoder."""
    registry.audio_encoder("mert", MertEncoder)
