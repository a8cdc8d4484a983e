"""mtrun plugin: the multilingual mT5 encoder as a :class:`~mtrun.interfaces.TextEncoder` (``mt5``)."""

from __future__ import annotations

from mtrun import hookimpl

from mtrun_mt5.encoder import PRESETS, MT5TextEncoder

__all__ = ["PRESETS", "MT5TextEncoder", "mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry) -> None:
    """Register ``mt5`` as a text encoder."""
    registry.text_encoder("mt5", MT5TextEncoder)
