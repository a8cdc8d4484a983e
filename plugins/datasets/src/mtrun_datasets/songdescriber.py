"""The Song Describer Dataset (Manco et al., 2023) from its published ``song_describer.csv``.

The CSV has one row per *caption* (``caption_id, track_id, caption, is_valid_subset,
familiarity, artist_id, album_id, path, duration``); several captions describe one track, so
rows are grouped into one sample per track with all its captions, which is what multi-caption
retrieval metrics expect.
"""

from __future__ import annotations
from typing import ClassVar

import attrs

from mtrun import Sample, SplitSource
from mtrun_datasets.jamendo import jamendo_track_key, read_autotagging_tsv
from mtrun_datasets.published import audio_location, parse_bool, parse_list, parse_number, read_delimited

__all__ = ["SongDescriber"]

_COLUMNS = ("caption_id", "track_id", "caption", "is_valid_subset", "path")
# Newer releases of the card list MTG-Jamendo tag columns beside the caption columns.
_TAG_COLUMNS = {"genre": "genre", "instrument": "instrument", "mood/theme": "mood"}


class SongDescriber(SplitSource):
    """Song Describer: ~1.1k captions of 706 two-minute MTG-Jamendo tracks, for evaluation.

    One sample per ``track_id``: ``captions`` = every caption of that track (in file order),
    group = ``track_id``; ``extra`` holds ``caption_ids``, ``familiarity``, ``artist_id``,
    ``album_id``, ``duration`` and ``track_key`` (``jamendo:1051148``: the tracks are
    MTG-Jamendo's, and the leakage filter keeps them out of training on MTG-Jamendo). The dataset publishes a single split, intended for
    evaluation only, so every track goes to ``split`` (``test`` by default).
    ``valid_only`` keeps only captions with ``is_valid_subset = True`` (the paper's cleaned
    subset, 746 captions of 546 tracks); tracks left with no caption are dropped.

    Tags: from ``genre``/``instrument``/``mood/theme`` columns when the CSV has them, or from
    ``tags_tsv`` (the published ``song_describer.mtg-jamendo.tsv`` in MTG-Jamendo's format).
    """

    provides: ClassVar[frozenset[str]] = frozenset({"captions"})  # text-to-music retrieval needs them

    @attrs.frozen
    class Config:
        csv: str = attrs.field(metadata={"help": "path to song_describer.csv as published"})
        audio_root: str = attrs.field(metadata={"help": "the dataset's audio folder (holding 00/, 01/, ...)"})
        audio_pattern: str = attrs.field(
            default="{path}", metadata={"help": "audio file under audio_root, filled from the row: {path}, {track_id}"}
        )
        valid_only: bool = attrs.field(default=False, metadata={"help": "keep only captions with is_valid_subset"})
        split: str = attrs.field(default="test", metadata={"help": "the one split every track goes to"})
        tags_tsv: str = attrs.field(
            default="", metadata={"help": "optional song_describer.mtg-jamendo.tsv for genre/instrument/mood tags"}
        )

    def __init__(self, config: Config):
        self.config = config

    def build(self) -> dict[str, list[Sample]]:
        cfg = self.config
        rows = read_delimited(cfg.csv, source="song-describer", key="csv", required=_COLUMNS)
        jamendo_tags: dict[str, dict[str, list[str]]] = {}
        if cfg.tags_tsv:
            for track in read_autotagging_tsv(cfg.tags_tsv, source="song-describer", key="tags_tsv"):
                jamendo_tags[jamendo_track_key(track["TRACK_ID"])] = track["tags"]

        tracks: dict[str, Sample] = {}
        for row in rows:
            track_id = row["track_id"].strip()
            caption = (row.get("caption") or "").strip()
            if not track_id or not caption or (cfg.valid_only and not parse_bool(row["is_valid_subset"])):
                continue
            sample = tracks.get(track_id)
            if sample is None:
                tags = {
                    name: values
                    for column, name in _TAG_COLUMNS.items()
                    if (values := parse_list(row.get(column)))
                } or jamendo_tags.get(jamendo_track_key(track_id), {})
                sample = tracks[track_id] = Sample(
                    id=track_id,
                    audio=audio_location(cfg.audio_root, cfg.audio_pattern, row, source="song-describer"),
                    tags={k: list(v) for k, v in tags.items()},
                    group=track_id,
                    extra={
                        "caption_ids": [],
                        "familiarity": [],
                        "artist_id": (row.get("artist_id") or "").strip(),
                        "album_id": (row.get("album_id") or "").strip(),
                        "duration": parse_number(row.get("duration"), source="song-describer", where=str(cfg.csv), column="duration"),
                        "track_key": jamendo_track_key(track_id),
                    },
                )
            sample.captions.append(caption)
            sample.extra["caption_ids"].append(row["caption_id"].strip())
            sample.extra["familiarity"].append((row.get("familiarity") or "").strip())
        return {cfg.split: list(tracks.values())} if tracks else {}
