"""What the public-dataset adapters share: finding the published metadata files, reading them
as they are distributed, and turning a row into an audio path under the user's audio folder.

The adapters never check that audio files exist (a dataset of 50k clips would be stat-ed on
every start, and the loader skips and lists missing files anyway); they only fail, with the
config key to fix, when a metadata file the user pointed at is missing or malformed.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path
from typing import Any, Iterable, Mapping

from mtrun import MtrunError, Sample, hash_split

__all__ = [
    "audio_location",
    "hold_out",
    "parse_bool",
    "parse_list",
    "read_delimited",
    "read_records",
    "require_dir",
    "require_file",
]


def require_file(path: str | Path, *, source: str, key: str) -> Path:
    """The metadata file at ``path``, or an error naming the file and the config key to fix.

    Args:
        path: Where the recipe says the file is (``~`` is expanded).
        source: The registered data source name, for the message.
        key: The ``[data]`` key that points at the file (``csv``, ``files.val``, ...).
    """
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        what = "is a folder, not a file" if resolved.is_dir() else "not found"
        raise MtrunError(
            f"{source}: metadata file {what}: {resolved} (set by [data].{key}); point it at the "
            f"dataset's published metadata file"
        )
    return resolved


def require_dir(path: str | Path, *, source: str, key: str) -> Path:
    """The folder at ``path``, or an error naming it and the config key to fix."""
    resolved = Path(path).expanduser()
    if not resolved.is_dir():
        raise MtrunError(f"{source}: metadata folder not found: {resolved} (set by [data].{key})")
    return resolved


def read_delimited(
    path: str | Path, *, source: str, key: str, delimiter: str = ",", required: Iterable[str] = ()
) -> list[dict[str, str]]:
    """Rows of a CSV/TSV file with a header line, as dicts of strings.

    ``utf-8-sig`` decoding drops the byte-order mark some published CSVs start with, which
    would otherwise become part of the first column's name.

    Raises:
        MtrunError: The file is missing, not UTF-8 CSV/TSV, has a row with more or fewer
            fields than the header (a published file's row cut short would read its missing
            fields, such as MusicCaps' ``is_audioset_eval``, as empty: silently another split),
            or lacks one of the ``required`` columns (the message lists the columns it has,
            which is usually enough to spot a wrong file).
    """
    from mtrun import read_table

    file = require_file(path, source=source, key=key)
    if delimiter not in (",", "\t"):
        raise ValueError(f"delimiter must be ',' or a tab (got {delimiter!r})")
    try:
        rows = read_table(file, format="csv" if delimiter == "," else "tsv")
        with file.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            columns = [c.strip() for c in next(reader, [])]
            short = [reader.line_num for fields in reader if 0 < len(fields) < len(columns) and any(f.strip() for f in fields)]
    except UnicodeDecodeError as exc:
        raise MtrunError(f"{source}: {file} (set by [data].{key}) is not UTF-8 text: {exc}") from None
    except MtrunError as exc:
        raise MtrunError(f"{source}: {exc} (set by [data].{key})") from None
    if not rows:
        raise MtrunError(f"{source}: {file} (set by [data].{key}) has no rows below its header; is it the whole file?")
    if short:
        raise MtrunError(
            f"{source}: {file} (set by [data].{key}) has {len(short)} row(s) with fewer fields than its "
            f"{len(columns)} columns, on line(s) {', '.join(map(str, short[:5]))}{' ...' if len(short) > 5 else ''}: "
            "a row cut short (a damaged download?); restore the file"
        )
    missing = [c for c in required if c not in columns]
    if missing:
        raise MtrunError(
            f"{source}: {file} (set by [data].{key}) lacks the column(s) {', '.join(missing)}; "
            f"it has: {', '.join(columns) or 'no header'}"
        )
    return rows


def read_records(path: str | Path, *, source: str, key: str) -> list[dict[str, Any]]:
    """Records of a Parquet, JSON (a list of objects, or an object of objects keyed by id,
    the key landing in ``id``) or JSON-lines file: the formats dataset hubs publish tables in.

    Reading is :func:`mtrun.read_table`'s; this adds the config key to
    its messages, since the user fixes the recipe, not the file.
    """
    from mtrun import read_table

    file = require_file(path, source=source, key=key)
    suffix = file.suffix.lower()
    if suffix not in (".parquet", ".json", ".jsonl"):
        raise MtrunError(
            f"{source}: {file} (set by [data].{key}) has an unsupported format '{suffix}'; "
            "expected .parquet, .json or .jsonl"
        )
    try:
        return read_table(file)
    except MtrunError as exc:
        raise MtrunError(f"{source}: {exc} (set by [data].{key})") from None


def audio_location(
    audio_root: str | Path, pattern: str, fields: Mapping[str, Any], *, source: str, key: str = "audio_pattern"
) -> str:
    """The audio path for one item: ``pattern`` filled from the row, under ``audio_root``.

    Datasets that publish only ids (MusicCaps' ``ytid``) leave the file name to whoever
    downloaded the audio, hence a pattern rather than a fixed rule.

    Raises:
        MtrunError: The pattern names a field the row does not have.
    """
    try:
        relative = pattern.format_map(dict(fields))
    except KeyError as exc:
        names = ", ".join("{" + str(k) + "}" for k in fields)
        raise MtrunError(
            f"{source}: [data].{key} = {pattern!r} uses {{{exc.args[0]}}}, which this dataset's rows "
            f"do not have; available: {names}"
        ) from None
    except (ValueError, IndexError, AttributeError, TypeError) as exc:  # "{id.x}", "{id[a]}": not our fields
        raise MtrunError(f"{source}: [data].{key} = {pattern!r} is not a valid pattern: {exc}") from None
    return str(Path(audio_root).expanduser() / relative)


def parse_number(text: str | None, *, source: str, where: str, column: str) -> int | float | None:
    """A numeric metadata field: ``30`` stays an int, ``30.5`` a float, empty is ``None``.

    Raises:
        MtrunError: The field is not a number; names the source, the file and the column.
    """
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise MtrunError(f"{source}: {where}: column {column} holds {text!r}, not a number") from None
    return int(value) if value.is_integer() else value


def parse_bool(value: Any) -> bool:
    """``True``/``False`` as the published CSVs spell them (``True``, ``true``, ``1``)."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "1", "yes", "t")


def parse_list(value: Any) -> list[str]:
    """A list of strings from a list, a Python-literal or JSON list string (``"['a', 'b']"``,
    as MusicCaps writes ``aspect_list``), or a comma-separated string."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value).strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)):
            return [str(v).strip() for v in parsed if str(v).strip()]
        text = text.strip("[]")
    return [part.strip().strip("'\"") for part in text.split(",") if part.strip().strip("'\"")]


def hold_out(samples: list[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Split ``samples`` into (kept, held out) with about ``fraction`` held out.

    The choice hashes each item's group (or id), so it is the same on every machine and run,
    does not move when rows are added, and never puts two clips of one group on both sides.
    """
    if fraction <= 0:
        return samples, []
    kept, held = [], []
    shares = {"held": fraction, "kept": 1.0 - fraction}
    for sample in samples:
        (held if hash_split(sample.group or sample.id, shares) == "held" else kept).append(sample)
    return kept, held
