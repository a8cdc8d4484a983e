"""MuLaP's three proxy tasks: audio-text matching, masked language and masked audio modelling.

Each reads the fusion's streams (``StepOutputs.fused_audio``/``fused_text``) when the recipe
has a ``[fusion]``, and the towers' outputs otherwise, so ``atm`` can also sit beside InfoNCE
in a two-tower recipe. The modules they are injected with (fusion, encoders, projectors) are
held by reference in a tuple: the system owns, trains and saves them once.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import mtrun
import torch
from mtrun import EncoderOutput, Need, ObjectiveOutput, StepOutputs
from torch import nn
from torch.nn import functional as F

from mtrun_mulap.masking import IGNORE_INDEX
from mtrun_mulap.sampling import caption_keys, draw_partners
from mtrun_mulap.vocabulary import MlmVocabulary

__all__ = ["Atm", "Mam", "Mlm"]


def _dropout(_instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"must be in [0, 1) (got {value})")


def _stream_width(fusion: Any, attribute: str, objective: str) -> int:
    """The fusion's width of one stream's tokens; a fusion must say it for a head to be built."""
    width = getattr(fusion, attribute, None)
    if not isinstance(width, int) or width <= 0:
        raise ValueError(
            f"objective {objective} puts a head on the fused tokens, but fusion {type(fusion).__name__} "
            f"does not declare their width (a positive int attribute {attribute!r})"
        )
    return width


def _rows(encoded: EncoderOutput, index: torch.Tensor) -> EncoderOutput:
    return EncoderOutput(
        tokens=encoded.tokens[index], pooled=encoded.pooled[index], mask=encoded.mask[index]
    )


def _global_generator() -> torch.Generator:
    """A CPU generator seeded from torch's global RNG, which the trainer reseeds every step
    (objectives get no augmentation context)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))


# --------------------------------------------------------------------------------- ATM


