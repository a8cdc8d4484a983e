"""The ``view-dropout`` augmenter for mtrun: partial, category-balanced tag views (DuET-MC).

Registered through the ``view-dropout`` entry point in the ``mtrun`` group. See
:mod:`mtrun_view_dropout.augmenter` for how the views are drawn.
"""

from __future__ import annotations

from mtrun import hookimpl

__all__ = ["mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry) -> None:
    from mtrun_view_dropout.augmenter import ViewDropout

    registry.augmenter("view-dropout", ViewDropout)
