"""``mtrun embed MODEL INPUT... -o OUT``: embed a music library, resumably.

Inputs are audio files, folders (searched recursively for :data:`AUDIO_EXTENSIONS`, hidden
files and folders skipped) and manifests (a CSV/TSV/JSONL/JSON/Parquet table with an ``audio``
column, relative to ``--audio-root`` or the manifest's folder, and optionally ``id`` and
``split``). A recording's id is the manifest's ``id``, else its absolute path.

Decoding runs in ``--workers`` processes (a ``torch.utils.data.DataLoader`` over the files;
each worker streams its files window by window, so memory stays bounded by the window size);
the main process encodes windows in fixed-shape batches (:class:`~mtrun.inference.model.
WindowBatcher`).

**Resuming.** A file is identified by its absolute path, size and modification time. Rows
finished since the last complete output are written, one small file per encoder batch, into
the hidden work folder ``.OUT.parts/`` beside the output (each file written to a temporary name
and renamed). At the end the existing output and the parts are merged into a new output, which
is renamed into place, and the work folder is removed. A re-run skips every file whose
identity is already in the output or the work folder, so a kill loses at most the batch being
encoded, and the output itself is never half-written. A file that changed since (other size or
time) is embedded again and its row replaced. Files that cannot be decoded are listed with the
reason on the console and in ``OUT.skipped.jsonl``, and are tried again by the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs
import numpy as np

from mtrun.errors import MtrunError

__all__ = ["AUDIO_EXTENSIONS", "EmbedSummary", "Entry", "collect_inputs", "configure", "embed_library", "run"]

AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".m4a", ".aac", ".wma", ".caf", ".w64"}
)
"""Extensions a folder is searched for (case-insensitive)."""

TABLE_EXTENSIONS = frozenset({".csv", ".tsv", ".jsonl", ".json", ".parquet"})
"""Extensions of manifest inputs."""


class EmbedError(MtrunError):
    """``mtrun embed`` cannot run as asked; the message names the file or folder."""

    exit_code = 2


@attrs.frozen
class Entry:
    """One recording to embed: its id and absolute path."""

    id: str
    path: str


@attrs.define
class EmbedSummary:
    """What one ``mtrun embed`` run did.

    Attributes:
        out: The output file.
        embedded: Files embedded in this run.
        up_to_date: Files skipped because the output already held them unchanged.
        skipped: ``[{"id", "path", "kind", "reason"}]`` files that could not be embedded.
        rows: Rows in the output now.
    """

    out: Path
    embedded: int = 0
    up_to_date: int = 0
    skipped: list[dict[str, str]] = attrs.field(factory=list)
    rows: int = 0


# ------------------------------------------------------------------------------- inputs


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in AUDIO_EXTENSIONS:
                yield Path(root) / name


def _manifest(path: Path, split: str | None, audio_root: Path | None) -> list[Entry]:
    from mtrun.data.sources.manifest import read_table

    rows = read_table(path)
    if rows and "audio" not in rows[0]:
        raise EmbedError(f"{path}: a manifest needs an 'audio' column (it has: {', '.join(rows[0]) or 'none'})")
    root = audio_root or path.parent
    entries = []
    for row in rows:
        if split is not None and str(row.get("split", "")) != split:
            continue
        audio = Path(str(row["audio"])).expanduser()
        full = str((audio if audio.is_absolute() else root / audio).absolute())
        entries.append(Entry(str(row.get("id") or full), full))
    return entries


def collect_inputs(inputs: Sequence[str | os.PathLike[str]], *, split: str | None = None, audio_root: str | None = None) -> list[Entry]:
    """The recordings named by files, folders and manifests, each once (first mention wins).

    Raises:
        EmbedError: An input does not exist, or two different files share an id.
    """
    root = Path(audio_root).expanduser() if audio_root else None
    entries: list[Entry] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = [Entry(str(p.absolute()), str(p.absolute())) for p in _walk(path)]
            if not found:
                raise EmbedError(f"mtrun embed: {item}: the folder holds no audio files "
                                 f"(looked for {', '.join(sorted(AUDIO_EXTENSIONS))}, in subfolders too)")
            entries += found
        elif path.is_file() and path.suffix.lower() in TABLE_EXTENSIONS:
            entries += _manifest(path, split, root)
        elif path.is_file():
            entries.append(Entry(str(path.absolute()), str(path.absolute())))
        else:
            raise EmbedError(f"mtrun embed: {item}: no such file or folder")
    seen: dict[str, Entry] = {}
    ids: dict[str, str] = {}
    clashes = []
    for entry in entries:
        if entry.path in seen:
            continue
        if entry.id in ids and ids[entry.id] != entry.path:
            clashes.append(f"{entry.id!r}: {ids[entry.id]} and {entry.path}")
            continue
        seen[entry.path] = entry
        ids[entry.id] = entry.path
    if clashes:
        shown = "; ".join(clashes[:5]) + (f"; and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        raise EmbedError(f"mtrun embed: two files share an id: {shown}")
    return list(seen.values())


# --------------------------------------------------------------------------- decoding


def _events(files: list[tuple[int, str]], rate: int, length: int, hop: int, workers: int) -> Iterator[tuple]:
    """Decode events for ``files`` (see :class:`mtrun.inference.decode.DecodeFiles`), from
    ``workers`` processes, or this one when ``workers`` is 0."""
    from mtrun.inference.decode import DecodeFiles, worker_init

    source = DecodeFiles(files, rate, length, hop)
    if workers <= 0 or len(files) <= 1:
        yield from source
        return
    import torch

    loader = torch.utils.data.DataLoader(
        source, batch_size=None, num_workers=min(workers, len(files)), worker_init_fn=worker_init, prefetch_factor=4
    )
    yield from loader


# ------------------------------------------------------------------------------ parts


def _work_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.parts")


def _write_part(folder: Path, seq: int, rows: list[tuple[Entry, os.stat_result, Any]], windows: bool) -> None:
    from mtrun.cache import write_atomic

    vectors = np.stack([emb.vector for _, _, emb in rows]).astype(np.float32)
    arrays: dict[str, Any] = {
        "vectors": vectors,
        "sizes": np.asarray([st.st_size for _, st, _ in rows], np.int64),
        "mtimes": np.asarray([st.st_mtime_ns for _, st, _ in rows], np.int64),
        "seconds": np.asarray([emb.seconds for _, _, emb in rows], np.float64),
        "names": np.asarray(json.dumps([[e.id, e.path] for e, _, _ in rows])),
    }
    if windows:
        arrays["windows"] = np.concatenate([emb.windows for _, _, emb in rows]).astype(np.float32)
        arrays["window_starts"] = np.concatenate([emb.starts for _, _, emb in rows]).astype(np.float64)
        arrays["window_row"] = np.repeat(np.arange(len(rows)), [len(emb.windows) for _, _, emb in rows]).astype(np.int64)
    write_atomic(folder / f"part-{seq:08d}.npz", lambda f: np.savez(f, **arrays))


def _read_parts(folder: Path, dim: int, windows: bool, meta: dict[str, Any]) -> list[Any]:
    from mtrun.inference.store import EmbeddingSet

    parts = []
    for path in sorted(folder.glob("part-*.npz")):
        try:
            with np.load(path, allow_pickle=False) as z:
                names = json.loads(str(z["names"]))
                part = EmbeddingSet(
                    ids=[n[0] for n in names],
                    paths=[n[1] for n in names],
                    sizes=z["sizes"],
                    mtimes=z["mtimes"],
                    seconds=z["seconds"],
                    vectors=z["vectors"].reshape(-1, dim),
                    meta=meta,
                )
                if windows:
                    part.windows, part.window_starts, part.window_row = z["windows"], z["window_starts"], z["window_row"]
        except (OSError, ValueError, KeyError) as exc:  # renamed into place complete, so only outside damage
            print(f"WARNING: ignoring unreadable work file {path} ({exc}); its files are embedded again", file=sys.stderr)
            continue
        parts.append(part)
    return parts


def _compatible(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why embeddings written with ``old`` settings cannot be mixed with ``new`` ones."""
    if old.get("fingerprint") != new.get("fingerprint"):
        return f"another model (weights sha256 {str(old.get('fingerprint'))[:12]}…, from {old.get('model')})"
    for key in ("clip_seconds", "hop_seconds", "windows"):
        if old.get(key) != new.get(key):
            return f"other settings ({key} = {old.get(key)}, now {new.get(key)})"
    return None


