"""Embedding files: what ``mtrun embed`` writes and ``mtrun search`` reads.

Two layouts, chosen by the output's extension:

* ``NAME.parquet`` — one file. Columns ``id``, ``path``, ``size``, ``mtime_ns``, ``seconds``,
  ``embedding`` (``float32`` × D); with windows also ``window_starts`` (seconds) and
  ``windows`` (one ``float32`` × D vector per window). The schema's key-value metadata
  ``mtrun`` holds JSON: the model (path, sha256 of its weights, step), the window policy, and
  the files that could not be embedded, with reasons.
* ``NAME.npy`` — ``NAME.npy`` (``float32 [N, D]``, row ``i`` = ``rows[i]``) plus
  ``NAME.ids.json`` (the same metadata, ``rows`` with ``id``, ``path``, ``size``, ``mtime_ns``,
  ``seconds``, and the sha256 of the ``.npy`` it describes); with windows also
  ``NAME.windows.npy`` (``[W, D]``) whose rows ``window_offset .. window_offset +
  window_count`` belong to a row.

Every file is written to a temporary name and renamed into place, so a reader sees the old
version or the new one, never a part. The ``.npy`` layout has several files: ``NAME.ids.json``
is renamed last and records the sha256 of the arrays, so a pair from two different writes
(a kill between the renames) is recognised and refused, never read as a mismatched table.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from mtrun.cache import write_atomic
from mtrun.errors import MtrunError

__all__ = ["FORMAT", "EmbeddingSet", "StoreError", "layout", "read_embeddings", "write_embeddings"]

FORMAT = "mtrun-embeddings"
VERSION = 1


class StoreError(MtrunError):
    """An embeddings file is missing, of an unknown layout, or damaged; the message names it."""


@attrs.define
class EmbeddingSet:
    """A table of recordings and their embeddings.

    Attributes:
        ids, paths: Per row: the recording's id and absolute path.
        sizes, mtimes: Per row: the file's size and modification time (ns) when embedded:
            with the path, the identity ``mtrun embed`` resumes by.
        seconds: Per row: the recording's duration.
        vectors: ``[N, D]`` float32, L2-normalised.
        windows: ``[W, D]`` per-window vectors (``None`` when not kept).
        window_row: ``[W]`` the row each window belongs to.
        window_starts: ``[W]`` each window's start in seconds.
        meta: The model, window policy and ``skipped`` list (``[{"path", "id", "kind",
            "reason"}]``).
    """

    ids: list[str]
    paths: list[str]
    sizes: np.ndarray
    mtimes: np.ndarray
    seconds: np.ndarray
    vectors: np.ndarray
    windows: np.ndarray | None = None
    window_row: np.ndarray | None = None
    window_starts: np.ndarray | None = None
    meta: dict[str, Any] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, dim: int, *, windows: bool = False, meta: dict[str, Any] | None = None) -> EmbeddingSet:
        return cls(
            ids=[],
            paths=[],
            sizes=np.zeros(0, np.int64),
            mtimes=np.zeros(0, np.int64),
            seconds=np.zeros(0, np.float64),
            vectors=np.zeros((0, dim), np.float32),
            windows=np.zeros((0, dim), np.float32) if windows else None,
            window_row=np.zeros(0, np.int64) if windows else None,
            window_starts=np.zeros(0, np.float64) if windows else None,
            meta=dict(meta or {}),
        )

    @property
    def has_windows(self) -> bool:
        return self.windows is not None

    def select(self, rows: np.ndarray | list[int]) -> EmbeddingSet:
        """The given rows, in that order (windows follow their rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = EmbeddingSet(
            ids=[self.ids[i] for i in rows],
            paths=[self.paths[i] for i in rows],
            sizes=self.sizes[rows],
            mtimes=self.mtimes[rows],
            seconds=self.seconds[rows],
            vectors=self.vectors[rows],
            meta=self.meta,
        )
        if self.has_windows:
            order = np.argsort(self.window_row, kind="stable")
            starts = np.searchsorted(self.window_row[order], rows, side="left")
            ends = np.searchsorted(self.window_row[order], rows, side="right")
            picked = [order[s:e] for s, e in zip(starts, ends)]
            flat = np.concatenate(picked) if picked else np.zeros(0, np.int64)
            out.windows = self.windows[flat]
            out.window_starts = self.window_starts[flat]
            out.window_row = np.repeat(np.arange(len(rows)), [len(p) for p in picked]).astype(np.int64)
        return out

    @staticmethod
    def concat(parts: list[EmbeddingSet], dim: int, *, windows: bool, meta: dict[str, Any]) -> EmbeddingSet:
        out = EmbeddingSet.empty(dim, windows=windows, meta=meta)
        parts = [p for p in parts if len(p)]
        if not parts:
            return out
        out.ids = [i for p in parts for i in p.ids]
        out.paths = [i for p in parts for i in p.paths]
        out.sizes = np.concatenate([p.sizes for p in parts]).astype(np.int64)
        out.mtimes = np.concatenate([p.mtimes for p in parts]).astype(np.int64)
        out.seconds = np.concatenate([p.seconds for p in parts]).astype(np.float64)
        out.vectors = np.concatenate([p.vectors for p in parts]).astype(np.float32)
        if windows:
            if not all(p.has_windows for p in parts):
                raise StoreError("cannot join embeddings with and without per-window vectors")
            offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
            out.windows = np.concatenate([p.windows for p in parts]).astype(np.float32)
            out.window_starts = np.concatenate([p.window_starts for p in parts]).astype(np.float64)
            out.window_row = np.concatenate([p.window_row + o for p, o in zip(parts, offsets)]).astype(np.int64)
        return out


def layout(path: str | os.PathLike[str]) -> str:
    """``"parquet"`` or ``"npy"`` from the file name.

    Raises:
        StoreError: Any other extension.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".npy":
        return "npy"
    raise StoreError(f"{path}: embeddings are written as NAME.parquet or NAME.npy (+ NAME.ids.json); got {suffix or 'no extension'!r}")


def _sidecar(path: Path, what: str) -> Path:
    stem = path.name[: -len(path.suffix)]
    return path.with_name(f"{stem}.{what}")


def companions(path: str | os.PathLike[str]) -> list[Path]:
    """Every file a write of ``path`` may produce (for removal and messages)."""
    path = Path(path)
    if layout(path) == "parquet":
        return [path]
    return [path, _sidecar(path, "ids.json"), _sidecar(path, "windows.npy")]


def exists(path: str | os.PathLike[str]) -> bool:
    path = Path(path)
    return path.is_file() or (layout(path) == "npy" and _sidecar(path, "ids.json").is_file())


# ---------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_embeddings(path: str | os.PathLike[str], data: EmbeddingSet) -> None:
    """Write ``data`` to ``path`` (layout from the extension), replacing it atomically."""
    path = Path(path)
    meta = {"format": FORMAT, "version": VERSION, **data.meta, "windows": data.has_windows, "rows": len(data)}
    if layout(path) == "parquet":
        _write_parquet(path, data, meta)
    else:
        _write_npy(path, data, meta)


def _write_parquet(path: Path, data: EmbeddingSet, meta: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = data.vectors.shape[1]
    vector_type = pa.list_(pa.float32(), dim)
    columns = {
        "id": pa.array(data.ids, pa.string()),
        "path": pa.array(data.paths, pa.string()),
        "size": pa.array(data.sizes.astype(np.int64)),
        "mtime_ns": pa.array(data.mtimes.astype(np.int64)),
        "seconds": pa.array(data.seconds.astype(np.float64)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(data.vectors.astype(np.float32).reshape(-1)), dim),
    }
    if data.has_windows:
        order = np.argsort(data.window_row, kind="stable")
        counts = np.bincount(data.window_row, minlength=len(data)).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        flat = pa.FixedSizeListArray.from_arrays(pa.array(data.windows[order].astype(np.float32).reshape(-1)), dim)
        columns["window_starts"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(data.window_starts[order].astype(np.float64)))
        columns["windows"] = pa.ListArray.from_arrays(pa.array(offsets), flat, type=pa.list_(vector_type))
    table = pa.table(columns).replace_schema_metadata({"mtrun": json.dumps(meta)})
    write_atomic(path, lambda f: pq.write_table(table, f))


def _write_npy(path: Path, data: EmbeddingSet, meta: dict[str, Any]) -> None:
    rows = [
        {"id": i, "path": p, "size": int(s), "mtime_ns": int(m), "seconds": float(sec)}
        for i, p, s, m, sec in zip(data.ids, data.paths, data.sizes, data.mtimes, data.seconds)
    ]
    windows_path = _sidecar(path, "windows.npy")
    if data.has_windows:
        order = np.argsort(data.window_row, kind="stable")
        counts = np.bincount(data.window_row, minlength=len(data))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        starts = data.window_starts[order]
        for r, row in enumerate(rows):
            row["window_offset"], row["window_count"] = int(offsets[r]), int(counts[r])
            row["window_starts"] = [float(s) for s in starts[offsets[r] : offsets[r + 1]]]
        write_atomic(windows_path, lambda f: np.save(f, data.windows[order].astype(np.float32)))
        meta["windows_sha256"] = _sha256(windows_path)
    write_atomic(path, lambda f: np.save(f, data.vectors.astype(np.float32)))
    meta["npy_sha256"] = _sha256(path)
    body = json.dumps({**meta, "rows": rows}, indent=None).encode("utf-8")
    write_atomic(_sidecar(path, "ids.json"), lambda f: f.write(body))
    if not data.has_windows:
        windows_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- reading


def read_embeddings(path: str | os.PathLike[str]) -> EmbeddingSet:
    """Read an embeddings file written by :func:`write_embeddings`.

    Raises:
        StoreError: Missing, unreadable, not written by mtrun, or (``.npy``) its files come
            from different writes.
    """
    path = Path(path).expanduser()
    kind = layout(path)
    if not exists(path):
        raise StoreError(f"{path}: no such embeddings file (make one with `mtrun embed MODEL AUDIO... -o {path.name}`)")
    return _read_parquet(path) if kind == "parquet" else _read_npy(path)


def _check_meta(path: Path, meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{path}: not an embeddings file written by `mtrun embed`")
    if int(meta.get("version", 0)) > VERSION:
        raise StoreError(f"{path}: written by a newer mtrun (format version {meta.get('version')}); upgrade mtrun to read it")
    return meta


def _read_parquet(path: Path) -> EmbeddingSet:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(b"mtrun")
        meta = _check_meta(path, json.loads(raw) if raw else None)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: cannot be read as an embeddings file ({exc})") from None
    n = table.num_rows
    dim = int(meta.get("dim") or 0)
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    dim = dim or (vectors.size // n if n else 0)
    out = EmbeddingSet(
        ids=table.column("id").to_pylist(),
        paths=table.column("path").to_pylist(),
        sizes=table.column("size").to_numpy().astype(np.int64),
        mtimes=table.column("mtime_ns").to_numpy().astype(np.int64),
        seconds=table.column("seconds").to_numpy().astype(np.float64),
        vectors=vectors.reshape(n, dim),
        meta=meta,
    )
    if "windows" in table.column_names:
        lists = table.column("windows").combine_chunks()
        counts = np.asarray(lists.value_lengths().to_numpy(zero_copy_only=False), dtype=np.int64) if n else np.zeros(0, np.int64)
        flat = np.asarray(lists.flatten().flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        out.windows = flat.reshape(-1, dim)
        out.window_row = np.repeat(np.arange(n), counts).astype(np.int64)
        out.window_starts = np.asarray(
            table.column("window_starts").combine_chunks().flatten().to_numpy(zero_copy_only=False), dtype=np.float64
        )
    return out


def _read_npy(path: Path) -> EmbeddingSet:
    ids_path = _sidecar(path, "ids.json")
    try:
        meta = _check_meta(ids_path, json.loads(ids_path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise StoreError(f"{ids_path}: cannot be read ({exc})") from None
    if not path.is_file() or _sha256(path) != meta.get("npy_sha256"):
        raise StoreError(
            f"{path} does not belong to {ids_path.name} (the files come from different writes; a kill between them?). "
            "Run `mtrun embed` again with the same -o: it re-embeds what is missing"
        )
    rows = meta.pop("rows")
    vectors = np.load(path, allow_pickle=False)
    if vectors.shape[0] != len(rows):
        raise StoreError(f"{path}: {vectors.shape[0]} rows, but {ids_path.name} lists {len(rows)}")
    out = EmbeddingSet(
        ids=[r["id"] for r in rows],
        paths=[r["path"] for r in rows],
        sizes=np.asarray([r["size"] for r in rows], np.int64),
        mtimes=np.asarray([r["mtime_ns"] for r in rows], np.int64),
        seconds=np.asarray([r["seconds"] for r in rows], np.float64),
        vectors=vectors.astype(np.float32, copy=False),
        meta=meta,
    )
    if meta.get("windows"):
        windows_path = _sidecar(path, "windows.npy")
        if not windows_path.is_file() or _sha256(windows_path) != meta.get("windows_sha256"):
            raise StoreError(f"{windows_path} does not belong to {ids_path.name}; run `mtrun embed` again with the same -o")
        out.windows = np.load(windows_path, allow_pickle=False)
        out.window_row = np.repeat(np.arange(len(rows)), [r["window_count"] for r in rows]).astype(np.int64)
        out.window_starts = np.asarray([s for r in rows for s in r["window_starts"]], np.float64)
    return out
