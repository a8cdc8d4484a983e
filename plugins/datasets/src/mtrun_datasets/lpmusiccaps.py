"""LP-MusicCaps (Doh et al., 2023) from the tables published on the Hugging Face hub.

Three variants share one layout: ``seungheondoh/LP-MusicCaps-{MSD,MTT,MC}`` publish
``data/{train,valid,test}-NNNNN-of-NNNNN-HASH.parquet`` files whose rows hold an id
(``track_id``; MC: ``ytid``), the source tags (MSD: ``tag``; MTT: ``tag_top50`` and
``tag_top188``; MC: MusicCaps' ``aspect_list``), four LLM-written captions
(``caption_writing``, ``caption_summary``, ``caption_paraphrase``,
``caption_attribute_prediction``; MC also ``caption_ground_truth``), and metadata such as
``path`` (MSD, MTT), ``title``, ``artist_name``, ``pseudo_attribute`` and ``is_crawled``.
The same records exported as JSON or JSON lines read the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import attrs

from mtrun import MtrunError, Sample, SplitSource, canonical_split
from mtrun_datasets.magnatagatune import categorise_mtt_tags, mtt_song, mtt_track_key
from mtrun_datasets.published import audio_location, hold_out, parse_bool, parse_list, read_records

__all__ = ["LPMusicCaps"]

_SUFFIXES = (".parquet", ".json", ".jsonl")
_ID_FIELDS = ("track_id", "ytid", "fname", "id")
_TAG_FIELDS = ("tag", "aspect_list", "tag_top50", "tag_top188")
_EXTRA_FIELDS = (
    "title", "artist_name", "release", "year", "pseudo_attribute", "is_crawled",
    "start_s", "end_s", "author_id", "audioset_positive_labels", "is_balanced_subset", "is_audioset_eval",
)  # fmt: skip


def _default_captions() -> list[str]:
    # caption_attribute_prediction is left out: the dataset card warns that it is unreliable.
    return ["caption_ground_truth", "caption_writing", "caption_summary", "caption_paraphrase"]


def _plain(value: Any) -> Any:
    """Lists and scalars as they are; anything else (numpy scalars from pyarrow) as a string."""
    if value is None or isinstance(value, (bool, int, float, str, list)):
        return value
    return str(value)


class LPMusicCaps(SplitSource):
    """LP-MusicCaps (MSD, MTT or MC): pseudo captions written by an LLM from each clip's tags.

    ``files`` lists the published tables, or folders holding them (every ``.parquet``,
    ``.json`` and ``.jsonl`` inside, sorted). Split: a row's ``split`` field when it has one,
    else the file name's prefix before the first ``-`` (``train-0000-of-0002-....parquet``),
    with ``valid`` → ``val``. MC publishes only train and test; ``val_fraction`` holds out a
    hashed share of train as ``val``.

    Each sample: id and group = ``id_field`` (default: the first of ``track_id``, ``ytid``,
    ``fname`` a row has); ``captions`` = the non-empty ``caption_fields`` in order; ``tags``
    from ``tag_field`` (default: the first of ``tag``, ``aspect_list``, ``tag_top50``,
    ``tag_top188``), under ``tag`` for MSD, ``aspect`` for MC and MagnaTagATune's categories
    for MTT; ``extra`` keeps metadata such as ``title``, ``artist_name``, ``pseudo_attribute``,
    ``is_crawled``, ``start_s``/``end_s``. Rows with neither a caption nor a tag (some 4k MTT
    rows) are dropped.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"captions"})  # text-to-music retrieval needs them

    @attrs.frozen
    class Config:
        files: list[str] = attrs.field(metadata={"help": "published tables (parquet/json/jsonl) or folders of them"})
        audio_root: str = attrs.field(metadata={"help": "folder holding the audio"})
        audio_pattern: str = attrs.field(
            default="{path}",
            metadata={"help": "audio file under audio_root, filled from the row: {path} (MSD, MTT), '{ytid}.wav' for MC"},
        )
        caption_fields: list[str] = attrs.field(
            factory=_default_captions, metadata={"help": "row fields used as captions, in order (missing ones skipped)"}
        )
        tag_field: str = attrs.field(default="", metadata={"help": "row field with the tags; '' picks the variant's"})
        id_field: str = attrs.field(default="", metadata={"help": "row field with the item id; '' picks the variant's"})
        crawled_only: bool = attrs.field(default=False, metadata={"help": "keep only rows with is_crawled = True"})
        val_fraction: float = attrs.field(
            default=0.0,
            validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)],
            metadata={"help": "when there is no published val split: share of train held out as 'val'"},
        )

    def __init__(self, config: Config):
        self.config = config

    def _tables(self) -> list[tuple[Path, str]]:
        """Every table file with the ``[data]`` key naming it."""
        if not self.config.files:
            raise MtrunError("lp-musiccaps: [data].files is empty; list the published parquet/json files")
        tables = []
        for i, entry in enumerate(self.config.files):
            path = Path(entry).expanduser()
            if path.is_dir():
                found = sorted(p for p in path.iterdir() if p.suffix.lower() in _SUFFIXES)
                if not found:
                    raise MtrunError(
                        f"lp-musiccaps: folder {path} (set by [data].files[{i}]) holds no .parquet, .json or .jsonl file"
                    )
                tables += [(p, f"files[{i}]") for p in found]
            else:
                tables.append((path, f"files[{i}]"))
        return tables

    def build(self) -> dict[str, list[Sample]]:
        cfg = self.config
        out: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
        for path, key in self._tables():
            records = read_records(path, source="lp-musiccaps", key=key)
            file_split = _split_named(path.name.split("-", 1)[0].split(".", 1)[0])
            kept = 0
            for row in records:
                split = _split_named(str(row.get("split", ""))) or file_split
                if split is None:
                    raise MtrunError(
                        f"lp-musiccaps: cannot tell the split of {path} (set by [data].{key}): its rows have no "
                        "'split' field and its name does not start with train-, valid- or test-"
                    )
                sample = self._sample(row, path, key)
                if sample is not None:
                    out[split].append(sample)
                    kept += 1
            if kept or not records:
                continue
            # Nothing kept: a misspelled field drops every row silently; look at the fields only now.
            fields = {f for row in records for f in row}
            tag_fields = [cfg.tag_field] if cfg.tag_field else list(_TAG_FIELDS)
            if not fields & {*cfg.caption_fields, *tag_fields}:
                raise MtrunError(
                    f"lp-musiccaps: no row of {path} (set by [data].{key}) has a caption in [data].caption_fields = "
                    f"{list(cfg.caption_fields)} or tags in [data].tag_field = {cfg.tag_field!r}; its rows have: "
                    f"{', '.join(sorted(fields))}"
                )
        if not out["val"]:
            out["train"], out["val"] = hold_out(out["train"], cfg.val_fraction)
        return {split: items for split, items in out.items() if items}

    def _sample(self, row: dict[str, Any], path: Path, key: str) -> Sample | None:
        cfg = self.config
        if cfg.crawled_only and not parse_bool(row.get("is_crawled", False)):
            return None
        id_field = cfg.id_field or next((f for f in _ID_FIELDS if row.get(f) not in (None, "")), "")
        if not id_field or row.get(id_field) in (None, ""):
            raise MtrunError(
                f"lp-musiccaps: a row of {path} (set by [data].{key}) has no id field "
                f"{cfg.id_field or ' / '.join(_ID_FIELDS[:3])!r}; set [data].id_field (row fields: {', '.join(row)})"
            )
        item_id = str(row[id_field]).strip()
        captions = [str(row[f]).strip() for f in cfg.caption_fields if isinstance(row.get(f), str) and row[f].strip()]
        tag_field = cfg.tag_field or next((f for f in _TAG_FIELDS if f in row), "")
        tag_list = parse_list(row.get(tag_field)) if tag_field else []
        if not captions and not tag_list:
            return None
        if tag_field.startswith("tag_top"):
            tags = categorise_mtt_tags(tag_list)
        elif tag_list:
            tags = {"aspect" if tag_field == "aspect_list" else "tag": tag_list}
        else:
            tags = {}
        fields = {k: ("" if v is None else v) for k, v in row.items()}
        group, track = _recording(row, item_id)
        extra = {f: _plain(row[f]) for f in _EXTRA_FIELDS if f in row}
        if track:
            extra["track_key"] = track
        return Sample(
            id=item_id,
            audio=audio_location(cfg.audio_root, cfg.audio_pattern, fields, source="lp-musiccaps"),
            captions=captions,
            tags=tags,
            group=group,
            extra=extra,
        )


def _recording(row: dict[str, Any], item_id: str) -> tuple[str, str | None]:
    """The item's group and the recording's name across sources (the leakage filter's
    ``track_key``): LP-MusicCaps-MC rows are MusicCaps clips (``youtube:ytid``, as the
    ``musiccaps`` source names them), LP-MusicCaps-MTT rows MagnaTagATune clips (``mtt:clip_id``,
    grouped by song, as ``magnatagatune`` does). Other rows (LP-MusicCaps-MSD) keep their id."""
    ytid = str(row.get("ytid") or "").strip()
    if ytid:
        return item_id, f"youtube:{ytid}"
    path = str(row.get("path") or "")
    if path.endswith(".mp3") and str(row.get("track_id") or "").strip().isdigit():
        return mtt_song(path), mtt_track_key(row["track_id"])
    return item_id, None


def _split_named(name: str) -> str | None:
    """``train``/``val``/``test`` for a published split name (``valid-…``, ``split: validation``), else ``None``."""
    split = canonical_split(name) if name.strip() else None
    return split if split in ("train", "val", "test") else None
