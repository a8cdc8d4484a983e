"""mtrun plugin: FLAP's 1-D / 2-D audio token masking (``augmenter`` named ``token-mask``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtrun.hookspecs import hookimpl

if TYPE_CHECKING:
    from mtrun.registry import Registry

__all__ = ["mtrun_register_components"]


@hookimpl
def mtrun_register_components(registry: Registry) -> None:
    """Register ``token-mask`` as an augmenter (stage ``audio_tokens``)."""
    from mtrun_token_mask.masking import TokenMask

    registry.augmenter("token-mask", TokenMask)
