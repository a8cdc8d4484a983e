"""Core's data sources: a manifest (CSV/TSV/JSONL/JSON/Parquet + audio folder) and WebDataset
shards. Each is a ``data`` component (``[data] type = ...``).

The demo corpus (``mtrun-demo``) and the adapters for the public datasets' own metadata files
(``mtrun-datasets``) are plugins built on these and on :class:`mtrun.SplitSource`.
"""

from __future__ import annotations

__all__ = ["register"]


def register(registry) -> None:
    """Register core's data sources (called from :mod:`mtrun.builtins`)."""
    from mtrun.data.sources.manifest import ManifestSource
    from mtrun.data.sources.shards import WebDatasetSource

    registry.data("manifest", ManifestSource)
    registry.data("webdataset", WebDatasetSource)
