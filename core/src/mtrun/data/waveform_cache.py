"""Decode once: a persistent cache of decoded, checked, mono waveforms at the encoder's rate.

Decoding a compressed file and resampling it costs far more than slicing a crop from an array,
and a training run decodes every file once per epoch. This cache does it once per machine: each
file becomes one ``.npy`` (float32 ``[T]``, mono, at the encoder's sample rate) under
``mtrun.cache_root() / "waveforms"``. Entries are plain ``.npy`` files that
``numpy.load(path, mmap_mode="r")`` maps; the loader reads just the crop's bytes after the
header (:meth:`Entry.read`), which costs a tenth of creating a memory map per use.

An entry's key is a hash of the file's identity (resolved path, size, mtime in ns; for a member
of a tar shard, the shard's identity and the byte range), the sample rate, the preprocessing
settings (:func:`preprocessing_settings`) and :data:`FORMAT_VERSION`: changing any of them
gives a new key, and the stale entry is simply never read again. Audio held in memory (a
tensor) is not cached. A file that fails the checks (undecodable, silent, non-finite) gets a
small ``.bad.json`` marker instead of an entry, so it is neither cached as good nor decoded
again; the loader skips it as it would without the cache.

Entries are written with :func:`mtrun.cache.write_atomic`, so concurrent runs and crashes never
leave a half-written entry. When an entry cannot be written (a full disk, a read-only folder)
the build stops with one warning naming the folder and training goes on without the cache.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from mtrun.cache import cache_root, clean_stale, entry_key, write_atomic
from mtrun.data.audio import SILENCE_THRESHOLD, AudioDecodeError, check_waveform, decode, describe_audio, resample, to_mono

__all__ = ["FOLDER", "FORMAT_VERSION", "BuildReport", "Entry", "WaveformCache", "audio_identity", "preprocessing_settings"]

FORMAT_VERSION = 1
"""Bumped when what an entry holds changes; old entries are then ignored."""

FOLDER = "waveforms"
"""The cache's folder under :func:`mtrun.cache.cache_root`."""

_log = logging.getLogger("mtrun.data")


def audio_identity(audio: Any) -> dict[str, Any] | None:
    """What identifies an audio file's content without reading it, or ``None`` (not cacheable).

    A path: resolved path, size and mtime in ns. A member of a tar shard (an object with
    ``tar``, ``offset`` and ``size``): the shard's identity and the byte range. Anything else
    (a tensor, another kind of reference) and a path that cannot be stat'ed: ``None``.
    """
    try:
        if isinstance(audio, (str, os.PathLike)):
            path = Path(audio).resolve()
            st = path.stat()
            return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        tar = getattr(audio, "tar", None)
        if isinstance(tar, (str, os.PathLike)) and hasattr(audio, "offset") and hasattr(audio, "size"):
            path = Path(tar).resolve()
            st = path.stat()
            return {"tar": str(path), "tar_size": st.st_size, "tar_mtime_ns": st.st_mtime_ns,
                    "offset": int(audio.offset), "size": int(audio.size), "member": str(getattr(audio, "member", ""))}
    except OSError:
        return None
    return None


