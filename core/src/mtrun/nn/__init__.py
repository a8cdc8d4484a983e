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

__all__ = [
    "Mlp",
    "MultiHeadAttention",
    "TransformerBlock",
    "attention",
    "attention_backend",
    "resolve_backend",
    "xformers_available",
]
