"""FLAP's 1-D and 2-D audio token masking as an ``audio_tokens`` augmenter."""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch

from mtrun import AugmentContext, Batch, MtrunError, Need

__all__ = ["TokenMask", "expected_kept", "kept_count", "sample_keep_index"]


def kept_count(total: int, drop_ratio: float) -> int:
    """Tokens (or groups, or positions) kept when ``drop_ratio`` of ``total`` are dropped.

    ``floor(total * (1 - drop_ratio))`` as AudioMAE's ``int(L * (1 - mask_ratio))``, at least 1
    (a small tolerance keeps ``10 * (1 - 0.3)`` from flooring to 6).
    """
    return max(1, math.floor(total * (1.0 - drop_ratio) + 1e-9))


def _rounded_count(total: int, drop_ratio: float, rounding: str, generator: torch.Generator | None) -> int:
    """Kept count for one batch: ``kept_count`` (``"floor"``) or, with ``"random"``, the exact
    ``total * (1 - drop_ratio)`` rounded up with probability equal to its fractional part (one
    draw from ``generator``), so the *expected* count is exact while every item of the batch
    keeps the same number (a dense tensor)."""
    low = kept_count(total, drop_ratio)
    if rounding == "floor":
        return low
    exact = total * (1.0 - drop_ratio)
    frac = exact - low
    if frac <= 1e-9:
        return low
    return low + int(torch.rand((), generator=generator).item() < frac)


def expected_kept(total: int, drop_ratio: float, rounding: str = "floor") -> float:
    """The mean of :func:`_rounded_count` over draws (what the compute scales with on average)."""
    low = kept_count(total, drop_ratio)
    return float(low) if rounding == "floor" else max(float(low), total * (1.0 - drop_ratio))


def _random_subsets(batch: int, total: int, keep: int, generator: torch.Generator | None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, keep]`` sorted indices: a uniform random ``keep``-subset of ``range(total)`` per
    row, ranked by ``noise`` ``[batch, total]`` (drawn from ``generator`` when not given)."""
    if noise is None:
        noise = torch.rand(batch, total, generator=generator)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def sample_keep_index(
    batch: int,
    grid: tuple[int, int],
    *,
    mode: str,
    ratio: float = 0.4,
    group_ratio: float = 0.2,
    position_ratio: float = 0.2,
    rounding: str = "floor",
    generator: torch.Generator | None = None,
    item_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the kept tokens of a time-major ``(M, K)`` grid, ``[batch, N']`` ascending.

    Args:
        batch: Items; each draws its own subset.
        grid: ``(M, K)``: M time groups of K positions; token ``t * K + f``.
        mode: ``"1d"``: a uniform random subset of the ``M*K`` tokens, ``ratio`` of them
            dropped. ``"2d"``: ``group_ratio`` of the M groups dropped and, independently,
            ``position_ratio`` of the K positions (the same positions in every kept group),
            so ``N' = M' * K'``.
        rounding: ``"floor"``: kept counts are ``floor(total * (1 - ratio))`` (AudioMAE).
            ``"random"``: each count is rounded up with probability equal to its fractional part,
            once per batch, so the expected kept count is exact; in 2-D the two counts are drawn
            independently, so the expected kept fraction is ``(1 - group_ratio) * (1 -
            position_ratio)`` (0.64 at 0.2/0.2, where floor keeps 306/512 = 59.8 %).
        generator: CPU generator the noise is drawn from (the indices are made on the CPU).
        item_noise: Per-item uniforms ``[batch, M*K]`` (1-D) or ``[batch, M+K]`` (2-D: groups,
            then positions) that pick the subsets instead of ``generator``, which then only
            draws the kept counts. Row ``i`` alone decides item ``i``'s subset, so an item's
            mask does not depend on the rest of its batch (:class:`TokenMask` passes each
            item's own draws, identical on any torchrun rank).
    """
    if rounding not in ("floor", "random"):
        raise ValueError(f"rounding must be 'floor' or 'random' (got {rounding!r})")
    m, k = grid
    width = {"1d": m * k, "2d": m + k}.get(mode)
    if item_noise is not None and width is not None and tuple(item_noise.shape) != (batch, width):
        raise ValueError(f"item_noise must be [batch, {width}] for mode {mode!r} (got {tuple(item_noise.shape)})")
    if mode == "1d":
        return _random_subsets(batch, m * k, _rounded_count(m * k, ratio, rounding, generator), generator, item_noise)
    if mode == "2d":
        m_kept = _rounded_count(m, group_ratio, rounding, generator)
        k_kept = _rounded_count(k, position_ratio, rounding, generator)
        group_noise = item_noise[:, :m] if item_noise is not None else None
        position_noise = item_noise[:, m:] if item_noise is not None else None
        groups = _random_subsets(batch, m, m_kept, generator, group_noise)  # [B, M']
        positions = _random_subsets(batch, k, k_kept, generator, position_noise)  # [B, K']
        # Ascending t and ascending f give ascending t*K + f when flattened row by row.
        return (groups[:, :, None] * k + positions[:, None, :]).flatten(1)
    raise ValueError(f"mode must be '1d' or '2d' (got {mode!r})")


