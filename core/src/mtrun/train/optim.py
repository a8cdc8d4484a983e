"""Optimizers as recipe components, the ``[trainer.optimizer]`` table: ``adamw``, ``adam``, ``sgd``.

Each is a ``torch.optim`` optimizer built as ``cls(config, *, model)`` over the parameter groups
of :func:`param_groups`, which every optimizer shares: no weight decay on biases, norms and
other 1-D parameters, and a learning-rate multiplier per top-level component of the System
(``lr_scale = { audio_encoder = 0.1 }`` fine-tunes a pretrained encoder gently while the
projectors learn at the peak rate). The schedule (:mod:`mtrun.train.schedule`) multiplies each
group's own learning rate, so the multipliers hold for the whole run.

LAMB and LARS are not here: torch has neither, and the maintained implementations (timm's)
would pull in torchvision. A plugin can register one with ``registry.optimizer(name, cls)``.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

from mtrun import schema
from mtrun.config import non_negative, positive
from mtrun.errors import MtrunError
from mtrun.registry import suggest

__all__ = ["SGD", "Adam", "AdamW", "OptimizerConfig", "param_groups"]


def _lr_scales(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a table of component = factor (got {value!r})")
    return {str(k): float(v) for k, v in value.items()}


def _non_negative_factors(instance: Any, attribute: attrs.Attribute, value: dict[str, float]) -> None:
    negative = {k: v for k, v in value.items() if not v >= 0}
    if negative:
        raise ValueError(f"factors must be zero or positive (got {negative})")
    # The System's components are its model slots (schema) plus the objectives that own modules;
    # checking the names here lets `mtrun validate` catch a typo before anything is built.
    known = [s.name for s in schema.SLOTS if s.model and not s.many] + ["objectives"]
    unknown = sorted(set(value) - set(known))
    if unknown:
        hints = [f"{name!r} (did you mean {hint!r}?)" if (hint := suggest(name, known)) else repr(name) for name in unknown]
        raise ValueError(f"no System component named {', '.join(hints)}; components: {', '.join(known)}")


@attrs.frozen
class OptimizerConfig:
    """The settings every built-in optimizer shares; a plugin's optimizer may reuse them."""

    lr: float = attrs.field(
        default=1e-3, validator=positive,
        metadata={"help": "peak learning rate (the schedule multiplies it)"},
    )
    weight_decay: float = attrs.field(
        default=0.0, validator=non_negative,
        metadata={"help": "weight decay; biases, norms and other 1-D parameters get none"},
    )
    lr_scale: dict[str, float] = attrs.field(
        factory=dict, converter=_lr_scales, validator=_non_negative_factors, hash=False,
        metadata={"help": "learning-rate multiplier per System component, e.g. { audio_encoder = 0.1 }; unlisted ones get 1"},
    )


def param_groups(model: nn.Module, config: OptimizerConfig) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in optimizer groups, by learning rate and decay.

    Biases, norm gains and scalars (temperatures) are not weights to shrink: they go to groups
    with no weight decay. Parameters of a component named in ``config.lr_scale`` (a top-level
    child of ``model``: ``audio_encoder``, ``objectives``, ...) go to groups of their own with
    ``lr = config.lr × scale``. Without ``lr_scale`` this is one decayed and one undecayed group,
    in ``named_parameters`` order, so optimizer states saved before ``lr_scale`` existed load.

    Raises:
        MtrunError: ``lr_scale`` names something that is not a component of ``model``.
    """
    components = [name for name, _ in model.named_children()]
    unknown = sorted(set(config.lr_scale) - set(components))
    if unknown:
        raise MtrunError(
            f"[trainer.optimizer].lr_scale: no component named {', '.join(map(repr, unknown))}; "
            f"known components: {', '.join(components)}"
        )
    # Groups in a fixed order: unscaled first, then each scaled component as lr_scale lists it.
    groups: dict[tuple[str | None, bool], list[nn.Parameter]] = {
        (component, decay): [] for component in [None, *config.lr_scale] for decay in (True, False)
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = name.split(".", 1)[0]
        decay = not (param.ndim <= 1 or name.endswith(".bias") or "norm" in name.lower())
        groups[(component if component in config.lr_scale else None, decay)].append(param)
    return [
        {
            "params": params,
            "weight_decay": config.weight_decay if decay else 0.0,
            "lr": config.lr * (config.lr_scale[component] if component is not None else 1.0),
        }
        for (component, decay), params in groups.items()
        if params
    ]


def _two_floats(value: Any) -> tuple[float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"must be two numbers (got {list(value)})")
    return values  # type: ignore[return-value]


def _betas_field():
    return attrs.field(
        default=(0.9, 0.999), converter=_two_floats,
        metadata={"help": "Adam betas [beta1, beta2]: decay of the gradient's running mean and of its square's"},
    )


def _eps_field():
    return attrs.field(default=1e-8, validator=positive, metadata={"help": "added to the denominator for stability"})


class AdamW(torch.optim.AdamW):
    """AdamW (decoupled weight decay), the default: ``[trainer.optimizer] type = "adamw"``.

    Args:
        config: The ``[trainer.optimizer]`` table.
        model: The System whose parameters it trains.
    """

    @attrs.frozen
    class Config(OptimizerConfig):
        weight_decay: float = attrs.field(
            default=0.01, validator=non_negative,
            metadata={"help": "decoupled weight decay; biases, norms and other 1-D parameters get none"},
        )
        betas: tuple[float, float] = _betas_field()
        eps: float = _eps_field()

    def __init__(self, config: AdamW.Config, *, model: nn.Module):
        super().__init__(param_groups(model, config), lr=config.lr, betas=config.betas, eps=config.eps)


class Adam(torch.optim.Adam):
    """Adam; ``weight_decay`` is an L2 term added to the gradient, as in the original paper.

    Args:
        config: The ``[trainer.optimizer]`` table.
        model: The System whose parameters it trains.
    """

    @attrs.frozen
    class Config(OptimizerConfig):
        betas: tuple[float, float] = _betas_field()
        eps: float = _eps_field()

    def __init__(self, config: Adam.Config, *, model: nn.Module):
        super().__init__(param_groups(model, config), lr=config.lr, betas=config.betas, eps=config.eps)


def _nesterov_needs_momentum(instance: Any, attribute: attrs.Attribute, value: bool) -> None:
    if value and not instance.momentum > 0:
        raise ValueError("Nesterov momentum needs momentum > 0")


class SGD(torch.optim.SGD):
    """Stochastic gradient descent with (optionally Nesterov) momentum; ``weight_decay`` is L2.

    Args:
        config: The ``[trainer.optimizer]`` table.
        model: The System whose parameters it trains.
    """

    @attrs.frozen
    class Config(OptimizerConfig):
        momentum: float = attrs.field(
            default=0.9, validator=non_negative,
            metadata={"help": "momentum factor (0 = plain SGD)"},
        )
        nesterov: bool = attrs.field(
            default=False, validator=_nesterov_needs_momentum,
            metadata={"help": "use Nesterov momentum (needs momentum > 0)"},
        )

    def __init__(self, config: SGD.Config, *, model: nn.Module):
        super().__init__(param_groups(model, config), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
