"""Building the demo corpus: pieces → renders → FLAC clips + manifest, cached and atomic.

Every piece is rendered ``renders_per_piece`` times, each time with a different instrument and
a tempo from a different bucket (slow/medium/fast), so neither factor can be read off the piece:
a model must listen to timbre and speed. Splits are drawn per piece (``group`` = piece id), per
collection, 80/10/10, so no composition is heard in two splits and every split holds every
collection.

The corpus is a pure function of :class:`DemoSettings`, the music21 version and the renderer;
their hash names the cache folder ``$MTRUN_CACHE/demo-<hash>`` (default ``~/.cache/mtrun``).
A build writes into a temporary sibling folder and renames it into place at the end, so an
interrupted build never leaves a folder that looks complete.

Audio is stored as 16 kHz mono 16-bit FLAC: the GM soundfont's samples carry little above
8 kHz, 16 kHz is the rate of the common audio front ends (AST/HTS-AT fbanks, CLAP-style
encoders resample to it anyway), and FLAC is lossless at about half the size of WAV.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

from mtrun import MtrunError, cache_root
from mtrun_demo.captions import make_captions
from mtrun_demo.render import INSTRUMENTS, available_renderer, render_clip, schedule_notes, soundfont_path
from mtrun_demo.scores import COLLECTIONS, PieceRef, analyse_piece, select_pieces

__all__ = ["BUILD_VERSION", "TEMPO_BUCKETS", "DemoSettings", "build_corpus", "cache_root", "corpus_dir"]

BUILD_VERSION = 2
"""Bump when the build's output changes for the same settings (part of the cache key)."""

TEMPO_BUCKETS: dict[str, tuple[int, ...]] = {
    "slow": (56, 64, 72),
    "medium": (88, 96, 104),
    "fast": (120, 132, 144),
}
"""Rendering tempi in beats per minute, the beat being the metre's (a dotted quarter in 6/8, a
half note in 2/2). The gaps between buckets keep "slow"/"medium"/"fast" unambiguous."""


@attrs.frozen
class DemoSettings:
    """Everything that determines the corpus' content (hashed into the cache key).

    Attributes:
        seed: Picks pieces, splits, instruments, tempi and captions.
        scale: Multiplies each collection's piece cap (tests build with ~0.05).
        renders_per_piece: Clips per piece, each with another instrument and tempo bucket.
        clip_seconds: Length of every clip.
        sample_rate: Rate of the stored audio.
        captions_min: Fewest captions per item.
        captions_max: Most captions per item.
        val_fraction: Share of each collection's pieces in ``val``.
        test_fraction: Share in ``test``.
    """

    seed: int = 0
    scale: float = 1.0
    renders_per_piece: int = 2
    clip_seconds: float = 10.0
    sample_rate: int = 16000
    captions_min: int = 3
    captions_max: int = 5
    val_fraction: float = 0.1
    test_fraction: float = 0.1


_NOT_HASHED = ("workers", "timeout_s")


def _fingerprint(settings: DemoSettings, renderer: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        m21 = version("music21")
    except PackageNotFoundError:
        m21 = "unknown"
    return {
        "build_version": BUILD_VERSION,
        "settings": attrs.asdict(settings),
        "music21": m21,
        "renderer": renderer,
        "soundfont": soundfont_path().name if renderer == "tinysoundfont" else None,
    }


def corpus_dir(settings: DemoSettings, *, root: Path | None = None, renderer: str | None = None) -> Path:
    """The cache folder of a corpus built with ``settings`` (it may not exist yet)."""
    renderer = renderer or available_renderer()
    blob = json.dumps(_fingerprint(settings, renderer), sort_keys=True).encode()
    return (root or cache_root()) / f"demo-{hashlib.sha256(blob).hexdigest()[:12]}"


def _rng(*parts: Any) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big"))


def _assign_splits(refs: list[PieceRef], settings: DemoSettings) -> dict[str, str]:
    """Piece id → split, drawn per collection so every split holds every collection."""
    out: dict[str, str] = {}
    by_collection: dict[str, list[str]] = {}
    for ref in refs:
        by_collection.setdefault(ref.collection, []).append(ref.id)
    for collection, ids in sorted(by_collection.items()):
        ids = sorted(ids)
        _rng(settings.seed, "split", collection).shuffle(ids)
        n_test = round(len(ids) * settings.test_fraction)
        n_val = round(len(ids) * settings.val_fraction)
        for i, piece_id in enumerate(ids):
            out[piece_id] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def _plan_renders(ref: PieceRef, polyphonic: bool, settings: DemoSettings) -> list[tuple[Any, str, int]]:
    """``(instrument, tempo bucket, bpm)`` per render: distinct instruments, distinct buckets."""
    rng = _rng(settings.seed, "render", ref.id)
    eligible = [i for i in INSTRUMENTS if i.polyphonic or not polyphonic]
    instruments = rng.sample(eligible, min(settings.renders_per_piece, len(eligible)))
    buckets = list(TEMPO_BUCKETS)
    rng.shuffle(buckets)
    plan = []
    for k, instrument in enumerate(instruments):
        bucket = buckets[k % len(buckets)]
        plan.append((instrument, bucket, rng.choice(TEMPO_BUCKETS[bucket])))
    return plan


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):  # pragma: no cover - only runs when a piece hangs
    raise _Timeout()


