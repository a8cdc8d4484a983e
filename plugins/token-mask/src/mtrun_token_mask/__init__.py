"""mtrun plugin: FLAP's 1-D / 2-D audio token masking (``augmenter`` named ``token-mask``)."""

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
    """Register ``token-mask`` as an augmenter (stage ``audio_tokens``)."""
    from mtrun_token_mask.masking import TokenMask

    registry.augmenter("token-mask", TokenMask)
