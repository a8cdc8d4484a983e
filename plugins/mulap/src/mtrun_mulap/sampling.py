"""Random choices shared by MuLaP's augmenters and objectives.

Every function draws a fixed amount of noise from the generator it is given, whatever the batch
holds, so a run resumed at a step draws exactly what the uninterrupted run drew. Per-token noise
comes from each item's own random stream (:func:`token_noise`), so an item is masked the same way
whichever torchrun rank holds it and however its batch is padded.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

__all__ = ["caption_keys", "choose_positions", "draw_partners", "token_noise"]


def caption_keys(batch: Any, n: int) -> list[Hashable]:
    """One hashable per row that is equal exactly for rows with the same caption.

    The caption texts when the batch has them; otherwise the real token ids of each row (the
    same caption tokenizes to the same ids); otherwise every row counts as distinct.
    """
    texts = batch.get("texts") if isinstance(batch, dict) else None
    if texts is not None and len(texts) == n:
        return list(texts)
    inputs = batch.get("text_inputs") if isinstance(batch, dict) else None
    if inputs is not None and "input_ids" in inputs and inputs["input_ids"].shape[0] == n:
        ids, mask = inputs["input_ids"].cpu(), inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.cpu().bool()
        return [tuple(row[keep].tolist()) for row, keep in zip(ids, mask)]
    return list(range(n))


def draw_partners(
    keys: Sequence[Hashable], p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, with probability ``p``, another row whose caption differs from its own.

    The partner is uniform over the rows whose key differs (never the row itself, never a row
    with an identical caption); a row without such a row keeps its own pair. Partners are drawn
    independently, so two rows may get the same partner: unlike a derangement, this exists for
    every batch, duplicates included.

    Args:
        keys: One hashable per row, equal for identical captions (:func:`caption_keys`).
        p: Probability that a row is paired with another row's caption.
        generator: CPU generator the noise comes from (``B`` + ``B * B`` uniforms).

    Returns:
        ``partner`` LongTensor ``[B]`` (the row itself where not swapped) and ``swapped``
        BoolTensor ``[B]``, both on the CPU.
    """
    n = len(keys)
    ids: dict[Hashable, int] = {}
    code = torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)
    coin = torch.rand(n, generator=generator)
    scores = torch.rand(n, n, generator=generator)
    allowed = code[:, None] != code[None, :]  # also excludes the diagonal
    # argmax of uniform scores over the allowed columns: a uniform choice among them.
    partner = scores.masked_fill(~allowed, -1.0).argmax(dim=1)
    swapped = (coin < p) & allowed.any(dim=1)
    return torch.where(swapped, partner, torch.arange(n)), swapped


def token_noise(context: Any, name: str, real: torch.Tensor, rows: int) -> torch.Tensor:
    """``[rows, B, L]`` uniforms, ``rows`` per real position of each item, 2.0 elsewhere.

    Item ``i``'s ``r``-th real token gets the numbers ``r * rows .. r * rows + rows - 1`` of
    its own counter-based stream (``context.item_rand``), so the noise at a token depends on the
    item alone: not on the other items, the rank holding it, or how far its row is padded (each
    torchrun rank pads its share to its own longest caption), on either side.

    Args:
        context: The step's :class:`mtrun.AugmentContext`.
        name: The augmenter's stream name.
        real: BoolTensor ``[B, L]``, True at real (non-padding) positions.
        rows: Independent uniforms per position.
    """
    mask = real.detach().cpu().bool()
    b, length = mask.shape
    u = context.item_rand(name, b, length, rows)  # [B, L, rows]: flat index r * rows + k
    order = (mask.long().cumsum(1) - 1).clamp(min=0)  # each real position's rank among the real ones
    picked = u.gather(1, order[:, :, None].expand(b, length, rows))
    return picked.masked_fill(~mask[:, :, None], 2.0).permute(2, 0, 1)


def choose_positions(
    candidates: torch.Tensor, ratio: float, generator: torch.Generator | None, scores: torch.Tensor | None = None
) -> torch.Tensor:
    """BERT's count rule: ``max(1, round(ratio * n))`` of each row's ``n`` candidate positions.

    Args:
        candidates: BoolTensor ``[B, L]``, True where a position may be chosen.
        ratio: Fraction of each row's candidates to choose.
        generator: CPU generator (``B * L`` uniforms), unless ``scores`` are given.
        scores: ``[B, L]`` uniforms to rank the candidates by instead (:func:`token_noise`).

    Returns:
        BoolTensor ``[B, L]`` on the device of ``candidates``: a uniform random subset of each
        row's candidates of that size (none for a row without candidates).
    """
    cand = candidates.detach().cpu().bool()
    if scores is None:
        scores = torch.rand(cand.shape, generator=generator)
    scores = scores.cpu().masked_fill(~cand, 2.0)  # candidates first
    rank = scores.argsort(dim=1).argsort(dim=1)
    available = cand.sum(dim=1, keepdim=True)
    count = torch.floor(available * ratio + 0.5).clamp(min=1).minimum(available)
    return ((rank < count) & cand).to(candidates.device)
