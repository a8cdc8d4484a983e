"""Built-in data sources: manifests, webdataset shards, the demo corpus and adapters for the
public datasets' own metadata files. Each is a ``data`` component (``[data] type = ...``)."""

from __future__ import annotations

__all__ = ["register"]


def register(registry) -> None:
    """Register every built-in data source (called from :mod:`mtrun.builtins`)."""
