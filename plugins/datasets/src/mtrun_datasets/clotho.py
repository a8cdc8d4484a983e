"""Clotho (Drossos et al., 2020) from its published ``clotho_captions_*.csv`` files.

Each file has one row per clip: ``file_name, caption_1, ..., caption_5``. The audio archives
unpack into ``development/``, ``validation/`` and ``evaluation/`` folders, which the default
``audio_pattern`` follows through ``{subset}``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import attrs

from mtrun import Sample, SplitSource
from mtrun_datasets.published import audio_location, read_delimited

__all__ = ["Clotho"]

_CAPTION = re.compile(r"caption_(\d+)$")


def _default_files() -> dict[str, str]:
    return {
        "train": "clotho_captions_development.csv",
        "val": "clotho_captions_validation.csv",
        "test": "clotho_captions_evaluation.csv",
    }


class Clotho(SplitSource):
    """Clotho: ~6k sound clips of 15–30 s with five captions each.

    ``files`` maps each mtrun split to its published file inside ``metadata_dir``:
    ``development`` → ``train``, ``validation`` → ``val`` (Clotho v2 onwards; drop the key
    for v1), ``evaluation`` → ``test``. One sample per row: id and group = ``file_name``;
    ``captions`` = ``caption_1`` .. ``caption_5`` in order. ``audio_pattern`` may use
    ``{file_name}``, ``{subset}`` (the part of the file name after ``clotho_captions_``, e.g.
    ``development``) and ``{split}``.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"captions"})  # text-to-music retrieval needs them

    @attrs.frozen
    class Config:
        metadata_dir: str = attrs.field(metadata={"help": "folder holding the published clotho_captions_*.csv"})
        audio_root: str = attrs.field(metadata={"help": "folder holding development/, validation/, evaluation/"})
        audio_pattern: str = attrs.field(
            default="{subset}/{file_name}",
            metadata={"help": "audio file under audio_root: {file_name}, {subset}, {split}"},
        )
        files: dict[str, str] = attrs.field(
            factory=_default_files, metadata={"help": "split -> captions CSV file name in metadata_dir"}
        )

    def __init__(self, config: Config):
        self.config = config

    def build(self) -> dict[str, list[Sample]]:
        cfg = self.config
        out: dict[str, list[Sample]] = {}
        for split, name in cfg.files.items():
            rows = read_delimited(
                Path(cfg.metadata_dir).expanduser() / name,
                source="clotho",
                key=f"metadata_dir + files.{split}",
                required=("file_name", "caption_1"),
            )
            subset = Path(name).stem.removeprefix("clotho_captions_")
            samples = []
            for row in rows:
                file_name = row["file_name"].strip()
                if not file_name:
                    continue
                numbered = sorted(
                    (int(m.group(1)), (value or "").strip())
                    for column, value in row.items()
                    if (m := _CAPTION.match(column))
                )
                samples.append(
                    Sample(
                        id=file_name,
                        audio=audio_location(
                            cfg.audio_root, cfg.audio_pattern, {**row, "split": split, "subset": subset}, source="clotho"
                        ),
                        captions=[text for _, text in numbered if text],
                        group=file_name,
                        extra={"subset": subset},
                    )
                )
            out[split] = samples
        return out
