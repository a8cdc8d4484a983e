"""AudioCaps (Kim et al., 2019) from its published ``train.csv``, ``val.csv`` and ``test.csv``.

Each file has one row per *caption*: ``audiocap_id, youtube_id, start_time, caption``. A clip
appears once in ``train`` (one caption) and five times in ``val``/``test`` (five captions), so
rows are grouped by ``youtube_id`` into one multi-caption sample per clip, which is what the
retrieval metrics count as one item.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import attrs

from mtrun import Sample, SplitSource
from mtrun_datasets.published import audio_location, parse_number, read_delimited

__all__ = ["AudioCaps"]

_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


def _default_files() -> dict[str, str]:
    return {"train": "train.csv", "val": "val.csv", "test": "test.csv"}


class AudioCaps(SplitSource):
    """AudioCaps: ~50k ten-second AudioSet clips; 1 caption each in train, 5 in val and test.

    ``files`` maps each mtrun split to its published file inside ``metadata_dir`` (leave a
    split out to skip it). One sample per ``youtube_id`` and file: id and group =
    ``youtube_id``; ``captions`` = all its rows' captions in file order; ``extra`` holds
    ``start_time`` (seconds into the YouTube video) and the ``audiocap_ids``. ``audio_pattern``
    may use ``{youtube_id}``, ``{start_time}``, ``{audiocap_id}`` (of the first row),
    ``{split}`` (train/val/test) and ``{subset}`` (the file's stem).
    """

    provides: ClassVar[frozenset[str]] = frozenset({"captions"})  # text-to-music retrieval needs them

    @attrs.frozen
    class Config:
        metadata_dir: str = attrs.field(metadata={"help": "folder holding the published train/val/test CSVs"})
        audio_root: str = attrs.field(metadata={"help": "folder holding the downloaded clips"})
        audio_pattern: str = attrs.field(
            default="{youtube_id}.wav",
            metadata={"help": "audio file under audio_root: {youtube_id}, {start_time}, {audiocap_id}, {split}, {subset}"},
        )
        files: dict[str, str] = attrs.field(
            factory=_default_files, metadata={"help": "split -> CSV file name in metadata_dir"}
        )

    def __init__(self, config: Config):
        self.config = config

    def build(self) -> dict[str, list[Sample]]:
        cfg = self.config
        out: dict[str, list[Sample]] = {}
        for split, name in cfg.files.items():
            rows = read_delimited(
                Path(cfg.metadata_dir).expanduser() / name,
                source="audiocaps",
                key=f"metadata_dir + files.{split}",
                required=_COLUMNS,
            )
            # One clip per (video, start): a video's other segment is other audio with other captions.
            starts: dict[str, set[str]] = {}
            for row in rows:
                starts.setdefault(row["youtube_id"].strip(), set()).add(row["start_time"].strip())
            clips: dict[tuple[str, str], Sample] = {}
            for row in rows:
                youtube_id, start = row["youtube_id"].strip(), row["start_time"].strip()
                if not youtube_id:
                    continue
                sample = clips.get((youtube_id, start))
                if sample is None:
                    fields = {**row, "split": split, "subset": Path(name).stem}
                    sample = clips[youtube_id, start] = Sample(
                        # the video's id, unless the split holds several of its segments
                        id=youtube_id if len(starts[youtube_id]) == 1 else f"{youtube_id}_{start}",
                        audio=audio_location(cfg.audio_root, cfg.audio_pattern, fields, source="audiocaps"),
                        group=youtube_id,  # segments of one video are never each other's negatives
                        extra={
                            "start_time": parse_number(row["start_time"], source="audiocaps", where=name, column="start_time"),
                            "audiocap_ids": [],
                            "track_key": f"youtube:{youtube_id}",  # as MusicCaps names an AudioSet video
                        },
                    )
                caption = (row.get("caption") or "").strip()
                if caption:
                    sample.captions.append(caption)
                sample.extra["audiocap_ids"].append(row["audiocap_id"].strip())
            out[split] = list(clips.values())
        return out
