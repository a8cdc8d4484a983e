"""MuLaP's negatives for audio-text matching: some items get another item's caption."""

from __future__ import annotations

from typing import ClassVar

import attrs
import mtrun
import torch
from mtrun import AugmentContext, Batch

from mtrun_mulap.sampling import caption_keys, draw_partners

__all__ = ["CaptionSwap"]


class CaptionSwap:
    """Replaces, with probability ``p`` per item, the caption by another item's (``batch`` stage).

    The replacement comes from a row whose caption text differs (never the item's own row, never
    a duplicate of its caption); an item without such a row keeps its caption. The rows of
    every ``[B, ...]`` tensor in ``batch.text_inputs`` (``input_ids``, ``attention_mask``, ...)
    and ``batch.texts`` are replaced together, so the tokens always match the text. Writes
    ``batch.matched``: BoolTensor ``[B]``, True where the item keeps its own caption; the
    ``atm`` objective's labels, and ``mlm-mask`` clears the MLM labels of the other rows.
    ``batch.tags`` describe the audio and are left alone.

    Training only: in evaluation every pair is the original (``atm`` then makes its own
    negatives). Do not combine with a contrastive objective on the same batch, which would
    take the swapped captions for positives.
    """

    stage: ClassVar[str] = "batch"
    applies_in_eval: ClassVar[bool] = False

    @attrs.frozen
    class Config:
        p: float = attrs.field(
            default=0.5,
            validator=mtrun.unit_interval,
            metadata={
                "help": "probability that an item's caption is replaced by another item's (MuLaP: 0.5)"
            },
        )

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, batch: Batch, context: AugmentContext) -> Batch:
        inputs = batch["text_inputs"]
        ids = inputs["input_ids"]
        n = ids.shape[0]
        partner, swapped = draw_partners(caption_keys(batch, n), self.config.p, context.generator)
        rows = partner.to(ids.device)
        batch.text_inputs = {
            key: value[rows]
            if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == n
            else value
            for key, value in inputs.items()
        }
        texts = batch.get("texts")
        if texts is not None:
            batch.texts = [texts[j] for j in partner.tolist()]
        batch.matched = (~swapped).to(ids.device)
        return batch

    def __repr__(self) -> str:
        return f"CaptionSwap({self.config!r})"