class TokenMask:
    """FLAP's token masking: drops audio tokens before the encoder's transformer (training only).

    Reads the encoder's ``batch.token_grid`` ``(M, K)`` and writes ``batch.audio_keep_index``
    ``[B, N']`` (``torch.long``, ascending, on the features' device); the encoder gathers those
    tokens after adding positions and returns the index in ``EncoderOutput.keep_index`` so a
    reconstruction objective can put them back in place. Every item draws its subset from its
    own random stream (``context.item_rand``), so its mask is the same whichever torchrun rank
    holds it; all items keep the same number of tokens, so the batch stays a dense tensor, and
    with ``rounding = "random"`` that number is drawn once per micro-batch from
    ``context.batch_generator``, the same on every rank (so every rank's share of a
    micro-batch drops as many patches, and a per-rank mean over dropped patches averages to
    the global one).
    """

    stage: ClassVar[str] = "audio_tokens"
    applies_in_eval: ClassVar[bool] = False
    requires: ClassVar[tuple[Need, ...]] = (Need("audio_encoder", "keep_index", "token-mask drops audio tokens before the encoder"),)

    @attrs.frozen
    class Config:
        mode: str = attrs.field(default="2d", validator=attrs.validators.in_(("1d", "2d")), metadata={"help": "'1d': keep a random subset of all tokens; '2d': drop whole time groups and, independently, positions within a group (kept = M' x K')"})
        ratio: float = attrs.field(default=0.4, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)], metadata={"help": "1d: fraction of tokens DROPPED; kept = floor(N * (1 - ratio)) (FLAP: 0.4 best)"})
        group_ratio: float = attrs.field(default=0.2, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)], metadata={"help": "2d: fraction of the M time groups DROPPED; kept M' = floor(M * (1 - group_ratio)) (FLAP: 0.2)"})
        position_ratio: float = attrs.field(default=0.2, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)], metadata={"help": "2d: fraction of the K positions within a group DROPPED, the same positions for all kept groups; K' = floor(K * (1 - position_ratio)) (FLAP: 0.2)"})
        rounding: str = attrs.field(default="floor", validator=attrs.validators.in_(("floor", "random")), metadata={"help": "'floor': kept counts floor(total * (1 - ratio)) as AudioMAE (2d 0.2/0.2 keeps 306/512 = 59.8%); 'random': each count rounded up with probability equal to its fractional part, once per batch from the augmentation generator, so the EXPECTED kept fraction is exact (0.64 at 0.2/0.2)"})

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, batch: Batch, context: AugmentContext) -> Batch:
        if not context.training:
            return batch
        grid = batch.get("token_grid")
        if grid is None:
            raise MtrunError(
                "augmenter token-mask needs an audio encoder that can drop tokens (one that declares a "
                "token_grid, e.g. mavil); this encoder has token_grid = None. Remove the token-mask augmenter"
            )
        features = batch.get("features")
        n = len(features) if features is not None else len(batch["ids"])
        m, k = (int(v) for v in grid)
        keep = sample_keep_index(
            n,
            (m, k),
            mode=self.config.mode,
            ratio=self.config.ratio,
            group_ratio=self.config.group_ratio,
            position_ratio=self.config.position_ratio,
            rounding=self.config.rounding,
            generator=context.batch_generator("token-mask"),
            item_noise=context.item_rand("token-mask", n, m * k if self.config.mode == "1d" else m + k),
        )
        if features is not None:
            keep = keep.to(features.device)
        batch.audio_keep_index = keep
        return batch

    def kept_fraction(self, grid: tuple[int, int]) -> float:
        """Share of the grid's tokens that reach the transformer (what the compute scales with);
        with ``rounding = "random"`` the expected share over batches."""
        m, k = grid
        c = self.config
        if c.mode == "1d":
            return expected_kept(m * k, c.ratio, c.rounding) / (m * k)
        return expected_kept(m, c.group_ratio, c.rounding) * expected_kept(k, c.position_ratio, c.rounding) / (m * k)

    def __repr__(self) -> str:
        return f"TokenMask({self.config!r})"