def render_piece(
    ref: PieceRef, split: str, settings: DemoSettings, out_dir: str, renderer: str, timeout_s: float
) -> tuple[list[dict[str, Any]], dict[str, str] | None]:
    """Analyse one piece and write its clips; returns manifest rows or a skip reason.

    Runs in a worker process. A wall-clock alarm bounds parsing + rendering: music21 and the
    synthesizer are both pure computation that a ``SIGALRM`` interrupts.
    """
    import numpy as np
    import soundfile

    use_alarm = hasattr(signal, "setitimer")
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        piece = analyse_piece(ref)
        rows = []
        for k, (instrument, bucket, bpm) in enumerate(_plan_renders(ref, piece.polyphonic, settings)):
            seconds_per_ql = 60.0 / (bpm * piece.beat_ql)
            events = schedule_notes(
                piece.notes,
                length_ql=piece.length_ql,
                seconds_per_ql=seconds_per_ql,
                clip_seconds=settings.clip_seconds,
                transpose=instrument.transpose,
            )
            wave = render_clip(
                events, instrument, clip_seconds=settings.clip_seconds,
                sample_rate=settings.sample_rate, renderer=renderer,
            )
            if not np.isfinite(wave).all() or float(np.abs(wave).max()) == 0.0:
                raise ValueError("render is silent or not finite")
            item_id = f"{ref.id}-r{k}"
            rel = f"audio/{ref.collection}/{item_id}.flac"
            path = Path(out_dir) / rel
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                soundfile.write(str(path), wave, settings.sample_rate, subtype="PCM_16", format="FLAC")
            except Exception as exc:  # noqa: BLE001 - soundfile wraps OS errors in its own type
                # The machine's fault, not the score's: stop the build rather than cache a
                # corpus silently missing every piece written after the disk filled up.
                return [], {"piece": ref.id, "path": ref.path, "reason": f"{type(exc).__name__}: {exc}", "write_error": str(path)}
            rows.append(_row(ref, piece, split, item_id, rel, instrument, bucket, bpm, renderer, settings))
        return rows, None
    except _Timeout:
        return [], {"piece": ref.id, "path": ref.path, "reason": f"timed out after {timeout_s:g} s"}
    except Exception as exc:  # noqa: BLE001 - any failure of one score skips that score only
        return [], {"piece": ref.id, "path": ref.path, "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _row(ref, piece, split, item_id, rel, instrument, bucket, bpm, renderer, settings) -> dict[str, Any]:
    labels = ref.labels
    key = f"{piece.tonic} {piece.mode}"
    tags: dict[str, list[str]] = {
        "genre": [labels["genre"]],
        "instrument": [instrument.name],
        "tempo": [bucket],
        "key": [key],
        "mode": [piece.mode],
        "metre": [piece.metre],
        "collection": [COLLECTIONS[ref.collection]["title"]],
    }
    if labels.get("region"):
        tags["region"] = [labels["region"]]
    if labels.get("composer"):
        tags["composer"] = [labels["composer"]]
    extra = {"bpm": bpm, "instrument_synonyms": instrument.synonyms, "solo": not piece.polyphonic}
    rng = _rng(settings.seed, "captions", item_id)
    count = rng.randint(settings.captions_min, settings.captions_max)
    captions = make_captions(tags, extra, seed=rng.getrandbits(32), count=count)
    return {
        "id": item_id,
        "audio": rel,
        "captions": captions,
        "tags": tags,
        "split": split,
        "group": ref.id,
        "bpm": bpm,
        "gm_program": instrument.program,
        "transpose": instrument.transpose,
        "title": piece.title,
        "source": f"music21 corpus: {ref.path}",
        "key_source": piece.key_source,
        "notes_per_beat": round(piece.notes_per_beat, 3),
        "polyphonic": piece.polyphonic,
        "licence": piece.licence,
        "renderer": renderer,
        "sample_rate": settings.sample_rate,
        "seconds": settings.clip_seconds,
    }


def _render_star(args):
    return render_piece(*args)


def _warm_up() -> None:
    """Import what every piece needs (run once per worker, overlapping the parent's selection)."""
    import music21.converter  # noqa: F401
    import soundfile  # noqa: F401
    import torchaudio.functional  # noqa: F401


def build_corpus(
    settings: DemoSettings | None = None,
    *,
    root: Path | None = None,
    force: bool = False,
    workers: int = 2,
    timeout_s: float = 60.0,
    renderer: str | None = None,
) -> Path:
    """Build (or find in the cache) the corpus for ``settings``; returns its folder.

    Args:
        settings: What to build (defaults: the full corpus).
        root: Cache folder (default :func:`cache_root`).
        force: Rebuild even when the cached corpus exists.
        workers: Processes rendering in parallel (music21 parsing is the slow part).
        timeout_s: Wall-clock limit per piece (parse + all its renders).
        renderer: ``tinysoundfont`` or ``additive`` (default: the best available).
    """
    settings = settings or DemoSettings()
    renderer = renderer or available_renderer()
    target = corpus_dir(settings, root=root, renderer=renderer)
    if target.is_dir() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            pool = None
            if workers > 1:
                # spawn, not fork: the parent may hold torch/OpenMP threads that a fork would
                # copy in a locked state. The workers start importing music21/torch now, while
                # this process reads the collections' headers.
                context = multiprocessing.get_context("spawn")
                pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(workers, mp_context=context))
                warm = [pool.submit(_warm_up) for _ in range(workers)]
            refs = select_pieces(seed=settings.seed, scale=settings.scale)
            splits = _assign_splits(refs, settings)
            jobs = [(ref, splits[ref.id], settings, str(tmp), renderer, timeout_s) for ref in refs]
            # Whole-file scores (MusicXML/Humdrum: several times slower to parse than one ABC
            # tune) go first so that no slow piece is left running alone at the end.
            order = sorted(range(len(jobs)), key=lambda i: (refs[i].abc is not None, i))
            ordered = [jobs[i] for i in order]
            with _build_progress(target, len(jobs)) as advance:
                if pool is not None:
                    concurrent.futures.wait(warm)
                    rendered = pool.map(_render_star, ordered, chunksize=4)
                else:
                    rendered = map(_render_star, ordered)
                done = []
                for result in rendered:
                    done.append(result)
                    advance()
            results: list[Any] = [None] * len(jobs)
            for i, result in zip(order, done):
                results[i] = result
        rows = sorted((row for rs, _ in results for row in rs), key=lambda r: r["id"])
        skipped = [skip for _, skip in results if skip is not None]
        _stop_on_write_errors(skipped, target, tmp)
        if not rows:  # never cache an empty corpus: it would be reused as if it were complete
            reasons = "; ".join(f"{s['piece']}: {s['reason']}" for s in skipped[:3])
            raise MtrunError(f"demo corpus build made no clips: every piece failed (first reasons: {reasons})")
        seconds = time.perf_counter() - started
        try:
            _write_metadata(tmp, rows, skipped, settings, renderer, seconds, len(refs))
        except OSError as exc:
            raise _write_failed(target, tmp, f"{type(exc).__name__}: {exc}") from None
        if force and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)  # atomic; refuses to replace a non-empty folder
        except OSError:
            if not (target / "manifest.jsonl").is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same build first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _stop_on_write_errors(skipped: list[dict[str, str]], target: Path, tmp: Path) -> None:
    failed = [s for s in skipped if "write_error" in s]
    if failed:
        first = failed[0]
        raise _write_failed(target, tmp, f"{first['reason']} (writing {first['write_error']}; {len(failed)} piece(s) affected)")


