"""MuLaP's input corruptions: BERT's masked tokens and zeroed audio chunk features."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import mtrun
import torch
from mtrun import AugmentContext, Batch, Need

from mtrun_mulap.sampling import choose_positions, token_noise
from mtrun_mulap.vocabulary import MlmVocabulary

__all__ = ["IGNORE_INDEX", "MamMask", "MlmMask"]

IGNORE_INDEX = -100
"""Label of positions without an MLM target (``torch.nn.functional.cross_entropy``'s default)."""


def _fraction_below_one(_instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"must be between 0 and 1, both excluded (got {value})")


class MlmMask:
    """BERT's masking of caption tokens (``text_tokens`` stage), the input of the ``mlm`` objective.

    Chooses ``max(1, round(ratio * n))`` of each caption's ``n`` real, non-special tokens; of
    those, ``mask_prob`` become ``[MASK]``, ``random_prob`` a random non-special token id and
    the rest stay as they are (BERT: 80/10/10), so the model cannot tell the targets by looking
    for ``[MASK]``. Writes ``batch.mlm_labels``, LongTensor ``[B, L]``: the original id at the
    chosen positions, -100 elsewhere.

    Rows whose caption was swapped (``batch.matched`` False, from ``caption-swap``) keep their
    masked tokens but lose their labels: predicting words of a caption that does not describe
    the audio teaches nothing about the audio, and masking every row alike keeps ``[MASK]``
    from telling matched and swapped pairs apart.

    Runs in evaluation too by default (``in_eval``), so a validation MLM loss is measured on
    held-out captions masked the same way (with the evaluation's seeded generator).

    Needs the text encoder's vocabulary: its ``[MASK]`` id, special ids and size, read from the
    injected ``text_encoder`` (``hf-text`` with BERT or RoBERTa); a text encoder without them
    is refused when the augmenter is built.
    """

    stage: ClassVar[str] = "text_tokens"
    provides: ClassVar[frozenset[str]] = frozenset({"mlm_labels"})
    requires: ClassVar[tuple[Need, ...]] = (
        Need("text_encoder", "masked_lm_vocabulary", why="mlm-mask replaces caption tokens by the tokenizer's mask token"),
    )

    @attrs.frozen
    class Config:
        ratio: float = attrs.field(
            default=0.15,
            validator=_fraction_below_one,
            metadata={
                "help": "fraction of each caption's real, non-special tokens chosen as targets (BERT: 0.15; at least one)"
            },
        )
        mask_prob: float = attrs.field(
            default=0.8,
            validator=mtrun.unit_interval,
            metadata={"help": "share of the chosen tokens replaced by [MASK] (BERT: 0.8)"},
        )
        random_prob: float = attrs.field(
            default=0.1,
            validator=mtrun.unit_interval,
            metadata={
                "help": "share of the chosen tokens replaced by a random non-special token (BERT: 0.1); the rest stay unchanged"
            },
        )
        in_eval: bool = attrs.field(
            default=True,
            metadata={
                "help": "also mask in evaluation, so the validation MLM loss is measured (seeded per evaluation batch)"
            },
        )

        def __attrs_post_init__(self) -> None:
            if self.mask_prob + self.random_prob > 1.0 + 1e-9:
                raise ValueError(
                    f"mask_prob + random_prob must be at most 1 (got {self.mask_prob} + {self.random_prob})"
                )

    def __init__(self, config: Config, *, text_encoder: Any = None):
        self.config = config
        self.applies_in_eval = config.in_eval
        self.vocabulary = MlmVocabulary.of(text_encoder, component="augmenter mlm-mask")
        special = sorted(self.vocabulary.special_ids)
        ordinary = torch.ones(self.vocabulary.size, dtype=torch.bool)
        ordinary[[i for i in special if i < self.vocabulary.size]] = False
        self._special = torch.tensor(special, dtype=torch.long)
        self._ordinary = ordinary.nonzero().squeeze(1)  # ids a random replacement is drawn from

    def __call__(self, batch: Batch, context: AugmentContext) -> Batch:
        cfg = self.config
        ids = batch.text_inputs["input_ids"]
        real = batch.text_inputs["attention_mask"].bool()
        candidates = real & ~torch.isin(ids, self._special.to(ids.device))
        # Each item's own draws per real token (sampling.token_noise): which tokens, which
        # replacement, which random id.
        noise = token_noise(context, "mlm-mask", real, 3)
        chosen = choose_positions(candidates, cfg.ratio, None, scores=noise[0])
        u = noise[1].to(ids.device)
        pick = (noise[2] * len(self._ordinary)).long().clamp(max=len(self._ordinary) - 1)
        random_ids = self._ordinary[pick].to(ids.device)
        to_mask = chosen & (u < cfg.mask_prob)
        to_random = chosen & (u >= cfg.mask_prob) & (u < cfg.mask_prob + cfg.random_prob)
        masked = torch.where(to_mask, torch.full_like(ids, self.vocabulary.mask_id), ids)
        masked = torch.where(to_random, random_ids.to(ids.dtype), masked)
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX)).long()
        matched = batch.get("matched")
        if matched is not None:
            labels = labels.masked_fill(~matched.to(labels.device).bool()[:, None], IGNORE_INDEX)
        batch.text_inputs = {**batch.text_inputs, "input_ids": masked}
        batch.mlm_labels = labels
        return batch

    def __repr__(self) -> str:
        return f"MlmMask({self.config!r})"


