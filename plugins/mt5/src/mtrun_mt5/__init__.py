"""mtrun plugin: the multilingual mT5 encoder as a :class:`~mtrun.interfaces.TextEncoder` (``mt5``)."""

from __future__ import annotations

from mtrun.hookspecs import hookimpl

from mtrun_mt5.encoder import PRESETS, MT5TextEncoder

__all__ = ["PRESETS", "MT5TextEncoder", "mtrun_register_components"]


@hookimpl
def mtrun_register_components(registry) -> None:
    """Register ``mt5`` as a text encoder."""
    registry.text_encoder("mt5", MT5TextEncoder)
