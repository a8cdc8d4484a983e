"""An exponential-moving-average copy of a module: BYOL's target arms, a momentum encoder, a
mean teacher, a DINO teacher.

:class:`EmaCopy` holds a copy of an online module that is never trained by gradients and that
follows the online weights by ``θ̄ ← τ θ̄ + (1 - τ) θ`` when its owner calls :meth:`update`
(from ``on_step_end``, once per optimizer step). It is an ``nn.Module``, so an objective that
owns one has its weights in every checkpoint and gets them back on resume.

Frozen weights are not copied. A parameter of the online module that does not require
gradients never changes, so its EMA is itself: the copy uses the very same tensor, and leaves
it out of its ``state_dict`` (the online module saves it). An online module with no trainable
parameter at all (a frozen encoder) is not copied: :attr:`shares_online` is true and the
copy's forward *is* the online module's, so the owner may reuse the online output instead of
computing it twice.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["EmaCopy", "cosine_ema_rate"]


def cosine_ema_rate(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule of the EMA rate: ``1 - (1 - base) (cos(π step / total) + 1) / 2``.

    ``base`` at step 0, rising to 1 at ``total_steps``.
    """
    import math

    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class EmaCopy(nn.Module):
    """A gradient-free EMA copy of ``online`` (see the module docstring).

    Args:
        online: The module to follow. Held by reference, not registered: its owner (the
            System) trains and saves it.

    Attributes:
        module: The copy; ``None`` when :attr:`shares_online`.
        shares_online: ``online`` has no trainable parameter, so nothing was copied.
        updates: How many times :meth:`update` ran (a buffer: saved and restored with the
            weights).
    """

    def __init__(self, online: nn.Module):
        super().__init__()
        self._online = (online,)  # a tuple is not registered as a submodule
        frozen = [p for p in online.parameters() if not p.requires_grad]
        self.shares_online = len(frozen) == len(list(online.parameters()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._shared: set[str] = set()
        if self.shares_online:
            self.module = None
            return
        # deepcopy's memo maps each frozen parameter to itself: shared, not copied.
        self.module = copy.deepcopy(online, memo={id(p): p for p in frozen})
        frozen_ids = {id(p) for p in frozen}
        for name, param in self.module.named_parameters(remove_duplicate=False):
            if id(param) in frozen_ids:
                self._shared.add(f"module.{name}")
            else:
                param.requires_grad_(False)
        self.register_state_dict_post_hook(_drop_shared)
        self.register_load_state_dict_pre_hook(_keep_shared)

    @property
    def online(self) -> nn.Module:
        return self._online[0]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The copy's output for the online module's inputs, without gradients."""
        with torch.no_grad():
            return (self.online if self.module is None else self.module)(*args, **kwargs)

    @torch.no_grad()
    def update(self, rate: float) -> None:
        """``θ̄ ← rate · θ̄ + (1 - rate) · θ`` over parameters and floating-point buffers;
        other buffers (BatchNorm's batch counter) are copied. Shared weights stay as they are."""
        self.updates += 1
        if self.module is None:
            return
        pairs = [
            (mine, theirs)
            for mine, theirs in zip(self.module.parameters(), self.online.parameters())
            if mine is not theirs
        ]
        if pairs:
            targets, sources = zip(*pairs)
            torch._foreach_lerp_(list(targets), list(sources), 1.0 - rate)
        for mine, theirs in zip(self.module.buffers(), self.online.buffers()):
            if mine is theirs:
                continue
            if mine.is_floating_point():
                mine.lerp_(theirs, 1.0 - rate)
            else:
                mine.copy_(theirs)


def _drop_shared(module: EmaCopy, state: dict[str, Any], prefix: str, _local: Any) -> None:
    for name in module._shared:
        state.pop(prefix + name, None)


def _keep_shared(module: EmaCopy, state: dict[str, Any], prefix: str, *_: Any) -> None:
    # The online module saves and restores shared weights: hand them to the copy as they are,
    # so a state dict without them is complete.
    for name in module._shared:
        state.setdefault(prefix + name, module.get_parameter(name))
