"""Neural-network building blocks shared by plugins (attention, transformer blocks).

Importing this package imports torch; core modules that must stay light (the CLI, recipe
validation) do not import it.
"""

from __future__ import annotations

from mtrun.nn.attention import (
    Mlp,
    MultiHeadAttention,
    TransformerBlock,
    attention,
    attention_backend,
    resolve_backend,
    xformers_available,
)
from mtrun.nn.positions import sincos_table

__all__ = [
    "Mlp",
    "MultiHeadAttention",
    "TransformerBlock",
    "attention",
    "attention_backend",
    "resolve_backend",
    "sincos_table",
    "xformers_available",
]