def preprocessing_settings() -> dict[str, Any]:
    """Everything besides the file and the rate that decides an entry's samples."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torchaudio = version("torchaudio")
    except PackageNotFoundError:  # pragma: no cover - torchaudio is a dependency
        torchaudio = "absent"
    return {
        "mono": "mean of channels",
        "resampler": "torchaudio.transforms.Resample (sinc, hann, defaults)",
        "torchaudio": torchaudio,
        "checks": {"silence_threshold": SILENCE_THRESHOLD, "finite": True},
        "dtype": "float32",
    }


class Entry:
    """One cached array (a waveform ``[T]``, or frames ``[T, ...]``): its shape and where its
    rows start in the ``.npy`` file."""

    def __init__(self, path: Path, length: int, data_offset: int, row_shape: tuple[int, ...] = ()):
        self.path, self.length, self.data_offset = path, int(length), int(data_offset)
        self.row_shape = tuple(int(n) for n in row_shape)
        self.row_bytes = 4 * math.prod(self.row_shape)

    @classmethod
    def open(cls, path: Path) -> Entry:
        """Read the header of an entry.

        Raises:
            FileNotFoundError: No such entry.
            ValueError: Not a float32 C-order ``.npy`` file of at least one axis (damaged, or
                not ours).
        """
        import numpy as np

        with open(path, "rb") as f:
            parsed = _quick_header(f.read(_QUICK_HEADER_BYTES))
            if parsed is not None:
                shape, fortran, dtype, offset = parsed
            else:  # a header our quick reading does not know: numpy's own reader (~10x slower)
                f.seek(0)
                version = np.lib.format.read_magic(f)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = reader(f)
                offset = f.tell()
            size = os.fstat(f.fileno()).st_size
        if len(shape) < 1 or dtype != np.dtype("<f4") or fortran or size != offset + 4 * math.prod(shape):
            raise ValueError(f"not a complete float32 array (shape {shape}, dtype {dtype}, {size} bytes)")
        return cls(path, shape[0], offset, shape[1:])

    def read(self, start: int, count: int) -> Any:
        """Rows ``[start, start + count)`` (clipped to the entry) as a float32 array."""
        import numpy as np

        start = max(0, min(int(start), self.length))
        count = max(0, min(int(count), self.length - start))
        data = bytearray(self.row_bytes * count)  # writable: the array below shares it, no copy
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_offset + self.row_bytes * start)
            got = f.readinto(data)
        if got != len(data):  # shortened since it was opened: not by us (writes are atomic)
            raise ValueError(f"cache entry {self.path} is shorter than its header says")
        return np.frombuffer(data, dtype="<f4").reshape(count, *self.row_shape)


_QUICK_HEADER_BYTES = 256
_QUICK_HEADER = re.compile(
    r"\{'descr': '(?P<descr><f4)', 'fortran_order': (?P<fortran>False|True), 'shape': \((?P<shape>[0-9, ]*)\), \}"
)


def _quick_header(head: bytes) -> tuple[tuple[int, ...], bool, Any, int] | None:
    """``(shape, fortran, dtype, data offset)`` from the first bytes of a float32 ``.npy`` file as
    ``numpy.save`` writes it (format 1.0), or ``None`` for anything else. Entries are opened once
    per item and process, and numpy's header reader (``literal_eval``) costs ~70 µs of that."""
    import numpy as np

    if head[:8] != b"\x93NUMPY\x01\x00" or len(head) < 10:
        return None
    length = int.from_bytes(head[8:10], "little")
    if 10 + length > len(head):
        return None
    match = _QUICK_HEADER.match(head[10 : 10 + length].decode("latin1"))
    if match is None:
        return None
    shape = tuple(int(n) for n in match["shape"].replace(" ", "").split(",") if n)
    return shape, match["fortran"] == "True", np.dtype("<f4"), 10 + length


class BuildReport:
    """What a :meth:`WaveformCache.build` did: counts, and the bad files it found."""

    def __init__(self) -> None:
        self.present = 0  # entries (or markers) found already there
        self.built = 0  # entries written now
        self.bad: dict[str, AudioDecodeError] = {}  # key -> why its file is unusable
        self.failed: str | None = None  # why writing stopped (the cache is then partial)

    def __repr__(self) -> str:
        return f"BuildReport(present={self.present}, built={self.built}, bad={len(self.bad)}, failed={self.failed!r})"


