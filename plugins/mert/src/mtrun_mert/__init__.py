"""mtrun plugin: the MERT-v1 audio encoder (``audio_encoder`` named ``mert``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtrun.hookspecs import hookimpl
from mtrun_mert.encoder import PRESETS, MertEncoder

if TYPE_CHECKING:
    from mtrun.registry import Registry

__all__ = ["PRESETS", "MertEncoder", "mtrun_register_components"]


@hookimpl
def mtrun_register_components(registry: Registry) -> None:
    """Register ``mert`` as an audio encoder."""
    registry.audio_encoder("mert", MertEncoder)
