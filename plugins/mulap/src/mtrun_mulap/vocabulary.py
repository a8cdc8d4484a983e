"""What masked language modelling needs to know about the text encoder's tokenizer."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["MlmVocabulary"]


@attrs.frozen
class MlmVocabulary:
    """The token ids MLM uses.

    Attributes:
        size: Number of token ids (the output width of the MLM head).
        mask_id: The ``[MASK]`` token's id.
        special_ids: Ids never chosen for masking nor drawn as random replacements
            (``[CLS]``, ``[SEP]``, ``[PAD]``, ``[MASK]``, ``[UNK]``, ...).
    """

    size: int
    mask_id: int
    special_ids: frozenset[int]

    @classmethod
    def of(cls, text_encoder: Any, *, component: str) -> MlmVocabulary:
        """Read it from a text encoder with a masked-LM tokenizer (``hf-text`` with BERT or
        RoBERTa): ``tokenizer.mask_token_id``, ``tokenizer.all_special_ids`` and
        ``vocab_size`` (or ``len(tokenizer)``).

        Raises:
            ValueError: ``text_encoder`` is missing or lacks any of these, naming its type and
                ``component`` (the one that needs it).
        """
        if text_encoder is None:
            raise ValueError(
                f"{component} needs the text encoder's vocabulary, but no text_encoder was given"
            )
        what = type(text_encoder).__name__
        tokenizer = getattr(text_encoder, "tokenizer", None)
        mask_id = getattr(text_encoder, "mask_token_id", None)
        if mask_id is None and tokenizer is not None:
            mask_id = getattr(tokenizer, "mask_token_id", None)
        special = getattr(tokenizer, "all_special_ids", None) if tokenizer is not None else None
        size = getattr(text_encoder, "vocab_size", None)
        if size is None and tokenizer is not None:
            try:
                size = len(tokenizer)
            except TypeError:
                size = None
        missing = [
            name
            for name, value in (
                ("tokenizer", tokenizer),
                ("a [MASK] token id", mask_id),
                ("the special token ids", special),
                ("vocab_size", size),
            )
            if value is None
        ]
        if missing:
            raise ValueError(
                f"{component} needs a text encoder with a masked-LM vocabulary (tokenizer.mask_token_id, "
                f"tokenizer.all_special_ids and vocab_size); text encoder {what} lacks {', '.join(missing)}. "
                "Use hf-text with a BERT or RoBERTa checkpoint (CLIP and T5 tokenizers have no [MASK] token)"
            )
        size, mask_id = int(size), int(mask_id)
        specials = frozenset(int(i) for i in special) | {mask_id}
        if not 0 <= mask_id < size or len(specials) >= size:
            raise ValueError(
                f"{component}: text encoder {what} has [MASK] id {mask_id} and {len(specials)} special ids for a vocabulary of {size}"
            )
        return cls(size=size, mask_id=mask_id, special_ids=specials)
