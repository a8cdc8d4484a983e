"""Built-in data sources: manifests, webdataset shards, the demo corpus and adapters for the
public datasets' own metadata files. Each is a ``data`` component (``[data] type = ...``)."""

from __future__ import annotations

__all__ = ["register"]


def register(registry) -> None:
    """Register every built-in data source (called from :mod:`mtrun.builtins`)."""

    # --- generic sources: a manifest table + audio folder, and webdataset tar shards ---
    from mtrun.data.sources.manifest import ManifestSource
    from mtrun.data.sources.shards import WebDatasetSource

    registry.data("manifest", ManifestSource)
    registry.data("webdataset", WebDatasetSource)

    # --- public-dataset adapters: read each dataset's own metadata files as published ---
    from mtrun.data.sources.audiocaps import AudioCaps
    from mtrun.data.sources.clotho import Clotho
    from mtrun.data.sources.jamendo import MTGJamendo
    from mtrun.data.sources.lpmusiccaps import LPMusicCaps
    from mtrun.data.sources.magnatagatune import MagnaTagATune
    from mtrun.data.sources.musiccaps import MusicCaps
    from mtrun.data.sources.songdescriber import SongDescriber

    registry.data("musiccaps", MusicCaps)
    registry.data("song-describer", SongDescriber)
    registry.data("lp-musiccaps", LPMusicCaps)
    registry.data("audiocaps", AudioCaps)
    registry.data("clotho", Clotho)
    registry.data("mtg-jamendo", MTGJamendo)
    registry.data("magnatagatune", MagnaTagATune)

    # --- the built-in demo corpus (music21 scores rendered with GM timbres) ---
    from mtrun.data.demo import register as register_demo

    register_demo(registry)