def _merge(existing: Any, parts: list[Any], dim: int, windows: bool, meta: dict[str, Any]) -> Any:
    """Existing rows, then the parts; a path embedded again replaces its earlier row."""
    from mtrun.inference.store import EmbeddingSet

    joined = EmbeddingSet.concat(([existing] if existing is not None else []) + parts, dim, windows=windows, meta=meta)
    last: dict[str, int] = {}
    for row, path in enumerate(joined.paths):
        last[path] = row
    keep = sorted(last.values())
    return joined if len(keep) == len(joined) else joined.select(keep)


# ------------------------------------------------------------------------------- progress


class _Progress:
    """A rich bar on a terminal (stderr), else a plain line every tenth of the work."""

    def __init__(self, total: int, stream: Any = None):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self._bar = self._task = None
        self._next_line = max(1, total // 10)
        self._start = time.perf_counter()
        if total and self.stream.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            from mtrun.console import make_console

            self._bar = Progress(
                TextColumn("[bold]embed"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                console=make_console(file=self.stream),
            )
            self._task = self._bar.add_task("embed", total=total)
            self._bar.start()

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        elif self.done % self._next_line == 0 or self.done == self.total:
            rate = self.done / max(time.perf_counter() - self._start, 1e-9)
            print(f"embed: {self.done}/{self.total} files ({rate:.1f} files/s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ---------------------------------------------------------------------------------- main


def embed_library(
    model: Any,
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    workers: int = 2,
    windows: bool = False,
    split: str | None = None,
    audio_root: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    registry: Any = None,
    device: str | None = "auto",
    batch_size: int | None = None,
    clip_seconds: float | None = None,
    hop_seconds: float | None = None,
) -> EmbedSummary:
    """Embed every recording the inputs name into ``out`` (see the module docstring).

    Args:
        model: A loaded :class:`~mtrun.inference.model.Model`, or a path :func:`mtrun.load` accepts.
        inputs: Audio files, folders and manifests.
        out: ``NAME.parquet`` or ``NAME.npy``.
        workers: Decoding processes (0 = decode in this process).
        windows: Keep every window's vector (for "where in the track" search).
        split: With manifests: only rows of this split.
        audio_root: With manifests: the folder their relative ``audio`` paths start from.
        overwrite: Start afresh even if ``out`` holds embeddings of another model or settings.
        progress: Show progress on stderr.

    Returns:
        An :class:`EmbedSummary`.
    """
    from mtrun.inference import store
    from mtrun.inference.model import DEFAULT_BATCH_SIZE, WindowBatcher, load

    out = Path(out).expanduser()
    store.layout(out)  # a wrong extension fails before any work
    entries = collect_inputs(inputs, split=split, audio_root=audio_root)
    if not hasattr(model, "embed_audio"):
        model = load(
            model, device=device, batch_size=batch_size or DEFAULT_BATCH_SIZE, clip_seconds=clip_seconds,
            hop_seconds=hop_seconds, registry=registry,
        )
    try:  # indexes/library.parquet: make indexes/, as mkdir -p would (once the model loaded: no empty folder)
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbedError(f"mtrun embed: cannot make the folder of {out} ({exc.strerror or exc})") from None
    settings = {**model.info(), "windows": bool(windows)}
    dim = model.dim
    work = _work_dir(out)

    existing = None
    if store.exists(out) and not overwrite:
        try:
            existing = store.read_embeddings(out)
        except store.StoreError as exc:
            print(f"WARNING: {exc}; starting {out} afresh", file=sys.stderr)
        if existing is not None and (why := _compatible(existing.meta, settings)):
            raise EmbedError(f"mtrun embed: {out} holds embeddings from {why}; write to another file, or pass --overwrite to replace it")
    meta_path = work / "meta.json"
    if work.is_dir():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        why = _compatible(old, settings) if old is not None else "an unreadable work folder"
        if overwrite or why:
            if why and not overwrite and old is not None:
                raise EmbedError(f"mtrun embed: {work} holds unfinished work from {why}; pass --overwrite to discard it")
            import shutil

            shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    if not meta_path.is_file():
        from mtrun.cache import write_atomic

        write_atomic(meta_path, lambda f: f.write(json.dumps(settings).encode()))
    parts = _read_parts(work, dim, windows, settings)
    seq = 1 + max((int(p.stem.split("-")[1]) for p in work.glob("part-*.npz")), default=0)

    done: set[tuple[str, int, int]] = set()
    for table in ([existing] if existing is not None else []) + parts:
        done.update(zip(table.paths, table.sizes.tolist(), table.mtimes.tolist()))
    summary = EmbedSummary(out=out)
    todo: list[tuple[Entry, os.stat_result]] = []
    for entry in entries:
        try:
            st = os.stat(entry.path)
        except OSError as exc:
            kind = "missing" if isinstance(exc, FileNotFoundError) else "unreadable"
            summary.skipped.append({"id": entry.id, "path": entry.path, "kind": kind, "reason": f"audio file {entry.path!r}: {exc.strerror or exc}"})
            continue
        if (entry.path, st.st_size, st.st_mtime_ns) in done:
            summary.up_to_date += 1
        else:
            todo.append((entry, st))

    bar = _Progress(len(todo)) if progress else None
    batcher = WindowBatcher(model, keep_windows=windows)
    finished: list[tuple[Entry, os.stat_result, Any]] = []

    def collect() -> None:
        nonlocal seq
        complete = batcher.pop_complete()
        for index, emb in complete:
            entry, st = todo[index]
            finished.append((entry, st, emb))
            if bar:
                bar.advance()
        if complete:
            _write_part(work, seq, finished, windows)
            summary.embedded += len(finished)
            finished.clear()
            seq += 1

    try:
        files = [(i, entry.path) for i, (entry, _) in enumerate(todo)]
        for event in _events(files, model.sample_rate, model.window_samples, model.hop_samples, workers):
            kind, index = int(event[0]), int(event[1])
            if kind == 0:
                batcher.add(index, int(event[2]), event[3])
            elif kind == 1:
                batcher.finish(index, int(event[2]))
            else:
                batcher.drop(index)
                entry = todo[index][0]
                summary.skipped.append({"id": entry.id, "path": entry.path, "kind": str(event[2]), "reason": str(event[3])})
                if bar:
                    bar.advance()
            collect()
        batcher.flush()
        collect()
    finally:
        if bar:
            bar.close()

    parts = _read_parts(work, dim, windows, settings)  # the earlier runs' and this one's
    merged = _merge(existing, parts, dim, windows, {**settings, "skipped": summary.skipped})
    store.write_embeddings(out, merged)
    _write_skipped(out, summary.skipped)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    summary.rows = len(merged)
    return summary


def _write_skipped(out: Path, skipped: list[dict[str, str]]) -> None:
    from mtrun.cache import write_atomic

    path = out.with_name(out.name + ".skipped.jsonl")
    if not skipped:
        path.unlink(missing_ok=True)
        return
    write_atomic(path, lambda f: f.write("".join(json.dumps(s) + "\n" for s in skipped).encode("utf-8")))


# ------------------------------------------------------------------------------------ CLI


def _number(kind: type, *, least: float, strict: bool) -> Any:
    """An argparse ``type`` that parses ``kind`` and refuses values below ``least`` (or equal, if strict)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > least if strict else value >= least):
            raise argparse.ArgumentTypeError(f"must be {'more than' if strict else 'at least'} {least:g} (got {text})")
        return value

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare ``mtrun embed``'s arguments."""
    parser.description = (
        "Embed audio files, folders (recursively) and manifests with a trained model. Resumable: "
        "run it again with the same -o after a stop and only what is missing is embedded."
    )
    parser.add_argument("model", metavar="MODEL", help="a run folder, a checkpoint folder or an exported model")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files, folders, or manifests (CSV/TSV/JSONL/JSON/Parquet with an 'audio' column)")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="NAME.parquet, or NAME.npy (+ NAME.ids.json)")
    parser.add_argument("--workers", type=_number(int, least=0, strict=False), default=2, help="decoding processes (default 2; 0 = decode in the main process)")
    parser.add_argument("--windows", action="store_true", help="also keep every window's vector (for `mtrun search --windows`)")
    parser.add_argument("--split", help="manifests: only rows of this split")
    parser.add_argument("--audio-root", metavar="DIR", help="manifests: folder their relative audio paths start from (default: the manifest's folder)")
    parser.add_argument("--batch-size", type=_number(int, least=0, strict=True), default=None, help="windows per encoder call (default 16)")
    parser.add_argument("--clip-seconds", type=_number(float, least=0, strict=True), default=None, help="window length (default: what the model was trained on)")
    parser.add_argument("--hop-seconds", type=_number(float, least=0, strict=True), default=None, help="hop between windows (default: half a window)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--threads", type=_number(int, least=0, strict=False), default=0, help="PyTorch threads for the model (0 = PyTorch's default)")
    parser.add_argument("--overwrite", action="store_true", help="replace an output made by another model or with other settings")


def run(args: argparse.Namespace) -> int:
    """Handle ``mtrun embed``; returns the exit status."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    summary = embed_library(
        args.model, args.inputs, args.out, workers=args.workers, windows=args.windows, split=args.split,
        audio_root=args.audio_root, overwrite=args.overwrite, device=args.device, batch_size=args.batch_size,
        clip_seconds=args.clip_seconds, hop_seconds=args.hop_seconds,
    )
    from rich.markup import escape

    from mtrun.console import make_console

    console = make_console()
    console.print(
        f"embedded {summary.embedded} file(s), {summary.up_to_date} already embedded, "
        f"{len(summary.skipped)} skipped; {summary.rows} row(s) in {escape(str(summary.out))}"
    )
    for s in summary.skipped[:50]:
        console.print(f"  skipped ({escape(s['kind'])}): {escape(s['reason'])}")
    if len(summary.skipped) > 50:
        console.print(f"  ... and {len(summary.skipped) - 50} more")
    if summary.skipped:
        console.print(f"the skipped files and reasons are listed in {escape(str(summary.out))}.skipped.jsonl")
    return 0
