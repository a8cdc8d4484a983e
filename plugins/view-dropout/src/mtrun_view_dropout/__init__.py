"""The ``view-dropout`` augmenter for mtrun: partial, category-balanced tag views (DuET-MC).

Registered through the ``view-dropout`` entry point in the ``mtrun`` group. See
:mod:`mtrun_view_dropout.augmenter` for how the views are drawn.
"""

from __future__ import annotations

from mtrun.hookspecs import hookimpl

__all__ = ["mtrun_register_components"]


@hookimpl
def mtrun_register_components(registry) -> None:
    from mtrun_view_dropout.augmenter import ViewDropout

    registry.augmenter("view-dropout", ViewDropout)
