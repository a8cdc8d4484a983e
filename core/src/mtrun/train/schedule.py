"""Learning-rate schedules, the ``[trainer.schedule]`` table: warm-up, then cosine, linear or constant.

A schedule is a multiplier of the peak learning rate per optimizer step, ``factor(step)``. The
trainer wraps it in a ``torch.optim.lr_scheduler.LambdaLR``, which multiplies every parameter
group's initial learning rate by it, so per-component ``lr_scale`` factors persist through the
whole run. Every schedule warms up the same way: linearly as ``(step + 1) / warmup`` over
``warmup_steps`` (or, when that is 0, ``warmup_epochs`` worth of steps).
"""

from __future__ import annotations

import math

import attrs
import torch

from mtrun.config import non_negative, unit_interval

__all__ = ["Constant", "Cosine", "Linear", "WarmupConfig", "lambda_lr", "warmup_length"]


def _decay_progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """How far the decay after the warm-up has got: 0 at its start, 1 at ``total_steps`` and beyond."""
    decay_steps = max(1, total_steps - warmup_steps)
    return min(1.0, max(0.0, (step - warmup_steps) / decay_steps))


@attrs.frozen
class WarmupConfig:
    """The warm-up settings every schedule shares."""

    warmup_steps: int = attrs.field(
        default=0, validator=non_negative,
        metadata={"help": "linear warm-up steps; when 0, warmup_epochs is used"},
    )
    warmup_epochs: float = attrs.field(
        default=0.0, validator=non_negative,
        metadata={"help": "linear warm-up in epochs (used when warmup_steps is 0)"},
    )


def warmup_length(config: WarmupConfig, steps_per_epoch: int) -> int:
    """The warm-up in optimizer steps: ``warmup_steps``, or else ``warmup_epochs`` rounded to steps."""
    return config.warmup_steps if config.warmup_steps > 0 else round(config.warmup_epochs * steps_per_epoch)


def _min_lr_ratio_field(what: str):
    return attrs.field(
        default=0.0, validator=unit_interval,
        metadata={"help": f"floor of the {what} decay as a fraction of the peak lr, reached at the last step"},
    )


class _WarmupSchedule:
    """What every schedule shares: the warm-up, then :meth:`decay` until the last step.

    Args:
        config: The ``[trainer.schedule]`` table.
        total_steps: Optimizer steps in the whole run.
        steps_per_epoch: Optimizer steps per epoch (for ``warmup_epochs``).
    """

    def __init__(self, config: WarmupConfig, *, total_steps: int, steps_per_epoch: int):
        self.config = config
        self.total_steps = total_steps
        self.warmup_steps = warmup_length(config, steps_per_epoch)

    def factor(self, step: int) -> float:
        """Multiplier of the peak learning rate for the 0-based optimizer step ``step``.

        Warm-up rises as ``(step + 1) / warmup_steps`` so the first step already moves the
        weights (``step / warmup_steps`` would waste it at lr 0) and the peak is reached on the
        last warm-up step; past ``total_steps`` the factor holds its final value.
        """
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.decay(_decay_progress(step, self.warmup_steps, self.total_steps))

    def decay(self, progress: float) -> float:
        """The factor after the warm-up, at ``progress`` from 0 (its end) to 1 (the last step)."""
        raise NotImplementedError


class Cosine(_WarmupSchedule):
    """Warm-up, then half a cosine from the peak down to ``min_lr_ratio`` at the last step."""

    @attrs.frozen
    class Config(WarmupConfig):
        min_lr_ratio: float = _min_lr_ratio_field("cosine")

    def decay(self, progress: float) -> float:
        floor = self.config.min_lr_ratio
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Linear(_WarmupSchedule):
    """Warm-up, then a straight line from the peak down to ``min_lr_ratio`` at the last step
    (MuLaP's schedule)."""

    @attrs.frozen
    class Config(WarmupConfig):
        min_lr_ratio: float = _min_lr_ratio_field("linear")

    def decay(self, progress: float) -> float:
        return 1.0 - (1.0 - self.config.min_lr_ratio) * progress


class Constant(_WarmupSchedule):
    """Warm-up, then the peak learning rate to the end."""

    @attrs.frozen
    class Config(WarmupConfig):
        pass

    def decay(self, progress: float) -> float:
        return 1.0


def lambda_lr(optimizer: torch.optim.Optimizer, schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``schedule.factor``; call ``step()`` after each optimizer step.

    The lambda is a plain function (``LambdaLR`` would save a callable object's ``__dict__``),
    so ``state_dict()`` holds only counters and learning rates (JSON-able) and the schedule's
    shape always comes from the recipe, not the checkpoint.
    """

    def factor(step: int) -> float:
        return schedule.factor(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