class Atm(nn.Module):
    """Audio-text matching: does this caption describe this audio? (MuLaP weight 2.0)

    A 2-way classifier, ``Linear(d, 2)`` after dropout, on the element-wise product of the
    pooled audio and text vectors; cross-entropy against ``matched`` (class 1 = the item's own
    caption). Logs ``accuracy``.

    Which vectors and which labels:

    * With a ``[fusion]``: the fused streams' pooled vectors (``d`` = the fusion's
      ``output_dim``). Labels are ``batch.matched`` from ``caption-swap``. Without it
      (evaluation, where caption-swap does not run, or a recipe without it), the objective
      makes its own negatives: with probability ``p`` an item is paired with another item's
      caption, and the fusion is run again on those pairs.
    * Without a fusion (a two-tower recipe, e.g. beside InfoNCE): the projections
      ``audio_embedding``/``text_embedding`` (``d`` = the audio projector's ``output_dim``).
      With ``batch.matched`` the text embeddings are already those of the swapped captions;
      without it, an item is paired with probability ``p`` with another item's text embedding.

    Own negatives never pair an item with its own row nor with a row whose caption is the same
    text; they are drawn from a generator seeded from torch's global RNG, which the trainer
    reseeds every step.
    """

    @attrs.frozen
    class Config:
        p: float = attrs.field(
            default=0.5,
            validator=mtrun.unit_interval,
            metadata={
                "help": "probability of pairing an item with another item's caption when the batch has no batch.matched (MuLaP: 0.5)"
            },
        )
        dropout: float = attrs.field(
            default=0.1,
            validator=_dropout,
            metadata={"help": "dropout on the product before the classifier (ViLBERT: 0.1)"},
        )

    def __init__(self, config: Config, *, fusion: Any = None, audio_projector: Any = None):
        super().__init__()
        self.config = config
        self._fusion = (fusion,)  # held, not owned: see the module docstring
        if fusion is not None:
            width = fusion.output_dim
        elif audio_projector is not None:
            width = audio_projector.output_dim
        else:
            raise ValueError(
                "objective atm needs a fusion (the fused pooled vectors) or an audio_projector (the projections)"
            )
        self.input_dim = int(width)
        self.drop = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(self.input_dim, 2)

    def _pairs(self, outputs: StepOutputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled audio ``[B, d]``, pooled text ``[B, d]`` and ``matched`` ``[B]``."""
        batch = outputs.batch
        matched = batch.get("matched") if isinstance(batch, dict) else None
        fused = outputs.fused_audio is not None and outputs.fused_text is not None
        audio = outputs.fused_audio.pooled if fused else outputs.audio_embedding
        text = outputs.fused_text.pooled if fused else outputs.text_embedding
        if matched is not None:
            return audio, text, matched.to(audio.device).bool()
        n = audio.shape[0]
        partner, swapped = draw_partners(caption_keys(batch, n), self.config.p, _global_generator())
        partner, swapped = partner.to(audio.device), swapped.to(audio.device)
        if not fused:
            return audio, text[partner], ~swapped
        fusion = self._fusion[0]
        if fusion is None:
            raise ValueError(
                "objective atm: the step has fused streams but atm was built without the fusion, so it cannot fuse negatives"
            )
        chosen = swapped.nonzero().squeeze(1)
        if chosen.numel() == 0:
            return audio, text, ~swapped
        neg_audio, neg_text = fusion(
            _rows(outputs.audio, chosen), _rows(outputs.text, partner[chosen])
        )
        audio = audio.index_copy(0, chosen, neg_audio.pooled.to(audio.dtype))
        text = text.index_copy(0, chosen, neg_text.pooled.to(text.dtype))
        return audio, text, ~swapped

    def forward(self, outputs: StepOutputs) -> ObjectiveOutput:
        audio, text, matched = self._pairs(outputs)
        if audio.shape[-1] != self.input_dim or text.shape[-1] != self.input_dim:
            raise ValueError(
                f"objective atm was built for {self.input_dim}-wide pooled vectors but got audio {audio.shape[-1]} "
                f"and text {text.shape[-1]}; two-tower ATM needs both projectors to have the same output_dim"
            )
        logits = self.classifier(self.drop(audio * text)).float()
        labels = matched.long()
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return ObjectiveOutput(loss=loss, metrics={"accuracy": accuracy.detach()})


# --------------------------------------------------------------------------------- MLM


class Mlm(nn.Module):
    """Masked language modelling on the fused text stream (MuLaP weight 0.1).

    BERT's prediction head, ``Linear(d, d)`` + GELU + LayerNorm + ``Linear(d, vocab)``, on the
    fused text tokens (``outputs.text.tokens`` without a fusion) at the positions
    ``batch.mlm_labels`` marks (written by ``mlm-mask``); cross-entropy with the original ids.
    The head is applied to the labelled positions only (BERT's gather), not the whole
    sequence. The decoder is not tied to the text encoder's input embeddings, which an
    encoder need not expose. A batch without labels gives a zero loss that still reaches the
    head's parameters (no NaN, and every parameter takes part in DDP's reduction).

    Logs ``accuracy`` (masked-token accuracy; 0 when there are no labels) and ``masked_tokens``.
    """

    requires: ClassVar[tuple[Need, ...]] = (
        Need(
            "augmenter",
            "mlm_labels",
            why="mlm predicts the caption tokens an mlm-mask augmenter hid and labelled",
        ),
    )

    @attrs.frozen
    class Config:
        eps: float = attrs.field(
            default=1e-12,
            validator=mtrun.positive,
            metadata={"help": "LayerNorm epsilon of the head (BERT: 1e-12)"},
        )

    def __init__(self, config: Config, *, text_encoder: Any = None, fusion: Any = None):
        super().__init__()
        self.config = config
        self.vocabulary = MlmVocabulary.of(text_encoder, component="objective mlm")
        width = (
            _stream_width(fusion, "text_width", "mlm")
            if fusion is not None
            else int(text_encoder.output_dim)
        )
        self.head = nn.Sequential(
            nn.Linear(width, width),
            nn.GELU(),
            nn.LayerNorm(width, eps=config.eps),
            nn.Linear(width, self.vocabulary.size),
        )

    def forward(self, outputs: StepOutputs) -> ObjectiveOutput:
        stream = outputs.fused_text if outputs.fused_text is not None else outputs.text
        tokens = stream.tokens
        labels = outputs.batch.get("mlm_labels")
        if labels is None:
            labels = torch.full(
                tokens.shape[:2], IGNORE_INDEX, dtype=torch.long, device=tokens.device
            )
        labels = labels.to(tokens.device)
        if labels.shape != tokens.shape[:2]:
            raise ValueError(
                f"objective mlm: batch.mlm_labels is {tuple(labels.shape)} but the text tokens are {tuple(tokens.shape[:2])}"
            )
        where = labels != IGNORE_INDEX
        logits = self.head(tokens[where]).float()  # [M, vocab]
        targets = labels[where]
        count = targets.numel()
        if count == 0:
            loss = logits.sum() * 0.0  # keeps the graph: a zero gradient for every head parameter
            accuracy = torch.zeros((), device=tokens.device)
        else:
            loss = F.cross_entropy(logits, targets)
            accuracy = (logits.argmax(dim=1) == targets).float().mean()
        return ObjectiveOutput(
            loss=loss, metrics={"accuracy": accuracy.detach(), "masked_tokens": float(count)}
        )


# --------------------------------------------------------------------------------- MAM


class Mam(nn.Module):
    """Masked audio modelling: regress the zeroed chunk features (MuLaP weight 4.0).

    ``Linear(fused audio width, audio encoder width)`` on the fused audio tokens
    (``outputs.audio.tokens`` without a fusion); mean squared error against
    ``batch.mam_target`` (the unmasked features), over the positions ``batch.mam_mask`` marks
    and every feature: ``sum(mask * (pred - target)^2) / (count * D)``. Both fields come from a
    ``mam-mask`` augmenter. With ``matched_only`` rows whose caption was swapped are left out.
    A batch without masked positions gives a zero loss that still reaches the head.

    Logs ``masked_chunks``.
    """

    requires: ClassVar[tuple[Need, ...]] = (
        Need(
            "augmenter",
            "masked_audio_features",
            why="mam regresses the audio chunk features a mam-mask augmenter zeroed",
        ),
    )

    @attrs.frozen
    class Config:
        matched_only: bool = attrs.field(
            default=False,
            metadata={
                "help": "leave out rows whose caption was swapped (batch.matched False); MuLaP/ViLBERT's default computes MAM on every row"
            },
        )

    def __init__(self, config: Config, *, audio_encoder: Any = None, fusion: Any = None):
        super().__init__()
        self.config = config
        if audio_encoder is None:
            raise ValueError(
                "objective mam needs the audio_encoder (the width of the features it regresses)"
            )
        features = int(audio_encoder.output_dim)
        width = _stream_width(fusion, "audio_width", "mam") if fusion is not None else features
        self.head = nn.Linear(width, features)

    def forward(self, outputs: StepOutputs) -> ObjectiveOutput:
        stream = outputs.fused_audio if outputs.fused_audio is not None else outputs.audio
        prediction = self.head(stream.tokens).float()  # [B, N, D]
        batch = outputs.batch
        mask, target = batch.get("mam_mask"), batch.get("mam_target")
        if mask is None or target is None:
            mask = torch.zeros(prediction.shape[:2], dtype=torch.bool, device=prediction.device)
            target = torch.zeros_like(prediction)
        mask, target = mask.to(prediction.device).bool(), target.to(prediction.device).float()
        if target.shape != prediction.shape:
            raise ValueError(
                f"objective mam: predictions are {tuple(prediction.shape)} but batch.mam_target is {tuple(target.shape)}; "
                "the fused audio stream must keep one token per encoder token"
            )
        matched = batch.get("matched")
        if self.config.matched_only and matched is not None:
            mask = mask & matched.to(mask.device).bool()[:, None]
        weight = mask[..., None].float()
        count = mask.sum()
        squared = (prediction - target.detach()).square() * weight
        loss = squared.sum() / (count.clamp(min=1) * prediction.shape[-1])
        return ObjectiveOutput(loss=loss, metrics={"masked_chunks": count.detach().float()})