class MamMask:
    """Zeroes a fraction of the audio chunk features (``encoded`` stage), the input of ``mam``.

    Chooses ``max(1, round(ratio * n))`` of each item's ``n`` real chunk tokens (rows of
    ``batch.audio_encoded.tokens`` where the mask is True) and sets them to zero. Writes
    ``batch.mam_mask`` (BoolTensor ``[B, N]``, the zeroed positions) and ``batch.mam_target``
    (the original tokens ``[B, N, D]``, detached), and replaces ``batch.audio_encoded`` with the
    masked tokens, which the fusion (and the audio projector) then read.

    ``skip_first`` (default) never masks token 0: for ``musicnn`` it is the mean of the chunks,
    MuLaP's global audio token. It is not a chunk to reconstruct, and the fusion's pooled
    audio vector (hence ATM) is read from it. As in ViLBERT, whose global image feature is the
    mean over regions taken before any region is masked, it keeps the unmasked mean.

    ``pooled`` is left as the encoder computed it: the masking corrupts the fusion's input, not
    the encoder's own summary, whose meaning (mean, [CLS], token 0) differs by encoder.

    Runs in evaluation too by default (``in_eval``), so a validation MAM loss is measured.
    """

    stage: ClassVar[str] = "encoded"
    provides: ClassVar[frozenset[str]] = frozenset({"masked_audio_features"})

    @attrs.frozen
    class Config:
        ratio: float = attrs.field(
            default=0.15,
            validator=_fraction_below_one,
            metadata={
                "help": "fraction of each item's real chunk tokens zeroed (MuLaP: 0.15; at least one)"
            },
        )
        skip_first: bool = attrs.field(
            default=True,
            metadata={
                "help": "never mask token 0 (musicnn's mean of the chunks, the fusion's pooled audio token); see the README"
            },
        )
        in_eval: bool = attrs.field(
            default=True,
            metadata={
                "help": "also mask in evaluation, so the validation MAM loss is measured (seeded per evaluation batch)"
            },
        )

    def __init__(self, config: Config):
        self.config = config
        self.applies_in_eval = config.in_eval

    def __call__(self, batch: Batch, context: AugmentContext) -> Batch:
        encoded = batch.audio_encoded
        tokens = encoded.tokens
        b, n = tokens.shape[:2]
        real = (
            torch.ones(b, n, dtype=torch.bool, device=tokens.device)
            if encoded.mask is None
            else encoded.mask.bool()
        )
        noise = token_noise(context, "mam-mask", real, 1)[0]  # each item's own draws
        if self.config.skip_first:
            real = real & (torch.arange(n, device=real.device) > 0)
        chosen = choose_positions(real, self.config.ratio, None, scores=noise)
        batch.mam_mask = chosen
        batch.mam_target = tokens.detach()
        batch.audio_encoded = attrs.evolve(
            encoded, tokens=tokens.masked_fill(chosen[..., None], 0.0)
        )
        return batch

    def __repr__(self) -> str:
        return f"MamMask({self.config!r})"
