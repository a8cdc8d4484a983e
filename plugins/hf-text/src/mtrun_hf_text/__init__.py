"""mtrun plugin: RoBERTa, BERT and T5 encoders from transformers as a text encoder (``hf-text``)."""

from __future__ import annotations

from mtrun import hookimpl

from mtrun_hf_text.encoder import PRESETS, HFTextEncoder

__all__ = ["PRESETS", "HFTextEncoder", "mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry) -> None:
    """Register ``hf-text`` as a text encoder."""
    registry.text_encoder("hf-text", HFTextEncoder)
