"""Projectors over the encoder's pooled vector: a single Linear, and an MLP (SLAP's arms)."""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from torch import nn

from mtrun import EncoderOutput, positive

__all__ = ["LinearProjector", "MlpProjector"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _hidden_sizes(_instance: object, attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value):
        raise ValueError(f"{attribute.name} must be positive integers (got {list(value)})")


class LinearProjector(nn.Module):
    """One ``Linear(in_features, dim)`` over the encoder's pooled vector.

    Args:
        config: The recipe settings.
        in_features: Width of the encoder's pooled vector (injected by the assembler).
    """

    @attrs.frozen
    class Config:
        dim: int = attrs.field(default=512, validator=positive, metadata={"help": "embedding width"})
        bias: bool = attrs.field(default=True, metadata={"help": "whether the Linear has a bias"})

    def __init__(self, config: Config, *, in_features: int):
        super().__init__()
        self.config = config
        self.output_dim = config.dim
        self.linear = nn.Linear(in_features, config.dim, bias=config.bias)

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        """``encoded.pooled [B, in_features]`` -> ``[B, dim]``."""
        return self.linear(encoded.pooled)


class MlpProjector(nn.Module):
    """An MLP over the pooled vector: ``in -> hidden_sizes... -> dim``.

    Each hidden layer is ``Linear -> [BatchNorm1d] -> activation -> [Dropout]``; the last layer
    is a plain Linear, so the output is not squashed before the objective normalises it. SLAP's
    text arm is ``hidden_sizes = [512]``, ``dim = 512``, ``batch_norm = true``; its audio arm
    the same without BatchNorm.

    Under DDP, BatchNorm statistics are per rank (PyTorch's default); they are the statistics of
    each rank's micro-batch.

    Args:
        config: The recipe settings.
        in_features: Width of the encoder's pooled vector (injected by the assembler).
    """

    @attrs.frozen
    class Config:
        hidden_sizes: tuple[int, ...] = attrs.field(
            default=(512,),
            converter=tuple,
            validator=_hidden_sizes,
            metadata={"help": "widths of the hidden layers, in order ([] makes it a Linear)"},
        )
        dim: int = attrs.field(default=512, validator=positive, metadata={"help": "embedding width (the last layer's output)"})
        activation: Literal["relu", "gelu", "silu", "tanh"] = attrs.field(
            default="relu",
            validator=attrs.validators.in_(tuple(_ACTIVATIONS)),
            metadata={"help": "activation after each hidden layer: relu, gelu, silu or tanh"},
        )
        batch_norm: bool = attrs.field(default=False, metadata={"help": "BatchNorm1d on each hidden layer, before the activation"})
        dropout: float = attrs.field(
            default=0.0,
            validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)],
            metadata={"help": "dropout after each hidden activation"},
        )

    def __init__(self, config: Config, *, in_features: int):
        super().__init__()
        self.config = config
        self.output_dim = config.dim
        layers: list[nn.Module] = []
        width = in_features
        for hidden in config.hidden_sizes:
            # A bias before BatchNorm is cancelled by its mean subtraction.
            layers.append(nn.Linear(width, hidden, bias=not config.batch_norm))
            if config.batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(_ACTIVATIONS[config.activation]())
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width = hidden
        layers.append(nn.Linear(width, config.dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        """``encoded.pooled [B, in_features]`` -> ``[B, dim]``."""
        return self.layers(encoded.pooled)
