"""The ``manifest`` data source: a table of items (CSV, TSV, JSONL or Parquet) + an audio folder.

Columns (one row per audio item):

=================  ========================================================================
``id``             required; unique within the manifest
``audio``          required; path of the audio file relative to ``audio_root``
``caption``        one caption; in CSV several captions may be joined with ``|``
``captions``       a list (JSONL/Parquet), or ``|``-joined / a JSON list string (CSV)
``caption_1..N``   several caption columns (the AudioCaps/Clotho layout)
``tags``           an object ``{category: [values]}`` (JSONL/Parquet) or its JSON text (CSV)
``tag_<category>`` one column per category, several values separated by ``;``
``split``          ``train``/``val``/``test`` (aliases such as ``valid``, ``validation``,
                   ``development``, ``evaluation`` are normalised; other names are
                   splits of their own, and a near miss such as ``trian`` is warned of);
                   optional, see ``default_split``
``group``          optional; items of one group (clips of one track) are never negatives
=================  ========================================================================

Every other column is kept in ``Sample.extra`` (licence, bpm, renderer, ...). An item needs
some text: at least one caption or one tag column must exist.

The module also holds its table helpers: :func:`read_table`, :func:`canonical_split` and
:func:`hash_split` (public, as ``mtrun.read_table`` and so on), and :func:`split_map`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import zlib
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import attrs

from mtrun.data.sources.base import SplitSource
from mtrun.errors import MtrunError
from mtrun.interfaces import Sample

_log = logging.getLogger("mtrun.data")

__all__ = [
    "SPLIT_ALIASES",
    "ManifestSource",
    "canonical_split",
    "hash_split",
    "outside_root",
    "read_table",
    "row_to_sample",
    "split_map",
]

SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "development": "train",
    "dev": "val",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
}
"""Published split names → mtrun's ``train``/``val``/``test``. Clotho calls its training set
``development`` (and its test set ``evaluation``), hence ``development`` → ``train``; a bare
``dev`` follows the common ML meaning, validation."""

TABLE_FORMATS = ("auto", "csv", "tsv", "jsonl", "json", "parquet")

_KNOWN = {"id", "audio", "caption", "captions", "tags", "split", "group"}


# ------------------------------------------------------------------------------ tables


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in TABLE_FORMATS:
            raise MtrunError(f"{path}: unknown table format {fmt!r}; expected one of {', '.join(TABLE_FORMATS)}")
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    for suffix in reversed(suffixes):
        name = suffix.lstrip(".")
        if name in ("csv", "tsv", "jsonl", "json", "parquet"):
            return name
        if name == "ndjson":
            return "jsonl"
        if name == "pq":
            return "parquet"
    raise MtrunError(
        f"{path}: cannot tell the table format from the extension {path.suffix!r}; "
        "rename it to .csv, .tsv, .jsonl, .json or .parquet (a [data] table of type manifest may instead set format = 'csv' etc.)"
    )


def read_table(path: str | Path, *, format: str = "auto") -> list[dict[str, Any]]:
    """Rows of a CSV, TSV, JSONL, JSON (list of objects) or Parquet file as dicts.

    CSV/TSV values are strings (the header's names stripped, a UTF-8 byte-order mark dropped);
    JSONL/JSON/Parquet keep their types, so list and object columns arrive as lists and dicts.
    Parquet is read with pyarrow.

    Args:
        path: The table file.
        format: ``auto`` (from the extension) or one of ``csv``, ``tsv``, ``jsonl``, ``json``,
            ``parquet``.

    Raises:
        MtrunError: The file is missing, unreadable, or not of the format it claims; the
            message names the file (and the line for JSON errors).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise MtrunError(f"table not found: {file}" + (" (it is a folder)" if file.is_dir() else ""))
    fmt = _format_of(file, format)
    if fmt in ("csv", "tsv"):
        text = _read_utf8(file)
        delimiter = "," if fmt == "csv" else "\t"
        # restval: a row with fewer fields than the header reads its missing ones as "".
        # strict: a quote left open to the end of the file is an error, not one long last field.
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, restval="", strict=True)
        try:
            rows, last_line = [], 1
            for row in reader:
                if None in row:
                    raise MtrunError(
                        f"{file}: line {reader.line_num} has more fields than the header "
                        f"({len(reader.fieldnames or [])} columns)"
                    )
                _check_quoted_lines(file, row, delimiter, len(reader.fieldnames or []), last_line + 1)
                last_line = reader.line_num
                rows.append({(k or "").strip(): v for k, v in row.items()})
        except csv.Error as exc:
            raise MtrunError(
                f"{file}: the record that starts on line {last_line + 1} is not valid {fmt.upper()}: {exc} "
                "(a quote left open? Close it, or double a quote that is part of the text: \"\")"
            ) from None
        return rows
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow is a core dependency
            raise MtrunError(f"{file}: reading Parquet needs pyarrow (`pip install pyarrow`)") from None
        try:
            return pq.read_table(file).to_pylist()
        except Exception as exc:  # noqa: BLE001 - arrow's errors all mean "not a Parquet table"
            raise MtrunError(f"{file}: not a readable Parquet file: {exc}") from None
    text = _read_utf8(file)
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MtrunError(f"{file}: not valid JSON: {exc}") from None
        if isinstance(data, dict):
            data = [{"id": key, **value} if isinstance(value, dict) else {"id": key, "value": value} for key, value in data.items()]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise MtrunError(f"{file}: expected a JSON list of objects (or an object of objects keyed by id)")
        return data
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MtrunError(f"{file}: line {number} is not valid JSON: {exc}") from None
        if not isinstance(row, dict):
            raise MtrunError(f"{file}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def _check_quoted_lines(file: Path, row: dict[Any, Any], delimiter: str, columns: int, line: int) -> None:
    """Refuse a quoted field whose inner lines look like rows of their own: a stray quote (``"12
    inch``) makes the reader take every line up to the next quote into one field, silently."""
    for value in row.values():
        if not isinstance(value, str) or "\n" not in value:
            continue
        inner = value.split("\n")[1:]
        if columns > 1 and any(part.count(delimiter) >= columns - 1 for part in inner):
            raise MtrunError(
                f"{file}: line {line}: a quoted field runs over {len(inner) + 1} lines that look like rows of their own "
                f"(an unbalanced quote?): {value[:60]!r}... Close the quote, or double a quote that is part of the text (\"\")"
            )


def _read_utf8(file: Path) -> str:
    """The file's text; a UTF-8 byte-order mark dropped, invalid UTF-8 refused by line.

    Undecodable bytes are not replaced: a manifest in another encoding (Latin-1, CP-1252)
    would otherwise train on silently garbled captions, and its ids would not match the
    names of its audio files.
    """
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise MtrunError(f"{file}: cannot read the manifest: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = data[exc.start : exc.end].hex(" ")
        raise MtrunError(
            f"{file}:{line}: not valid UTF-8 (byte {bad} at column {column}); manifests must be "
            "UTF-8 text: convert the file (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


# ------------------------------------------------------------------------------ splits


def canonical_split(name: str, *, where: str = "") -> str:
    """``train``/``val``/``test`` for a published split name (see :data:`SPLIT_ALIASES`).

    Names that are not aliases pass through lower-cased, so a manifest may define extra splits
    (``fold1``, ``holdout``) for recipes that ask for them by name.
    """
    text = str(name).strip().lower()
    if not text:
        raise MtrunError(f"{where + ': ' if where else ''}empty split name")
    return SPLIT_ALIASES.get(text, text)


def split_map(assignments: Mapping[str, Iterable[str]], *, where: str = "") -> dict[str, str]:
    """Item → split from published per-split id lists (MTG-Jamendo, MagnaTagATune splits).

    Args:
        assignments: ``{split name: ids}``; split names are normalised with
            :func:`canonical_split`.
        where: The file(s) the lists came from, for messages.

    Raises:
        MtrunError: An id is listed in two different splits (a leak between train and test).
    """
    result: dict[str, str] = {}
    for split, ids in assignments.items():
        name = canonical_split(split, where=where)
        for item in ids:
            key = str(item)
            previous = result.get(key)
            if previous is not None and previous != name:
                raise MtrunError(f"{where + ': ' if where else ''}item {key!r} is in both {previous!r} and {name!r}")
            result[key] = name
    return result


def hash_split(key: str, fractions: Mapping[str, float] | None = None, *, salt: str = "") -> str:
    """A split for datasets that publish none, decided by hashing ``key`` (use the group).

    The same on every machine and run, stable when rows are added, and every item of a group
    lands in one split when the group is the key.

    Args:
        key: The item's group (or id).
        fractions: ``{split: fraction}``; default 80/10/10 train/val/test.
        salt: Changes the assignment while keeping the proportions.
    """
    fractions = fractions or {"train": 0.8, "val": 0.1, "test": 0.1}
    total = sum(fractions.values())
    point = zlib.crc32(f"{salt}{key}".encode()) / 2**32 * total
    running = 0.0
    for split, fraction in fractions.items():
        running += fraction
        if point < running:
            return split
    return next(reversed(list(fractions)))


# ------------------------------------------------------------------------------- rows


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and value != value)


def _text_list(value: Any, *, sep: str, where: str, column: str) -> list[str]:
    if _is_empty(value):
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if not _is_empty(v)]
    if hasattr(value, "tolist"):  # numpy arrays from Parquet via pandas-like readers
        return _text_list(value.tolist(), sep=sep, where=where, column=column)
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            return [str(v).strip() for v in parsed if not _is_empty(v)]
    return [part.strip() for part in text.split(sep) if part.strip()]


def _tags_value(value: Any, *, where: str) -> dict[str, list[str]]:
    if _is_empty(value):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise MtrunError(f"{where}: column 'tags' must be a JSON object {{category: [values]}} (got {value!r})") from None
    if isinstance(value, list) and all(isinstance(v, dict) and "key" in v for v in value):
        value = {v["key"]: v.get("value") for v in value}  # Parquet map columns arrive as pairs
    if not isinstance(value, dict):
        raise MtrunError(f"{where}: column 'tags' must be an object {{category: [values]}} (got {type(value).__name__})")
    tags: dict[str, list[str]] = {}
    for category, values in value.items():
        items = _text_list(values, sep=";", where=where, column="tags") if not isinstance(values, str) else [
            v.strip() for v in values.split(";") if v.strip()
        ]
        if items:
            tags[str(category)] = items
    return tags


def row_to_sample(
    row: Mapping[str, Any],
    *,
    audio_root: str | Path,
    where: str,
    default_split: str = "train",
) -> tuple[str, Sample]:
    """``(split, Sample)`` for one manifest row (column rules in the module docstring).

    Args:
        row: The row as :func:`read_table` returns it.
        audio_root: Folder the ``audio`` column is relative to (absolute paths are kept).
        where: ``file:line`` for messages.
        default_split: Split of rows without a ``split`` value.
    """
    item_id = row.get("id")
    if _is_empty(item_id):
        raise MtrunError(f"{where}: empty 'id'")
    audio = row.get("audio")
    if _is_empty(audio):
        raise MtrunError(f"{where}: item {item_id!r} has an empty 'audio' path")
    audio_path = Path(str(audio).strip()).expanduser()
    if not audio_path.is_absolute():
        audio_path = Path(audio_root) / audio_path

    captions: list[str] = []
    captions += _text_list(row.get("caption"), sep="|", where=where, column="caption")
    captions += _text_list(row.get("captions"), sep="|", where=where, column="captions")
    numbered = sorted(
        (k for k in row if k.startswith("caption_") and k[len("caption_") :].isdigit()),
        key=lambda k: int(k[len("caption_") :]),
    )
    for column in numbered:
        captions += _text_list(row[column], sep="|", where=where, column=column)

    tags = _tags_value(row.get("tags"), where=where)
    for column in row:
        if column.startswith("tag_") and len(column) > 4:
            values = _text_list(row[column], sep=";", where=where, column=column)
            if values:
                tags.setdefault(column[4:], [])
                tags[column[4:]] += [v for v in values if v not in tags[column[4:]]]

    split_value = row.get("split")
    split = default_split if _is_empty(split_value) else canonical_split(str(split_value), where=where)
    group = row.get("group")
    extra = {
        k: v
        for k, v in row.items()
        if k not in _KNOWN and not k.startswith("tag_") and k not in numbered and not _is_empty(v)
    }
    sample = Sample(
        id=str(item_id).strip(),
        audio=str(audio_path),
        sample_rate=None,
        captions=captions,
        tags=tags,
        group=None if _is_empty(group) else str(group).strip(),
        extra=extra,
    )
    return split, sample


def check_columns(columns: Sequence[str], file: str | Path) -> None:
    """Refuse a manifest without ``id``/``audio`` or without any caption or tag column.

    Raises:
        MtrunError: Naming the file, the missing column and the columns it has.
    """
    have = ", ".join(repr(c) if any(ch in c for ch in "\t,;|") else c for c in columns) or "none"
    # One header cell holding the columns: the file is split by another delimiter than its extension says.
    hint = next((f" (it looks {name}-separated: set the manifest's format = {fmt!r}, or rename the file)"
                 for sep, name, fmt in (("\t", "tab", "tsv"), (",", "comma", "csv")) if len(columns) == 1 and sep in columns[0]), "")
    for required in ("id", "audio"):
        if required not in columns:
            raise MtrunError(f"{file}: manifest lacks the required column {required!r}; it has: {have}{hint}")
    texty = [c for c in columns if c in ("caption", "captions", "tags") or c.startswith(("caption_", "tag_"))]
    if not texty:
        raise MtrunError(
            f"{file}: manifest has no text column: add 'caption', 'captions', 'caption_1..N', 'tags' "
            f"or 'tag_<category>'; it has: {have}"
        )


# ------------------------------------------------------------------------------ source


MAX_LISTED_PROBLEMS = 20
"""Rows a refused manifest's message lists; the rest are counted."""


def outside_root(audio: str | Path, root: str | Path) -> bool:
    """Whether ``audio`` lies outside the folder ``root``, judged on the path's text.

    ``..`` components are collapsed before comparing, so ``root/a/../../etc/passwd`` is outside.
    Symbolic links are *not* followed: a link inside the root was put there by whoever owns
    the audio folder (a common way to assemble a dataset from several disks), whereas the
    check exists to stop a manifest's text from reaching files elsewhere.
    """
    path = os.path.normpath(os.path.abspath(os.fspath(audio)))
    base = os.path.normpath(os.path.abspath(os.fspath(root)))
    return os.path.commonpath([path, base]) != base


class ManifestSource(SplitSource):
    """Items listed in a CSV/TSV/JSONL/Parquet manifest, audio in a folder beside it.

    Audio files are not opened here (a large dataset would be read on every start); the
    loader decodes them in workers and skips broken ones, listing each in ``skipped.jsonl``.
    Problems of the manifest itself are refused before training, all rows at once (up to
    :data:`MAX_LISTED_PROBLEMS` listed): a malformed row, an ``audio`` path outside
    ``audio_root`` (unless ``allow_outside_root``) and duplicate ids. Duplicates are an error
    rather than "first one wins", since skipped-file lists, caches, retrieval ground truth and
    resume all key on the id, and which of two rows is the right one is the user's call.

    A row whose captions are all empty and that has no tags is a hole in the data, not a
    broken manifest: it is left out, listed in :attr:`rejected` and in one warning naming
    each such row (``file:line``). The loader cannot do this check, since samples without
    text are legitimate for audio-only objectives.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"captions"})  # text-to-music retrieval needs them

    @attrs.frozen
    class Config:
        path: str = attrs.field(metadata={"help": "the manifest file: .csv, .tsv, .jsonl, .json or .parquet"})
        audio_root: str = attrs.field(
            default="",
            metadata={"help": "folder the 'audio' column is relative to ('' = the manifest's folder; "
                      "a relative folder is taken from the manifest's folder)"},
        )
        format: str = attrs.field(
            default="auto",
            validator=attrs.validators.in_(TABLE_FORMATS),
            metadata={"help": "table format: auto (from the extension), csv, tsv, jsonl, json or parquet"},
        )
        default_split: str = attrs.field(
            default="train", metadata={"help": "split of rows with no 'split' value"}
        )
        allow_outside_root: bool = attrs.field(
            default=False,
            validator=attrs.validators.instance_of(bool),
            metadata={"help": "accept 'audio' paths outside audio_root (absolute, or climbing out with '..'); "
                      "off: such rows are refused, so a manifest cannot reach arbitrary files"},
        )

    def __init__(self, config: Config):
        self.config = config
        self.rejected: list[dict[str, Any]] = []
        """Rows left out by :meth:`build` (``id``, ``path``, ``kind``, ``reason``, ``split``)."""

    @property
    def manifest_path(self) -> Path:
        return Path(self.config.path).expanduser()

    @property
    def audio_root(self) -> Path:
        # Not resolve(): the outside-root check judges paths as written, links unfollowed, on both sides.
        base = self.manifest_path.absolute().parent
        if not self.config.audio_root:
            return base
        root = Path(self.config.audio_root).expanduser()
        return root if root.is_absolute() else base / root

    def build(self) -> dict[str, list[Sample]]:
        """Every row as a sample, by split.

        Raises:
            MtrunError: The manifest is unreadable or lacks a required column; or rows are
                malformed, point outside ``audio_root`` or repeat an id — every such row
                named by ``file:line`` in one message.
        """
        file = self.manifest_path
        self.rejected = []
        rows = read_table(file, format=self.config.format)
        columns: list[str] = []
        for row in rows:
            for column in row:
                if column not in columns:
                    columns.append(column)
        if not rows:
            raise MtrunError(f"{file}: the manifest has no rows")
        check_columns(columns, file)
        first_line = 2 if _format_of(file, self.config.format) in ("csv", "tsv") else 1
        splits: dict[str, list[Sample]] = {}
        seen: dict[str, int] = {}
        problems: list[str] = []
        outside = 0
        root = self.audio_root
        for number, row in enumerate(rows):
            line = number + first_line
            where = f"{file}:{line}"
            try:
                split, sample = row_to_sample(row, audio_root=root, where=where, default_split=self.config.default_split)
            except MtrunError as exc:
                problems.append(str(exc))
                continue
            if not self.config.allow_outside_root and outside_root(sample.audio, root):
                outside += 1
                problems.append(f"{where}: item {sample.id!r}: audio path {str(row.get('audio')).strip()!r} is outside audio_root {str(root)!r}")
                continue
            if sample.id in seen:
                problems.append(f"{where}: id {sample.id!r} already used on line {seen[sample.id]}")
                continue
            seen[sample.id] = line
            if not _has_text(sample):
                self.rejected.append({
                    "id": sample.id,
                    "path": sample.audio,
                    "kind": "no-text",
                    "reason": f"{where}: item {sample.id!r} has no text (its captions are empty and it has no tags)",
                    "split": split,
                })
                continue
            splits.setdefault(split, []).append(sample)
        if problems:
            raise MtrunError(_refusal(file, problems, outside=outside))
        _warn_misspelled_splits(file, splits)
        if self.rejected:
            shown = self.rejected[:MAX_LISTED_PROBLEMS]
            _log.warning(
                "%s: %d row%s left out:\n%s%s",
                file, len(self.rejected), "" if len(self.rejected) == 1 else "s",
                "\n".join(f"  - {r['reason']}" for r in shown),
                f"\n  ... and {len(self.rejected) - len(shown)} more" if len(self.rejected) > len(shown) else "",
            )
        return splits


def _warn_misspelled_splits(file: Path, splits: Mapping[str, list[Sample]]) -> None:
    """Warn of a split name that is a near miss of one mtrun knows (``trian``): its rows form a
    split of their own, which a recipe asking for ``train`` never reads."""
    import difflib

    for name, samples in splits.items():
        # train2, test_b, eval-a: a known name and a suffix are a split named on purpose
        if name in SPLIT_ALIASES or re.match(rf"({'|'.join(SPLIT_ALIASES)})[^a-z]", name):
            continue
        close = difflib.get_close_matches(name, list(SPLIT_ALIASES), n=1, cutoff=0.75)
        if close:
            n = len(samples)
            _log.warning(
                "%s: %d row%s %s the split %r, which is not a split name mtrun knows; did you mean %r? "
                "Rows with that name form a split of their own, which a recipe reads only if it asks for %r.",
                file, n, "" if n == 1 else "s", "has" if n == 1 else "have", name, close[0], name,
            )


def _has_text(sample: Sample) -> bool:
    return any(c.strip() for c in sample.captions) or any(t.strip() for v in sample.tags.values() for t in v)


def _refusal(file: Path, problems: list[str], *, outside: int) -> str:
    if len(problems) == 1 and not outside:
        return problems[0]
    listed = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(listed)
    rows = "1 row is" if len(problems) == 1 else f"{len(problems)} rows are"
    lines = [f"{file}: {rows} invalid; nothing was loaded"]
    lines += [f"  - {p}" for p in listed]
    if more:
        lines.append(f"  ... and {more} more")
    if outside:
        lines.append(
            "  Paths must stay inside audio_root: fix the paths or [data].audio_root, or set "
            "[data].allow_outside_root = true if the manifest is trusted."
        )
    return "\n".join(lines)
