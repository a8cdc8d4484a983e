"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math

import torch

__all__ = ["warmup_cosine", "warmup_cosine_factor"]


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Warm-up rises linearly as ``(step + 1) / warmup_steps`` so the first step already moves
    the weights (``step / warmup_steps`` would waste it at lr 0) and the peak is reached on the
    last warm-up step. Afterwards the factor follows half a cosine from 1 down to
    ``min_lr_ratio``, reached at ``total_steps`` and held beyond it.

    Args:
        step: Optimizer steps already taken.
        warmup_steps: Length of the warm-up (0 = none).
        total_steps: Steps in the whole run.
        min_lr_ratio: Floor of the decay as a fraction of the peak.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`warmup_cosine_factor`; call ``step()`` after each optimizer step.

    The lambda is a plain function, so ``state_dict()`` holds only counters and learning rates
    (JSON-able) and the schedule's shape always comes from the recipe, not the checkpoint.
    """

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
