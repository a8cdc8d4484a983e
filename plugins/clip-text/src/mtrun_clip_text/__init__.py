"""mtrun plugin: the CLIP text tower as a :class:`~mtrun.interfaces.TextEncoder` (``clip-text``)."""

from __future__ import annotations

from mtrun import hookimpl

from mtrun_clip_text.encoder import PRESETS, ClipTextEncoder

__all__ = ["PRESETS", "ClipTextEncoder", "mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry) -> None:
    """Register ``clip-text`` as a text encoder."""
    registry.text_encoder("clip-text", ClipTextEncoder)
