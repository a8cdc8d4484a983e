"""The recipe tables that are not components: ``[run]``, ``[loader]`` and top-level scalars.

Component tables are declared in :mod:`mtrun.schema` (kinds and slots); these structure
straight into core config classes.
"""

from __future__ import annotations

from mtrun import schema

__all__ = ["PLAIN_TABLES", "TOP_LEVEL_SCALARS", "known_tables", "plain_table_class"]


def _plain_tables() -> dict[str, type]:
    # Imported lazily only to keep the import graph one-directional (run.py knows nothing of
    # recipes); run.py is light, so this costs nothing.
    from mtrun.run import LoaderConfig, RunConfig

    return {"run": RunConfig, "loader": LoaderConfig}


PLAIN_TABLES: tuple[str, ...] = ("run", "loader")
"""Tables that structure straight into a core config class (no ``type`` key)."""

TOP_LEVEL_SCALARS: dict[str, type] = {"description": str}
"""Top-level keys that are plain values (``extends`` and ``profile`` are consumed by loading)."""


def plain_table_class(name: str) -> type:
    """The core attrs class the plain table ``name`` structures into."""
    return _plain_tables()[name]


def known_tables() -> list[str]:
    """Every table name a resolved recipe may contain, for did-you-mean hints."""
    return [s.name for s in schema.SLOTS] + list(PLAIN_TABLES)

