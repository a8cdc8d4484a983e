"""Symmetric InfoNCE over the global batch, with hard negatives and false-negative masking.

Hard negatives
--------------
With ``hard_negatives = true`` the objective provides the ``hard_negatives`` capability: it
reads ``batch.hard_negatives``, an :class:`mtrun.HardNegatives` a ``batch`` augmenter
(TextSwap) wrote (that class's docstring is the contract). Absent, or ``H = 0``, means none
for this batch. How they enter the loss:

* The captions are embedded with the injected ``text_encoder`` and ``text_projector`` (the
  same modules, so the same weights and gradients, as the batch's own texts): from
  ``text_inputs`` when given, else from ``texts`` tokenized by the text encoder.
* Only the audio->text rows of the anchors change: in anchor ``i``'s row each replaced column
  ``j`` is removed from the softmax and the hard negative's similarity is added. Several hard
  negatives may name the same anchor, and even the same ``j`` (the in-batch text is removed
  once and each hard negative is added). The text->audio direction and every other row are
  unchanged (a hard-negative caption has no audio positive).
* Under DDP the indices arrive local to the rank's micro-batch; the objective converts them
  to global-batch indices. Invalid indices (``anchor`` outside ``[0, B)``, ``replaces``
  outside ``[-1, B)`` or equal to ``anchor``) raise ``ValueError`` naming the entry.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar, Sequence

import attrs
import torch
from torch import nn
from torch.nn import functional as F

import mtrun
from mtrun import Batch, HardNegatives, ObjectiveOutput, StepOutputs

__all__ = ["InfoNCE", "contrastive_logits", "group_ids"]


def group_ids(groups: Sequence[str | None] | None, n: int) -> torch.Tensor:
    """Stable int64 ids for group names (a 62-bit hash, equal on every rank); ``None`` -> -1.

    Ranks must agree on the id of a track without exchanging strings, so Python's salted
    ``hash`` is no good; blake2b is deterministic everywhere.
    """
    if groups is None:
        return torch.full((n,), -1, dtype=torch.long)
    if len(groups) != n:
        raise ValueError(f"batch.groups has {len(groups)} entries for {n} items")
    ids = [
        -1 if g is None else int.from_bytes(hashlib.blake2b(str(g).encode(), digest_size=8).digest(), "little") >> 2
        for g in groups
    ]
    return torch.tensor(ids, dtype=torch.long)


def contrastive_logits(
    audio: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    groups: torch.Tensor | None = None,
    hard_text: torch.Tensor | None = None,
    hard_anchor: torch.Tensor | None = None,
    hard_replaces: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked logits of both directions for a (global) batch; the targets are ``arange(N)``.

    Args:
        audio: L2-normalised audio embeddings ``[N, D]``.
        text: L2-normalised text embeddings ``[N, D]``; row ``i`` is audio ``i``'s positive.
        scale: Logit scale (1 / temperature).
        groups: ``[N]`` int64 group ids, -1 for none: items sharing an id are removed from
            each other's negatives in both directions (``-inf``), the diagonal kept.
        hard_text: L2-normalised hard-negative embeddings ``[H, D]``.
        hard_anchor: ``[H]`` audio row each hard negative belongs to.
        hard_replaces: ``[H]`` text column it removes from that row, or -1.

    Returns:
        ``a2t [N, N + H]`` (hard-negative column ``N + h`` is finite only in row
        ``hard_anchor[h]``) and ``t2a [N, N]``.
    """
    n = audio.shape[0]
    logits = scale * (audio @ text.T)
    if groups is not None:
        same = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
        same &= ~torch.eye(n, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same, float("-inf"))
    t2a = logits.T
    a2t = logits
    if hard_text is not None and hard_text.shape[0] > 0:
        h = hard_text.shape[0]
        cols = torch.arange(h, device=logits.device)
        own = torch.zeros(n, h, dtype=torch.bool, device=logits.device)
        own[hard_anchor, cols] = True
        extra = (scale * (audio @ hard_text.T)).masked_fill(~own, float("-inf"))
        replacing = hard_replaces >= 0
        dropped = torch.zeros(n, n, dtype=torch.bool, device=logits.device)
        dropped[hard_anchor[replacing], hard_replaces[replacing]] = True
        a2t = torch.cat([a2t.masked_fill(dropped, float("-inf")), extra], dim=1)
    return a2t, t2a


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half precision upcast; float64, as in exactness tests, kept)."""
    return x if x.dtype == torch.float64 else x.float()


class InfoNCE(nn.Module):
    """Symmetric InfoNCE on L2-normalised embeddings, negatives from the whole global batch.

    ``loss = (CE(a2t) + CE(t2a)) / 2`` with cosine logits scaled by 1 / temperature. Under
    torchrun DDP the embeddings of every rank are gathered with gradient
    (:func:`mtrun.all_gather_with_grad`), so each rank computes the loss of the
    global batch and the gradients equal a single process's on that batch. Optional: a
    learnable temperature (CLIP/CLAP style, clamped), removing same-track false negatives
    (``batch.groups``), and hard-negative captions (``batch.hard_negatives``, an
    :class:`mtrun.HardNegatives`; see the module docstring).

    Args:
        config: The recipe settings.
        text_encoder: The system's text encoder, used to embed hard-negative captions.
        text_projector: The system's text projector, likewise. Both are held by reference and
            are *not* registered as submodules: the system owns them, and registering them
            twice would duplicate their weights in checkpoints.
    """

    @attrs.frozen
    class Config:
        temperature: float = attrs.field(
            default=0.03,
            validator=mtrun.positive,
            metadata={"help": "softmax temperature (DuET-MC: fixed 0.03); the initial value when learnable (CLAP/FLAP: 0.07)"},
        )
        learnable: bool = attrs.field(default=False, metadata={"help": "learn the temperature (as a log logit scale)"})
        max_logit_scale: float = attrs.field(
            default=100.0,
            validator=attrs.validators.ge(1.0),
            metadata={"help": "upper bound of a learnable logit scale 1/temperature (CLIP: 100)"},
        )
        mask_same_group: bool = attrs.field(
            default=False,
            metadata={"help": "remove items sharing batch.groups (track id) from each other's negatives"},
        )
        hard_negatives: bool = attrs.field(
            default=True,
            metadata={"help": "use batch.hard_negatives (TextSwap) when present; costs one small collective per step under DDP"},
        )

        def __attrs_post_init__(self) -> None:
            if self.learnable and 1.0 / self.temperature > self.max_logit_scale:
                raise ValueError(
                    f"initial logit scale 1/temperature = {1 / self.temperature:.4g} exceeds max_logit_scale = {self.max_logit_scale}"
                )

    embedding_only: ClassVar[bool] = True
    """The loss reads the embeddings and ``batch.groups`` only, so ``[trainer] gradient_cache``
    can give it a whole batch's embeddings. (Hard-negative captions are embedded here, in a
    pass the gradient cache does not replay; the trainer refuses that pairing.)"""

    @staticmethod
    def provides(config: Config) -> frozenset[str]:
        """The capabilities an InfoNCE with ``config`` provides: ``hard_negatives`` exactly when
        ``config.hard_negatives`` is on (it then uses ``batch.hard_negatives``)."""
        return frozenset({"hard_negatives"}) if config.hard_negatives else frozenset()

    def __init__(self, config: Config, *, text_encoder: Any = None, text_projector: Any = None):
        super().__init__()
        self.config = config
        # A tuple is not registered by nn.Module: see the class docstring.
        self._text_arm = (text_encoder, text_projector)
        if config.learnable:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.temperature)))
        else:
            self.logit_scale = None
        self._max_log_scale = math.log(config.max_logit_scale)

    # ------------------------------------------------------------------ temperature

    def scale(self) -> torch.Tensor:
        """The logit scale 1/temperature in use (clamped to ``[1, max_logit_scale]`` when learnable)."""
        if self.logit_scale is None:
            return torch.tensor(1.0 / self.config.temperature, dtype=torch.float64)
        return _wide(self.logit_scale).clamp(0.0, self._max_log_scale).exp()

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """Keep a learnable log-scale inside its bounds, so it never sits where the clamp in
        :meth:`scale` zeroes its gradient (open_clip clamps after each step the same way)."""
        if self.logit_scale is not None:
            self.logit_scale.clamp_(0.0, self._max_log_scale)

    # ------------------------------------------------------------------ hard negatives

    def _local_hard_negatives(self, batch: Batch, n_local: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's hard negatives: embeddings ``[H, D]`` (un-normalised), anchor and replaces ``[H]``."""
        device = like.device
        hard = batch.get("hard_negatives") if isinstance(batch, dict) else None
        empty_idx = torch.zeros(0, dtype=torch.long, device=device)
        if hard is None:
            return like.new_zeros((0, like.shape[1])), empty_idx, empty_idx
        if not isinstance(hard, HardNegatives):
            raise TypeError(f"batch.hard_negatives must be mtrun.HardNegatives (got {type(hard).__name__})")
        anchor = torch.as_tensor(hard.anchor, dtype=torch.long, device=device).reshape(-1)
        replaces = torch.as_tensor(hard.replaces, dtype=torch.long, device=device).reshape(-1)
        h = anchor.shape[0]
        if replaces.shape[0] != h:
            raise ValueError(f"hard_negatives: anchor has {h} entries but replaces has {replaces.shape[0]}")
        if h == 0:
            return like.new_zeros((0, like.shape[1])), empty_idx, empty_idx
        bad = (anchor < 0) | (anchor >= n_local) | (replaces < -1) | (replaces >= n_local) | (replaces == anchor)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"hard_negatives[{i}]: anchor={int(anchor[i])}, replaces={int(replaces[i])} is invalid for a batch of "
                f"{n_local}: need 0 <= anchor < B, -1 <= replaces < B and replaces != anchor"
            )
        text_encoder, text_projector = self._text_arm
        if text_encoder is None or text_projector is None:
            raise ValueError("the batch has hard_negatives but InfoNCE was built without text_encoder and text_projector")
        inputs = hard.text_inputs
        if inputs is None:
            if len(hard.texts) != h:
                raise ValueError(f"hard_negatives has {len(hard.texts)} texts (and no text_inputs) for its {h} captions")
            inputs = text_encoder.tokenize(list(hard.texts))
        ids = inputs["input_ids"].to(device)
        mask = inputs["attention_mask"].to(device)
        if ids.shape[0] != h:
            raise ValueError(f"hard_negatives: {ids.shape[0]} tokenized captions for {h} anchors")
        embedded = text_projector(text_encoder(ids, mask))
        return embedded, anchor, replaces

    # ------------------------------------------------------------------ loss

    def forward(self, outputs: StepOutputs) -> ObjectiveOutput:
        """Loss and metrics (directional losses and accuracies, temperature) of the global batch."""
        batch = outputs.batch
        audio, text = outputs.audio_embedding, outputs.text_embedding
        n_local = audio.shape[0]
        hard = self._local_hard_negatives(batch, n_local, text) if self.config.hard_negatives else None
        groups_local = None
        if self.config.mask_same_group:
            if "groups" not in batch:
                raise ValueError("mask_same_group is on but the batch has no 'groups'")
            groups_local = group_ids(batch["groups"], n_local).to(audio.device)

        with torch.autocast(device_type=audio.device.type, enabled=False):
            a = mtrun.all_gather_with_grad(F.normalize(_wide(audio), dim=-1))
            t = mtrun.all_gather_with_grad(F.normalize(_wide(text), dim=-1))
            groups = mtrun.all_gather_with_grad(groups_local) if groups_local is not None else None

            hard_text = hard_anchor = hard_replaces = None
            n_hard = 0
            if hard is not None:
                emb, anchor, replaces = hard
                # Every rank takes part in the same collectives whether or not it has hard
                # negatives, or gathers would pair up wrongly (or hang).
                offset, n_hard = 0, anchor.shape[0]
                if mtrun.is_distributed():
                    counts = mtrun.all_gather_with_grad(torch.tensor([[n_local, n_hard]], device=audio.device))
                    if counts.shape[0] > 1:  # not inside mtrun.local_only()
                        offset = int(counts[: mtrun.rank(), 0].sum())
                        n_hard = int(counts[:, 1].sum())
                if n_hard:
                    emb = F.normalize(_wide(emb), dim=-1)
                    if torch.is_grad_enabled() and not emb.requires_grad:
                        # Ranks must agree on whether the gather's backward (an all-reduce)
                        # runs: make an empty or frozen local part a graph leaf too.
                        emb = emb.detach().requires_grad_(True)
                    hard_text = mtrun.all_gather_with_grad(emb)
                    meta = torch.stack([anchor + offset, torch.where(replaces >= 0, replaces + offset, replaces)], dim=1)
                    meta = mtrun.all_gather_with_grad(meta)
                    hard_anchor, hard_replaces = meta[:, 0], meta[:, 1]

            scale = self.scale().to(a.device, a.dtype)
            a2t, t2a = contrastive_logits(
                a, t, scale, groups=groups, hard_text=hard_text, hard_anchor=hard_anchor, hard_replaces=hard_replaces
            )
            target = torch.arange(a.shape[0], device=a.device)
            loss_a2t = F.cross_entropy(a2t, target)
            loss_t2a = F.cross_entropy(t2a, target)
            loss = 0.5 * (loss_a2t + loss_t2a)

        with torch.no_grad():
            metrics: dict[str, Any] = {
                "loss_a2t": loss_a2t.detach(),
                "loss_t2a": loss_t2a.detach(),
                "accuracy_a2t": (a2t.argmax(1) == target).float().mean(),
                "accuracy_t2a": (t2a.argmax(1) == target).float().mean(),
                "temperature": 1.0 / scale.detach(),
            }
            if hard is not None:
                metrics["hard_negatives"] = torch.tensor(float(n_hard))
        return ObjectiveOutput(loss=loss, metrics=metrics)
