"""The caption cache: one JSONL file of generated captions, keyed by what produced them.

A record is ``{"key", "caption", "tags", "lm"}``; ``key`` is the SHA-256 of (the language
model's identity, the prompt template and generation settings, the canonical tags). The model's
identity is computed from its folder without loading it — the folder's resolved path, the
contents of its small files (config, generation config, tokenizer) and the names, sizes and
modification times of its weight files — so re-saving or editing the model changes every key
(captions are regenerated, never taken from another model), while training processes can
compute keys cheaply.

Writers append under an exclusive ``flock`` and each line is written whole, so concurrent
``prepare`` runs and readers in DataLoader workers never see a half record (a line cut by a
crash is skipped on reading).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["CACHE_FILE", "CaptionCache", "canonical_tags", "caption_key", "default_cache_dir", "lm_identity"]

_log = logging.getLogger("mtrun.tag_to_caption")

CACHE_FILE = "captions.jsonl"
"""The file inside ``cache_dir``."""

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_SMALL = 64 * 1024 * 1024


def default_cache_dir() -> Path:
    """``$MTRUN_CACHE/captions``, else ``~/.cache/mtrun/captions``."""
    from mtrun import cache_root

    return cache_root() / "captions"


def canonical_tags(tags: Mapping[str, Iterable[Any]]) -> dict[str, list[str]]:
    """Tags with sorted categories and sorted, de-duplicated values; empty categories dropped.

    The same tag set in another order gives the same key and the same prompt.
    """
    out = {str(c): sorted({str(v) for v in values}) for c, values in tags.items()}
    return {c: out[c] for c in sorted(out) if out[c]}


def lm_identity(path: str | Path) -> str:
    """A fingerprint of a model folder, computed without loading the model (see the module docstring)."""
    root = Path(path).expanduser().resolve()
    h = hashlib.sha256(str(root).encode())
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel.startswith("."):
            continue
        stat = file.stat()
        h.update(rel.encode())
        if file.suffix in _WEIGHT_SUFFIXES or stat.st_size > _SMALL:
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            h.update(hashlib.sha256(file.read_bytes()).digest())
    return h.hexdigest()


def caption_key(identity: str, generation: Mapping[str, Any], tags: Mapping[str, list[str]]) -> str:
    """The cache key of one caption: model identity, prompt and generation settings, tags."""
    payload = json.dumps([identity, dict(generation), canonical_tags(tags)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class CaptionCache:
    """The JSONL cache file, read lazily and re-read when another process has appended to it.

    Args:
        directory: The cache folder (created on first write).
    """

    def __init__(self, directory: str | Path):
        self.path = Path(directory).expanduser() / CACHE_FILE
        self._data: dict[str, str] | None = None
        self._stamp: tuple[int, int] | None = None
        self._unsaved: dict[str, str] = {}  # generated but not written (the disk refused them)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get the path, not a copy of every caption (only those the disk refused).
        return {"path": self.path, "_data": None, "_stamp": None, "_unsaved": self._unsaved}

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_size, stat.st_mtime_ns

    def _read(self) -> None:
        data: dict[str, str] = {}
        stamp = self._file_stamp()
        if stamp is not None:
            # errors="replace": a damaged byte spoils its own line (skipped below), not the file.
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                        data[str(record["key"])] = str(record["caption"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut by a crash mid-write
        for key, caption in self._unsaved.items():
            data.setdefault(key, caption)
        self._data, self._stamp = data, stamp

    def _ends_with_newline(self) -> bool:
        """True for an empty or missing file, or one whose last byte ends a line."""
        try:
            with open(self.path, "rb") as raw:
                if raw.seek(0, os.SEEK_END) == 0:
                    return True
                raw.seek(-1, os.SEEK_END)
                return raw.read(1) == b"\n"
        except FileNotFoundError:
            return True

    def get(self, key: str, *, refresh: bool = True) -> str | None:
        """The cached caption, or None. On a miss the file is re-read if it changed since."""
        if self._data is None:
            self._read()
        assert self._data is not None
        hit = self._data.get(key)
        if hit is None and refresh and self._file_stamp() != self._stamp:
            self._read()
            hit = self._data.get(key)
        return hit

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        if self._data is None:
            self._read()
        return len(self._data or {})

    def add(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append records (``key``, ``caption``, anything else) whose key is not cached yet.

        When the file cannot be written (a full disk, a read-only folder) the captions are kept
        in memory for this process and its workers, with one warning naming the file: the run
        goes on, and a later run generates them again.

        Returns:
            How many were written.
        """
        records = list(records)
        if not records:
            return 0
        try:
            return self._append(records)
        except OSError as exc:
            fresh = {str(r["key"]): str(r["caption"]) for r in records}
            if self._data is not None:
                for key, caption in fresh.items():
                    self._data.setdefault(key, caption)  # a caption already in the file wins, as on reading
            if not self._unsaved:
                _log.warning(
                    "could not write generated captions to %s (%s: %s); they are kept in memory for "
                    "this run and will be generated again next time", self.path, type(exc).__name__, exc.strerror or exc,
                )
            self._unsaved.update(fresh)
            return 0

    def _append(self, records: list[Mapping[str, Any]]) -> int:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open(self.path, "a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self._read()  # under the lock: what other writers added
                assert self._data is not None
                lines = []
                for record in records:
                    key = str(record["key"])
                    if key in self._data:
                        continue
                    self._data[key] = str(record["caption"])
                    lines.append(json.dumps(dict(record), ensure_ascii=False) + "\n")
                written = len(lines)
                if lines and not self._ends_with_newline():  # a line cut by a crash would eat the next record
                    lines.insert(0, "\n")
                handle.seek(0, os.SEEK_END)
                handle.write("".join(lines))
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        self._stamp = self._file_stamp()
        return written
