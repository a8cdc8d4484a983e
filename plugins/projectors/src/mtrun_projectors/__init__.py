"""Projectors for mtrun: ``transformer`` (DuET-MC's [CLS] Transformer), ``linear`` and ``mlp``.

Registered through the ``projectors`` entry point in the ``mtrun`` group. The component
modules import torch, so they are imported when the registry is filled, not when this package
is imported.
"""

from __future__ import annotations

from mtrun import hookimpl

__all__ = ["mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry) -> None:
    from mtrun_projectors.simple import LinearProjector, MlpProjector
    from mtrun_projectors.transformer import TransformerProjector

    registry.projector("transformer", TransformerProjector)
    registry.projector("linear", LinearProjector)
    registry.projector("mlp", MlpProjector)
