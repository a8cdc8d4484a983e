"""MagnaTagATune (Law et al., 2009) from its published ``annotations_final.csv``.

Despite the name the file is TAB-separated (fields often double-quoted): ``clip_id``, 188
binary tag columns, then ``mp3_path`` (``f/artist-album-03-title-88-117.mp3``). The clips are
~29 s cuts of 5,223 songs, and the 16 archive folders ``0``–``f`` are the basis of the split
the tagging literature has used since Dieleman & Schrauwen (2014).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import ClassVar

import attrs

from mtrun import Sample, SplitSource
from mtrun_datasets.published import audio_location, read_delimited

__all__ = ["MagnaTagATune", "TAG_CATEGORIES", "categorise_mtt_tags"]

_GENRE = "classical techno electronic rock ambient indian opera pop classic dance country metal choral".split()
TAG_CATEGORIES: dict[str, str] = {
    **{t: "genre" for t in _GENRE},
    "new age": "genre",
    **{t: "instrument" for t in "guitar strings drums piano beat beats violin synth harpsichord flute sitar harp cello".split()},
    **{
        t: "vocal"
        for t in (
            "vocal vocals singing female male woman man choir voice".split()
            + ["no vocals", "no vocal", "no voice", "male vocal", "male voice", "female vocal", "female voice"]
        )
    },
    "slow": "tempo",
    "fast": "tempo",
    **{t: "mood" for t in ("loud", "quiet", "soft", "weird")},
}
"""A category for each of the usual top-50 tags (MTT publishes none). Any other tag falls in
``tag``; ``solo`` stays there because it describes the arrangement, not one category."""

_SONG = re.compile(r"-\d+-\d+\.mp3$")


def mtt_song(mp3_path: str) -> str:
    """The song a MagnaTagATune clip was cut from (its file name without ``-START-END.mp3``):
    clips of one song share it, so they are never each other's negatives."""
    return _SONG.sub("", str(mp3_path).rsplit("/", 1)[-1])


def mtt_track_key(clip_id: str) -> str:
    """The leakage filter's name of a MagnaTagATune clip (LP-MusicCaps-MTT's ``track_id`` is
    the same clip id)."""
    return f"mtt:{str(clip_id).strip()}"


def categorise_mtt_tags(tags: list[str]) -> dict[str, list[str]]:
    """Group MagnaTagATune tags by :data:`TAG_CATEGORIES`, keeping their order."""
    out: dict[str, list[str]] = {}
    for tag in tags:
        out.setdefault(TAG_CATEGORIES.get(tag, "tag"), []).append(tag)
    return out


def _folders(text: str) -> set[str]:
    return {c for c in text.lower() if not c.isspace() and c != ","}


class MagnaTagATune(SplitSource):
    """MagnaTagATune: 25,863 clips with 188 binary tags, in the standard top-50 setup.

    Tag subset: the ``top_k`` (default 50) tag columns with the most positive clips counted
    over the whole file (ties broken by column order), which reproduces the usual top-50 list
    (guitar, classical, slow, techno, ...); ``top_k = 0`` keeps all 188.
    ``drop_untagged`` (default on) drops clips with none of the kept tags, as the standard
    top-50 split does (about 21k clips remain).

    Split by the first folder of ``mp3_path``: ``0``–``b`` → ``train``, ``c`` → ``val``,
    ``d``–``f`` → ``test`` (``train_folders``/``val_folders``/``test_folders`` change it;
    clips in no listed folder are left out).

    Each sample: id = ``clip_id``; group = the song (``mp3_path`` without its
    ``-START-END.mp3`` clip suffix), so clips of one song are never each other's negatives;
    no captions; ``tags`` by category (genre, instrument, vocal, tempo, mood, tag; see
    :data:`TAG_CATEGORIES`).
    """

    provides: ClassVar[frozenset[str]] = frozenset()  # tags only: no "captions" for retrieval

    @attrs.frozen
    class Config:
        annotations: str = attrs.field(metadata={"help": "path to annotations_final.csv as published (tab-separated)"})
        audio_root: str = attrs.field(metadata={"help": "folder holding the mp3 folders 0/ .. f/"})
        audio_pattern: str = attrs.field(
            default="{mp3_path}", metadata={"help": "audio file under audio_root: {mp3_path}, {clip_id}"}
        )
        top_k: int = attrs.field(
            default=50, validator=attrs.validators.ge(0), metadata={"help": "keep the K most frequent tags (0: all 188)"}
        )
        drop_untagged: bool = attrs.field(default=True, metadata={"help": "drop clips with none of the kept tags"})
        train_folders: str = attrs.field(default="0123456789ab", metadata={"help": "mp3 folders that form train"})
        val_folders: str = attrs.field(default="c", metadata={"help": "mp3 folders that form val"})
        test_folders: str = attrs.field(default="def", metadata={"help": "mp3 folders that form test"})

    def __init__(self, config: Config):
        self.config = config

    def build(self) -> dict[str, list[Sample]]:
        cfg = self.config
        rows = read_delimited(
            cfg.annotations, source="magnatagatune", key="annotations", delimiter="\t", required=("clip_id", "mp3_path")
        )
        rows = [r for r in rows if (r.get("mp3_path") or "").strip()]
        columns = [c for c in (rows[0] if rows else {}) if c not in ("clip_id", "mp3_path")]
        counts = Counter({c: sum((r.get(c) or "").strip() == "1" for r in rows) for c in columns})
        ranked = sorted(columns, key=lambda c: (-counts[c], columns.index(c)))
        kept = set(ranked[: cfg.top_k] if cfg.top_k else ranked)
        kept_in_order = [c for c in columns if c in kept]

        where = {}
        for split, folders in (("train", cfg.train_folders), ("val", cfg.val_folders), ("test", cfg.test_folders)):
            for folder in _folders(folders):
                where.setdefault(folder, split)
        out: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
        for row in rows:
            mp3_path = row["mp3_path"].strip()
            split = where.get(mp3_path.split("/", 1)[0].lower())
            tags = [c for c in kept_in_order if (row.get(c) or "").strip() == "1"]
            if split is None or (cfg.drop_untagged and not tags):
                continue
            out[split].append(
                Sample(
                    id=row["clip_id"].strip(),
                    audio=audio_location(cfg.audio_root, cfg.audio_pattern, row, source="magnatagatune"),
                    tags=categorise_mtt_tags(tags),
                    group=mtt_song(mp3_path),
                    extra={"mp3_path": mp3_path, "track_key": mtt_track_key(row["clip_id"])},
                )
            )
        return {split: items for split, items in out.items() if items}
