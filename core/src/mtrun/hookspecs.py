"""The hook specifications: the whole contract between mtrun and its plugins.

A plugin is a module named by an entry point in the ``mtrun`` group; it implements the hooks
below with the :data:`hookimpl` marker. Hook names that start with ``mtrun_`` but are not
specified here fail at start-up, so a misspelled hook never goes unnoticed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from mtrun.registry import Registry

__all__ = ["PROJECT", "hookimpl", "hookspec", "mtrun_register_components"]

PROJECT = "mtrun"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def mtrun_register_components(registry: Registry) -> None:
    """Register the plugin's component classes.

    Called once per plugin while the registry is built, before any recipe is read. Call
    ``registry.add(kind, name, cls)`` (or the per-kind shortcuts such as
    ``registry.audio_encoder("mert", MertEncoder)``) for each component. ``kind`` is one of
    :data:`mtrun.KINDS` (declared in :mod:`mtrun.schema`); ``cls`` must have an attrs ``Config`` class and the methods of
    its interface. Return nothing; raise to report a broken plugin.

    Args:
        registry: The registry being built. It knows which plugin is calling, so a name that
            another plugin already registered is refused with both plugins named, and a class
            without a ``Config`` or without its interface's methods is refused at once.

    Documented for plugin authors in ``docs/writing-a-plugin.md``; every component a plugin
    registers is named, with its recipe keys, in the plugin's README (checked by
    ``tests/test_docs_reference.py``).
    """