class WaveformCache:
    """The waveform entries for one sample rate.

    Picklable (it crosses into DataLoader workers): it holds the folder, the settings and a
    memo from audio name to key, filled while the loader builds the cache, so a lookup during
    training costs no ``stat`` (and a file changed mid-run keeps the entry the run started with).

    A subclass stores something else computed from the waveform (the feature cache,
    :mod:`mtrun.data.feature_cache`): it sets ``KIND``, ``FOLDER``, ``NAME`` and ``WHAT``, adds
    what decides its numbers to ``settings``, and overrides :meth:`format_version` and
    :meth:`compute`.

    Args:
        sample_rate: The rate entries are stored at (the audio encoder's).
        folder: Where entries live; default ``cache_root() / "waveforms"``.
    """

    KIND = "waveform"
    FOLDER = FOLDER
    NAME = "waveform cache"
    WHAT = "waveform cache: decoding {n} files{split} once"
    """What the build's progress line says it does (``{n}``: the files to build; ``{split}``:
    `` of split 'NAME'`` or nothing)."""

    def __init__(self, sample_rate: int, *, folder: str | Path | None = None):
        self.sample_rate = int(sample_rate)
        self.folder = Path(folder) if folder is not None else cache_root() / self.FOLDER
        self.settings = preprocessing_settings()
        self._keys: dict[str, str | None] = {}
        self._entries: dict[str, Entry] = {}  # entries never change once written: headers read once
        self._warned_unreadable = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_entries": {}}  # each worker reads the headers it needs

    # ------------------------------------------------------------------ keys and paths

    def format_version(self) -> int:
        """What entries hold, as a number in their keys (:data:`FORMAT_VERSION`)."""
        return FORMAT_VERSION

    def key(self, audio: Any) -> str | None:
        """The entry key of ``audio`` (``None`` when it cannot be cached)."""
        name = describe_audio(audio)
        if name in self._keys:
            return self._keys[name]
        identity = audio_identity(audio)
        key = None if identity is None else entry_key(self.KIND, self.format_version(), identity, self.sample_rate, self.settings)
        if identity is not None:
            self._keys[name] = key
        return key

    def keys_for(self, audios: Iterable[Any]) -> list[str | None]:
        return [self.key(a) for a in audios]

    def entry_path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def marker_path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.bad.json"

    def has(self, key: str) -> bool:
        """Whether an entry or a bad-file marker exists for ``key`` (no, when the folder cannot
        be looked into: the write that follows then reports why)."""
        try:
            return self.entry_path(key).is_file() or self.marker_path(key).is_file()
        except OSError:
            return False

    # ------------------------------------------------------------------ reading

    def lookup(self, audio: Any) -> Entry | None:
        """The cached waveform of ``audio``, or ``None`` when it is not cached (not cacheable,
        not built, or the entry is unreadable).

        Raises:
            AudioDecodeError: The build found the file unusable (its marker's reason).
        """
        key = self.key(audio)
        if key is None:
            return None
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        try:
            entry = self._entries[key] = Entry.open(self.entry_path(key))
            return entry
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # damaged on disk: decode the file instead
            if isinstance(exc, ValueError):
                # Not a whole entry (writes are atomic: disk damage, or not ours). Removed, so the
                # next build makes it again instead of every epoch decoding this file.
                with contextlib.suppress(OSError):
                    self.entry_path(key).unlink()
            if not self._warned_unreadable:
                self._warned_unreadable = True
                _log.warning("%s entry %s is unreadable (%s); decoding the file instead", self.NAME, self.entry_path(key), exc)
            return None
        try:
            record = json.loads(self.marker_path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        raise AudioDecodeError(record["reason"], kind=record.get("kind", "corrupt"), path=record.get("path"))

    def forget(self, audio: Any, reason: Any) -> None:
        """Drop the remembered entry of ``audio`` after reading it failed (the next lookup looks
        again), with one warning per process."""
        key = self.key(audio)
        if key is not None:
            self._entries.pop(key, None)
        if not self._warned_unreadable:
            self._warned_unreadable = True
            _log.warning("%s entry of %s is unreadable (%s); decoding the file instead", self.NAME, describe_audio(audio), reason)

    # ------------------------------------------------------------------ building

    def build(
        self,
        audios: Sequence[Any],
        *,
        workers: int = 0,
        order_start: int = 0,
        progress: Callable[[int], Any] | None = None,
    ) -> BuildReport:
        """Make the entries of ``audios`` that are missing (each written whole or not at all).

        Args:
            audios: Paths or references (tensors are left out); duplicates are built once.
            workers: Processes that decode in parallel; 0 or 1 decodes in this process.
            order_start: Where in the list of missing entries to start (each DDP rank starts
                at its own share, so ranks building at once rarely decode the same file).
            progress: ``progress(total)`` is called once with the number of entries to build
                and returns a function called once per finished entry (or ``None``).

        Returns:
            The counts, the bad files (by key) and, when a write failed, the reason.
        """
        report = BuildReport()
        todo: dict[str, Any] = {}
        for audio in audios:
            key = self.key(audio)
            if key is None or key in todo:
                continue
            if self.has(key):
                report.present += 1
                self._note_marker(key, report)
            else:
                todo[key] = audio
        if not todo:
            return report
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            clean_stale(self.folder)
        except OSError as exc:
            report.failed = f"{exc.strerror or exc}"
            return report
        items = list(todo.items())
        if order_start:
            k = order_start % len(items)
            items = items[k:] + items[:k]
        results: Iterable[tuple[str, str, Any]]
        pool = None
        if workers > 1 and len(items) > 1:
            import multiprocessing

            # Workers get a copy without the key memo (it can hold a whole corpus' names). They
            # are forked before the progress bar starts its refresh thread.
            light = copy.copy(self)
            light._keys, light._entries = {}, {}
            pool = multiprocessing.get_context("fork").Pool(min(workers, len(items)), initializer=_worker_init, initargs=(light,))
            results = pool.imap_unordered(_build_one, items, chunksize=max(1, min(16, len(items) // (4 * workers))))
        else:
            results = ((key, *self.make_entry(key, audio)) for key, audio in items)
        advance = progress(len(items)) if progress is not None else None
        try:
            for key, status, detail in results:
                if status == "built":
                    report.built += 1
                elif status == "present":
                    report.present += 1
                    self._note_marker(key, report)
                elif status == "bad":
                    report.bad[key] = detail
                else:  # "failed": the folder cannot take more; stop, the rest stays uncached
                    report.failed = detail
                    break
                if advance is not None:
                    advance()
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        return report

    def _note_marker(self, key: str, report: BuildReport) -> None:
        """Count a file found bad by an earlier build (its marker) among this build's bad files."""
        try:
            record = json.loads(self.marker_path(key).read_text(encoding="utf-8"))
            report.bad[key] = AudioDecodeError(record["reason"], kind=record.get("kind", "corrupt"), path=record.get("path"))
        except (OSError, ValueError, KeyError):  # no marker (a good entry), or an unreadable one
            pass

    def compute(self, waveform: Any) -> Any:
        """The entry's array for a checked mono waveform at ``sample_rate``: the waveform itself."""
        import numpy as np

        return np.ascontiguousarray(waveform.numpy(), dtype=np.float32)

    def make_entry(self, key: str, audio: Any) -> tuple[str, Any]:
        """Decode, check, mix and resample one file and write its entry (or its marker).

        Returns:
            ``("present", None)`` when another process wrote it meanwhile, ``("built", None)``,
            ``("bad", error)`` for an unusable file, or ``("failed", reason)`` when writing
            failed (nothing is left behind).
        """
        import numpy as np

        if self.has(key):
            return "present", None
        name = describe_audio(audio)
        try:
            wave, rate = decode(audio)
            mono = to_mono(wave)
            check_waveform(mono, f"audio file {name!r}")
            array = self.compute(resample(mono, rate, self.sample_rate))
        except AudioDecodeError as error:
            if error.kind in ("missing", "unreadable"):  # about access, not content: not remembered
                return "bad", error
            record = {"reason": str(error), "kind": error.kind, "path": error.path or name, "format": self.format_version()}
            payload = json.dumps(record, ensure_ascii=False).encode("utf-8")
            failed = self._write(self.marker_path(key), lambda f: f.write(payload))
            return ("failed", failed) if failed else ("bad", error)
        failed = self._write(self.entry_path(key), lambda f: np.save(f, array, allow_pickle=False))
        return ("failed", failed) if failed else ("built", None)

    def _write(self, path: Path, write: Callable[[Any], Any]) -> str | None:
        """Write atomically; the reason as text when the disk or the folder refuses."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, write)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG):
                return f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno, exc.errno)})"
            return f"{exc.strerror or exc}"
        return None


_worker_cache: WaveformCache | None = None


def _worker_init(cache: WaveformCache) -> None:
    import torch

    global _worker_cache
    _worker_cache = cache
    torch.set_num_threads(1)  # one decode per process; several threads each would oversubscribe


def _build_one(job: tuple[str, Any]) -> tuple[str, str, Any]:
    key, audio = job
    assert _worker_cache is not None
    status, detail = _worker_cache.make_entry(key, audio)
    return key, status, detail
