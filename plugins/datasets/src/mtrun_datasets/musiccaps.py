"""MusicCaps (Agostinelli et al., 2023) from its published ``musiccaps-public.csv``.

The CSV has one row per 10-second AudioSet clip with the columns ``ytid, start_s, end_s,
audioset_positive_labels, aspect_list, caption, author_id, is_balanced_subset,
is_audioset_eval``. Only YouTube ids are published, so the audio file name is whatever the
user's downloader wrote: ``audio_pattern`` fills it from the row.
"""

from __future__ import annotations
from typing import ClassVar

import attrs

from mtrun import Sample, SplitSource
from mtrun_datasets.published import audio_location, hold_out, parse_bool, parse_list, parse_number, read_delimited

__all__ = ["MusicCaps"]

_COLUMNS = ("ytid", "start_s", "end_s", "aspect_list", "caption", "is_audioset_eval")


class MusicCaps(SplitSource):
    """MusicCaps: 5.5k AudioSet music clips, one expert caption and an aspect list each.

    Splits (``split_rule``):

    * ``audioset-eval`` (default): ``is_audioset_eval = True`` → ``test`` (2,858 clips), the
      rest → ``train`` (2,663); ``val_fraction`` moves a fixed, hashed share of ``train`` to
      ``val`` because the dataset publishes no validation split.
    * ``all-test``: every clip in ``test``, for zero-shot evaluation on the whole set.

    Each sample: id and group = ``ytid``; ``captions`` = the one caption; ``tags`` =
    ``{"aspect": aspect_list}`` (MusicCaps' aspects are not categorised); ``extra`` holds
    ``start_s``/``end_s`` (so a loader reading uncut YouTube audio can crop the segment),
    ``author_id``, ``audioset_labels`` (the AudioSet ``/m/...`` ids), ``is_balanced_subset`` and
    ``track_key`` (``youtube:ytid``, for the leakage filter of evaluation sets).
    """

    provides: ClassVar[frozenset[str]] = frozenset({"captions"})  # text-to-music retrieval needs them

    @attrs.frozen
    class Config:
        csv: str = attrs.field(metadata={"help": "path to musiccaps-public.csv as published"})
        audio_root: str = attrs.field(metadata={"help": "folder holding the downloaded clips"})
        audio_pattern: str = attrs.field(
            default="{ytid}.wav",
            metadata={"help": "audio file under audio_root, filled from the row: {ytid}, {start_s}, {end_s}, ..."},
        )
        split_rule: str = attrs.field(
            default="audioset-eval",
            validator=attrs.validators.in_(("audioset-eval", "all-test")),
            metadata={"help": "'audioset-eval': is_audioset_eval -> test, rest -> train; 'all-test': all in test"},
        )
        val_fraction: float = attrs.field(
            default=0.0,
            validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)],
            metadata={"help": "share of train held out (by hashed ytid) as a 'val' split"},
        )

    def __init__(self, config: Config):
        self.config = config

    def build(self) -> dict[str, list[Sample]]:
        cfg = self.config
        rows = read_delimited(cfg.csv, source="musiccaps", key="csv", required=_COLUMNS)
        splits: dict[str, list[Sample]] = {"train": [], "test": []}
        for row in rows:
            ytid = row["ytid"].strip()
            if not ytid:
                continue
            is_eval = parse_bool(row["is_audioset_eval"])
            split = "test" if cfg.split_rule == "all-test" or is_eval else "train"
            caption = (row.get("caption") or "").strip()
            aspects = parse_list(row.get("aspect_list"))
            splits[split].append(
                Sample(
                    id=ytid,
                    audio=audio_location(cfg.audio_root, cfg.audio_pattern, row, source="musiccaps"),
                    captions=[caption] if caption else [],
                    tags={"aspect": aspects} if aspects else {},
                    group=ytid,
                    extra={
                        "start_s": parse_number(row["start_s"], source="musiccaps", where=str(cfg.csv), column="start_s"),
                        "end_s": parse_number(row["end_s"], source="musiccaps", where=str(cfg.csv), column="end_s"),
                        "author_id": (row.get("author_id") or "").strip(),
                        "audioset_labels": parse_list(row.get("audioset_positive_labels")),
                        "is_balanced_subset": parse_bool(row.get("is_balanced_subset", "")),
                        "is_audioset_eval": is_eval,
                        "track_key": f"youtube:{ytid}",  # the leakage filter's id of the recording
                    },
                )
            )
        train, val = hold_out(splits["train"], cfg.val_fraction)
        out = {"train": train, "val": val, "test": splits["test"]}
        return {name: items for name, items in out.items() if items}