def _write_failed(target: Path, tmp: Path, reason: str) -> MtrunError:
    """The error for a build that could not write its files; nothing is cached."""
    written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else 0
    try:
        free = shutil.disk_usage(target.parent).free
        space = f"{free / 2**20:.0f} MiB free there"
    except OSError:
        space = "free space unknown"
    return MtrunError(
        f"the demo corpus build could not write into {target.parent}: {reason}. Nothing was cached "
        f"(the partial build, {written / 2**20:.0f} MiB, was removed; {space}; the full corpus needs "
        "about 600 MiB). Free space or point MTRUN_CACHE at another disk, then run again."
    )


@contextlib.contextmanager
def _build_progress(target: Path, total: int):
    """Say on stderr that the (minutes-long, once per machine) build is running, with a bar.

    Yields a function to call once per finished piece. On a terminal the bar redraws; in a log
    file rich writes it once, finished, after the line announcing the build.
    """
    from mtrun import make_console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = make_console(stderr=True)
    console.print(
        f"building the demo corpus (once per machine, a few minutes): {total} pieces -> {target}",
        markup=False, highlight=False, soft_wrap=True,
    )
    columns = (TextColumn("demo corpus"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("render", total=total)
        yield lambda: bar.advance(task)


def _remove_abandoned(target: Path) -> None:
    """Delete temporary folders of builds whose process is gone (killed with SIGKILL/SIGTERM,
    which skip the clean-up below); a live process' folder is left alone."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(tmp.name.split(".tmp-")[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _write_metadata(folder: Path, rows, skipped, settings, renderer, seconds, n_pieces) -> None:
    with open(folder / "manifest.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts: dict[str, Any] = {"items": len(rows), "pieces": len({r["group"] for r in rows})}
    counts["items_per_split"] = dict(sorted(Counter(r["split"] for r in rows).items()))
    counts["pieces_per_split"] = {
        split: len({r["group"] for r in rows if r["split"] == split}) for split in counts["items_per_split"]
    }
    tag_counts: dict[str, dict[str, int]] = {}
    for row in rows:
        for category, values in row["tags"].items():
            for value in values:
                tag_counts.setdefault(category, Counter())[value] += 1
    counts["tags"] = {c: dict(sorted(v.items(), key=lambda kv: -kv[1])) for c, v in sorted(tag_counts.items())}
    info = {
        **_fingerprint(settings, renderer),
        "soundfont_path": str(soundfont_path()) if renderer == "tinysoundfont" else None,
        "pieces_selected": n_pieces,
        "build_seconds": round(seconds, 1),
        "counts": counts,
        "skipped": skipped,
        "licence_note": "Per-item 'licence' column; some encodings restrict commercial use "
        "(music21/corpus/license.txt). Renders use pretty_midi's TimGM6mb.sf2 (GPL-2.0, see "
        "pretty_midi).",
    }
    (folder / "corpus.json").write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    (folder / "README.md").write_text(_readme(info), encoding="utf-8")


def _readme(info: dict[str, Any]) -> str:
    counts = info["counts"]
    lines = [
        "# mtrun demo corpus",
        "",
        "Real compositions from the corpus inside the music21 wheel, rendered to 16 kHz mono FLAC",
        f"clips with General MIDI timbres (renderer: `{info['renderer']}`, soundfont: "
        f"`{info['soundfont']}`, music21 {info['music21']}). Each piece is rendered several times",
        "with different instruments and tempi; captions are written from the tags.",
        "",
        f"- items: {counts['items']} from {counts['pieces']} pieces "
        f"({len(info['skipped'])} pieces skipped, reasons in corpus.json)",
        f"- items per split: {counts['items_per_split']}",
        f"- build time: {info['build_seconds']} s",
        "",
        "`manifest.jsonl` columns: id, audio (relative to this folder), captions, tags (by",
        "category), split, group (= piece; no piece is in two splits), plus bpm, gm_program, title,",
        "source, licence, renderer, sample_rate. Mind the per-item licence: some score encodings",
        "are licensed for non-commercial use only.",
        "",
        "## Tags",
        "",
    ]
    for category, values in counts["tags"].items():
        shown = ", ".join(f"{k} ({v})" for k, v in list(values.items())[:20])
        lines.append(f"- **{category}**: {shown}")
    return "\n".join(lines) + "\n"
