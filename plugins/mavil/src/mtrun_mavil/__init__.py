"""mtrun plugin: the MAViL / AudioMAE audio ViT (``audio_encoder`` named ``mavil``)."""

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
    """Register ``mavil`` as an audio encoder."""
    from mtrun_mavil.encoder import MavilEncoder

    registry.audio_encoder("mavil", MavilEncoder)
