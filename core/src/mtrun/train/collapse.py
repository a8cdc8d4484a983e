"""Watching for representation collapse: every embedding the same, whatever the input.

Methods without negatives (BYOL, SimSiam, DINO) can reach a trivial minimum where the encoders
map everything to one point; the loss then looks excellent. The symptom is measurable every
step: the spread of the L2-normalised embeddings across the batch, :func:`embedding_std`.

Any metric whose name has a path part ``embedding_std`` is watched: the System logs
``embedding_std/audio`` and ``embedding_std/text`` for the projections of every recipe, and an
objective may log its own (BYOL's predictions: ``byol/embedding_std/audio_prediction``). The
trainer's :class:`CollapseMonitor` warns, or stops training, when one stays below
``[trainer].collapse_threshold`` for ``collapse_patience`` steps in a row.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch.nn import functional as F

__all__ = ["CollapseMonitor", "embedding_std", "is_spread_metric"]


def embedding_std(embeddings: torch.Tensor) -> torch.Tensor:
    """The standard deviation of L2-normalised embeddings ``[B, D]`` across the batch, summed
    over dimensions: ``sqrt(mean_i ||x̂_i - mean(x̂)||²)``, the root-mean-square distance of the
    unit vectors from their centroid.

    1 for vectors spread evenly over the sphere (their centroid at the origin), 0 when all are
    the same; independent of ``D`` (per-dimension std is this over ``sqrt(D)``). NaN for fewer
    than two rows, where no spread can be measured. Detached, in float32.
    """
    x = embeddings.detach().float()
    if x.ndim != 2 or x.shape[0] < 2:
        return torch.tensor(float("nan"), device=x.device)
    unit = F.normalize(x, dim=-1)
    return (unit - unit.mean(0)).square().sum(-1).mean().sqrt()


def is_spread_metric(name: str) -> bool:
    """Whether the collapse monitor watches the metric ``name``."""
    return "embedding_std" in name.split("/")


class CollapseMonitor:
    """Counts consecutive steps on which a watched metric is below ``threshold``.

    Args:
        threshold: Spread below which a step counts as collapsed (0 switches the monitor off).
        patience: Consecutive collapsed steps before :meth:`observe` reports.
        say: Where a report goes once per collapse episode (a warning line).

    :meth:`observe` returns the message when the count reaches ``patience`` (every step after
    that too, so a caller that stops can stop at once); it says it through ``say`` once per
    episode, and a step with every watched metric above the threshold ends the episode.
    """

    def __init__(self, threshold: float, patience: int, say: Callable[[str], None] | None = None):
        self.threshold = float(threshold)
        self.patience = max(int(patience), 1)
        self.say = say
        self.below = 0
        self._reported = False

    def observe(self, step: int, metrics: Mapping[str, float]) -> str | None:
        """Look at one step's metrics (step = optimizer steps done); the message when collapsed."""
        if self.threshold <= 0:
            return None
        watched = {k: v for k, v in metrics.items() if is_spread_metric(k) and math.isfinite(v)}
        low = {k: v for k, v in watched.items() if v < self.threshold}
        if not low:
            self.below, self._reported = 0, False
            return None
        self.below += 1
        if self.below < self.patience:
            return None
        names = ", ".join(f"{k} = {v:.3g}" for k, v in sorted(low.items()))
        message = (
            f"representation collapse at step {step}: {names} has been below "
            f"[trainer].collapse_threshold = {self.threshold:g} for {self.below} steps in a row "
            "(1 = embeddings spread over the sphere, 0 = all the same)"
        )
        if not self._reported and self.say is not None:
            self.say(message)
        self._reported = True
        return message
