"""MTG-Jamendo (Bogdanov et al., 2019) from the auto-tagging split files of its repository.

The files (``data/splits/split-N/autotagging[_SUBSET]-{train,validation,test}.tsv``) are
tab-separated with the header ``TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION TAGS``, but the
``TAGS`` column is really *the rest of the row*: one ``category---tag`` per extra field
(``genre---rock  instrument---guitar  mood/theme---happy``). A CSV reader would keep only the
first tag, so the rows are split by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import attrs

from mtrun import MtrunError, Sample, SplitSource
from mtrun_datasets.published import audio_location, parse_number, require_dir, require_file

__all__ = ["MTGJamendo", "jamendo_track_key", "read_autotagging_tsv"]

_HEADER = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION")
CATEGORIES = {"genre": "genre", "instrument": "instrument", "mood/theme": "mood"}
"""Jamendo's tag prefixes → mtrun tag categories (``mood/theme`` becomes ``mood``)."""

SUBSETS = {
    "all": "autotagging",
    "top50tags": "autotagging_top50tags",
    "genre": "autotagging_genre",
    "instrument": "autotagging_instrument",
    "moodtheme": "autotagging_moodtheme",
}
"""``subset`` values → the published file prefix."""

_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def jamendo_track_key(track_id: str) -> str:
    """``jamendo:1051148`` for ``track_1051148``, ``track_0001051148``, ``1051148`` or ``1051148.0``.

    MTG-Jamendo writes ``track_0000214``; Song Describer (whose tracks are Jamendo's) writes
    ``214``. Both adapters put this key in ``Sample.extra["track_key"]`` so the leakage filter
    (``mtrun.eval.sets``) can tell that they are one recording.
    """
    text = track_id.strip().removeprefix("track_")
    try:
        text = str(int(float(text)))
    except ValueError:
        pass
    return f"jamendo:{text}"


def read_autotagging_tsv(path: str | Path, *, source: str, key: str) -> list[dict]:
    """Rows of an MTG-Jamendo auto-tagging TSV: the five fixed columns plus ``tags`` by category.

    Also used by Song Describer, whose ``song_describer.mtg-jamendo.tsv`` has this layout.
    """
    file = require_file(path, source=source, key=key)
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise MtrunError(f"{source}: {file} (set by [data].{key}) is not UTF-8 text: {exc}") from None
    if not lines or tuple(lines[0].split("\t")[:5]) != _HEADER:
        raise MtrunError(
            f"{source}: {file} (set by [data].{key}) is not an MTG-Jamendo auto-tagging TSV; "
            f"expected a header starting with {' '.join(_HEADER)}"
        )
    rows, short = [], []
    for number, line in enumerate(lines[1:], 2):
        fields = line.rstrip("\r\n").split("\t")
        if not line.strip():
            continue
        if len(fields) < 5 or not fields[0].strip():
            short.append(number)  # a track without its path or duration: a damaged file, not one to skip
            continue
        row = dict(zip(_HEADER, (f.strip() for f in fields[:5])))
        tags: dict[str, list[str]] = {}
        for raw in fields[5:]:
            raw = raw.strip()
            if not raw:
                continue
            prefix, sep, tag = raw.partition("---")
            category = CATEGORIES.get(prefix, prefix) if sep else "tag"
            tags.setdefault(category, []).append(tag if sep else raw)
        row["tags"] = tags
        rows.append(row)
    if short:
        raise MtrunError(
            f"{source}: {file} (set by [data].{key}) has {len(short)} row(s) without the five fixed columns "
            f"({' '.join(_HEADER)}), on line(s) {', '.join(map(str, short[:5]))}{' ...' if len(short) > 5 else ''}; "
            "restore the file from the dataset's repository"
        )
    return rows


class MTGJamendo(SplitSource):
    """MTG-Jamendo auto-tagging: 55k full tracks with genre, instrument and mood/theme tags.

    Reads ``DATA_DIR/splits/split-{split_index}/{prefix}-{train,validation,test}.tsv`` where
    ``prefix`` is ``autotagging`` (``subset = "all"``: 87 genre, 40 instrument, 56 mood/theme
    tags) or ``autotagging_top50tags`` / ``_genre`` / ``_instrument`` / ``_moodtheme``. The
    published ``validation`` file becomes the ``val`` split.

    Each sample: id and group = ``TRACK_ID``; no captions (the loader joins the tags, or a
    tag-to-caption augmenter writes some); ``tags`` by category ``genre``, ``instrument``,
    ``mood``; ``extra`` holds ``artist_id``, ``album_id``, ``duration`` and ``track_key``
    (``jamendo:214``, shared with Song Describer's copy of the track).
    """

    provides: ClassVar[frozenset[str]] = frozenset()  # tags only: no "captions" for retrieval

    @attrs.frozen
    class Config:
        data_dir: str = attrs.field(metadata={"help": "the repository's data/ folder (holding splits/)"})
        audio_root: str = attrs.field(metadata={"help": "folder holding the audio (00/, 01/, ...)"})
        audio_pattern: str = attrs.field(
            default="{PATH}",
            metadata={"help": "audio file under audio_root: {PATH}, {path_stem} (e.g. '{path_stem}.low.mp3'), {TRACK_ID}"},
        )
        subset: str = attrs.field(
            default="all",
            validator=attrs.validators.in_(tuple(SUBSETS)),
            metadata={"help": "tag subset: all, top50tags, genre, instrument or moodtheme"},
        )
        split_index: int = attrs.field(
            default=0,
            validator=[attrs.validators.ge(0), attrs.validators.le(4)],
            metadata={"help": "which of the published splits split-0 .. split-4"},
        )

    def __init__(self, config: Config):
        self.config = config

    def build(self) -> dict[str, list[Sample]]:
        cfg = self.config
        folder = require_dir(cfg.data_dir, source="mtg-jamendo", key="data_dir") / "splits" / f"split-{cfg.split_index}"
        out: dict[str, list[Sample]] = {}
        for split, published in _SPLITS.items():
            file = folder / f"{SUBSETS[cfg.subset]}-{published}.tsv"
            samples = []
            for row in read_autotagging_tsv(file, source="mtg-jamendo", key="data_dir (with subset and split_index)"):
                fields = {**row, "path_stem": row["PATH"].rsplit(".", 1)[0]}
                fields.pop("tags")
                samples.append(
                    Sample(
                        id=row["TRACK_ID"],
                        audio=audio_location(cfg.audio_root, cfg.audio_pattern, fields, source="mtg-jamendo"),
                        tags=row["tags"],
                        group=row["TRACK_ID"],
                        extra={
                            "artist_id": row["ARTIST_ID"],
                            "album_id": row["ALBUM_ID"],
                            "duration": parse_number(row["DURATION"], source="mtg-jamendo", where=str(file), column="DURATION"),
                            "track_key": jamendo_track_key(row["TRACK_ID"]),
                        },
                    )
                )
            out[split] = samples
        return out
