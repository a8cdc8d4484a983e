"""mtrun plugin: the MAViL / AudioMAE audio ViT (``audio_encoder`` named ``mavil``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtrun.hookspecs import hookimpl

if TYPE_CHECKING:
    from mtrun.registry import Registry

__all__ = ["mtrun_register_components"]


@hookimpl
def mtrun_register_components(registry: Registry) -> None:
    """Register ``mavil`` as an audio encoder."""
    from mtrun_mavil.encoder import MavilEncoder

    registry.audio_encoder("mavil", MavilEncoder)
