"""SpecAugment time and frequency masking on the encoder's input features, per item."""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from mtrun import AugmentContext

__all__ = ["SpecAugment", "band_masks", "bands"]


def band_masks(batch: int, size: int, count: int, max_width: int, generator: torch.Generator | None) -> torch.Tensor:
    """``[batch, size]`` bool, True inside ``count`` random bands per row, drawn from one
    generator (see :func:`bands` for the draws)."""
    u = torch.rand(batch, count, generator=generator)
    v = torch.rand(batch, count, generator=generator)
    return bands(u, v, size, max_width)


def bands(u: torch.Tensor, v: torch.Tensor, size: int, max_width: int) -> torch.Tensor:
    """``[B, size]`` bool, True inside the bands that uniforms ``u``, ``v`` ``[B, count]`` place.

    Each band's width is ``floor(u * max_width)`` (so ``0 <= width < max_width``) and its
    start ``floor(v * (size - width))``, the draws ``torchaudio``'s ``mask_along_axis`` makes,
    with ``max_width`` capped at ``size``.
    """
    batch, count = u.shape
    positions = torch.arange(size)
    if count == 0 or max_width == 0:
        return torch.zeros(batch, size, dtype=torch.bool)
    cap = min(max_width, size)
    width = (u * cap).floor()
    start = (v * (size - width)).floor()
    inside = (positions >= start[..., None]) & (positions < (start + width)[..., None])  # [B, count, size]
    return inside.any(dim=1)


class SpecAugment:
    """Time and frequency masks on the preprocessed features (stage ``features``).

    Works on ``[B, 1, T, F]`` (mavil's layout: ``[B, 1, frames, 128 mel bins]``, time before
    frequency) or ``[B, T, F]``: frames are the second-to-last axis, bins the last. Every item
    draws its own masks from its own random stream (``context.item_rand``), so an item's masks do
    not depend on the rest of its batch nor on the rank that holds it under torchrun. Masked cells become 0 (``fill="zero"``:
    with mavil's AudioSet normalisation 0 is the data set's mean level) or the item's own mean
    (``fill="mean"``). Training only.
    """

    stage: ClassVar[str] = "features"
    applies_in_eval: ClassVar[bool] = False

    @attrs.frozen
    class Config:
        time_mask_width: int = attrs.field(default=192, validator=attrs.validators.ge(0), metadata={"help": "upper bound on a time mask's width in frames; widths are uniform in [0, width) (FLAP: 192)"})
        freq_mask_width: int = attrs.field(default=48, validator=attrs.validators.ge(0), metadata={"help": "upper bound on a frequency mask's width in bins; uniform in [0, width) (FLAP: 48)"})
        time_masks: int = attrs.field(default=1, validator=attrs.validators.ge(0), metadata={"help": "time masks per item"})
        freq_masks: int = attrs.field(default=1, validator=attrs.validators.ge(0), metadata={"help": "frequency masks per item"})
        fill: str = attrs.field(default="zero", validator=attrs.validators.in_(("zero", "mean")), metadata={"help": "value of masked cells: 'zero' or 'mean' (the item's mean feature value)"})

    def __init__(self, config: Config):
        self.config = config

    def masks(self, frames: int, bins: int, context: AugmentContext, batch: int) -> torch.Tensor:
        """``[batch, T, F]`` bool, True where a time or a frequency mask covers the cell; item
        ``i``'s masks come from its own uniforms (``context.item_rand``)."""
        c = self.config
        t, f = c.time_masks, c.freq_masks
        u = context.item_rand("specaugment", batch, 2 * (t + f))
        time = bands(u[:, :t], u[:, t : 2 * t], frames, c.time_mask_width)
        freq = bands(u[:, 2 * t : 2 * t + f], u[:, 2 * t + f :], bins, c.freq_mask_width)
        return time[:, :, None] | freq[:, None, :]

    def __call__(self, features: torch.Tensor, context: AugmentContext) -> torch.Tensor:
        if not context.training:
            return features
        if features.ndim not in (3, 4):
            raise ValueError(f"specaugment expects features [B, T, F] or [B, C, T, F] (got {tuple(features.shape)})")
        b, frames, bins = features.shape[0], features.shape[-2], features.shape[-1]
        covered = self.masks(frames, bins, context, b).to(features.device)
        if features.ndim == 4:
            covered = covered[:, None]
        if self.config.fill == "mean":
            value = features.mean(dim=tuple(range(1, features.ndim)), keepdim=True)
        else:
            value = torch.zeros((), dtype=features.dtype, device=features.device)
        return torch.where(covered, value, features)

    def __repr__(self) -> str:
        return f"SpecAugment({self.config!r})"
