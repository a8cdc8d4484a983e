"""mtrun plugin: the musicnn audio encoder (``audio_encoder`` named ``musicnn``)."""

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
    """Register ``musicnn`` as an audio encoder."""
    # The encoder imports torch; importing it here keeps `mtrun validate` and `--help` fast.
    from mtrun_musicnn.encoder import MusicnnEncoder

    registry.audio_encoder("musicnn", MusicnnEncoder)
