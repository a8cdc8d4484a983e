"""Adapters for the public music-text and audio-text datasets, for mtrun.

Registered through the ``datasets`` entry point in the ``mtrun`` group. Each adapter is a
``data`` source (``[data] type = "musiccaps"``, ...) that reads the dataset's own metadata files
as published and points at the audio the user downloaded; it is built on core's
:class:`mtrun.SplitSource` and :func:`mtrun.read_table`. See ``docs/data.md`` for each one's keys.
"""

from __future__ import annotations

from mtrun import hookimpl

__all__ = ["mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry) -> None:
    from mtrun_datasets.audiocaps import AudioCaps
    from mtrun_datasets.clotho import Clotho
    from mtrun_datasets.jamendo import MTGJamendo
    from mtrun_datasets.lpmusiccaps import LPMusicCaps
    from mtrun_datasets.magnatagatune import MagnaTagATune
    from mtrun_datasets.musiccaps import MusicCaps
    from mtrun_datasets.songdescriber import SongDescriber

    registry.data("musiccaps", MusicCaps)
    registry.data("song-describer", SongDescriber)
    registry.data("lp-musiccaps", LPMusicCaps)
    registry.data("audiocaps", AudioCaps)
    registry.data("clotho", Clotho)
    registry.data("mtg-jamendo", MTGJamendo)
    registry.data("magnatagatune", MagnaTagATune)
