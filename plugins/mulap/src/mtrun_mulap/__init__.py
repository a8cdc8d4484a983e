"""mtrun plugin: MuLaP (music-language pre-training) as components.

Registered through the ``mulap`` entry point in the ``mtrun`` group:

* fusion ``co-attention``: ViLBERT-style two-stream co-attention over both encoders' tokens;
* augmenters ``caption-swap`` (``batch``), ``mlm-mask`` (``text_tokens``), ``mam-mask``
  (``encoded``);
* objectives ``atm`` (audio-text matching), ``mlm`` (masked language modelling), ``mam``
  (masked audio modelling).

A MuLaP step runs caption-swap -> mlm-mask -> encoders -> mam-mask -> co-attention ->
atm / mlm / mam; see the README.
"""

from __future__ import annotations

from mtrun import hookimpl

__all__ = ["mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry) -> None:
    """Register the co-attention fusion, three augmenters and three objectives."""
    # The component modules import torch; importing them here keeps `mtrun validate` fast.
    from mtrun_mulap.caption_swap import CaptionSwap
    from mtrun_mulap.coattention import CoAttention
    from mtrun_mulap.masking import MamMask, MlmMask
    from mtrun_mulap.objectives import Atm, Mam, Mlm

    registry.fusion("co-attention", CoAttention)
    registry.augmenter("caption-swap", CaptionSwap)
    registry.augmenter("mlm-mask", MlmMask)
    registry.augmenter("mam-mask", MamMask)
    registry.objective("atm", Atm)
    registry.objective("mlm", Mlm)
    registry.objective("mam", Mam)
