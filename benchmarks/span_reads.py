"""Reading one crop of an audio file: mtrun's span reader vs soundfile's ``read``, in one run.

``mtrun.data.audio.open_span`` reads a crop (open, seek, read) through libsndfile's reader
directly; soundfile's ``read`` also seeks back to where each read ended, which on FLAC is a real
seek. Both read the same random 2.56 s spans of the same files, rounds alternating, and the
frames are compared. The files are the demo corpus' FLACs when it has been built, else 10 s
noisy chords written in the format asked for.

    python benchmarks/span_reads.py [--files 640] [--seconds 2.56] [--format flac] [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path


def chords(folder: Path, n: int, fmt: str, rate: int = 16000) -> list[str]:
    import numpy as np
    import soundfile

    rng = np.random.default_rng(0)
    t = np.arange(10 * rate) / rate
    paths = []
    for i in range(n):
        chord = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(110, 880, 3)) / 3
        path = folder / f"clip{i}.{fmt}"
        soundfile.write(path, (0.3 * chord + 0.01 * rng.standard_normal(len(t))).astype("float32"), rate)
        paths.append(str(path))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=640)
    parser.add_argument("--seconds", type=float, default=2.56, help="span length")
    parser.add_argument("--format", default="flac", help="of the written files, when the demo corpus is not there")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    import numpy as np
    import soundfile
    import torch

    from mtrun.data import audio
    from mtrun.data.audio import open_span
    from mtrun.cache import cache_root

    sys.path.insert(0, str(Path(__file__).parent))
    from plain_loop import cpu_report

    torch.set_num_threads(1)
    demo = sorted(cache_root().glob("demo-*/audio/*/*.flac"))
    tmp = tempfile.TemporaryDirectory()
    if args.format == "flac" and len(demo) >= args.files:
        paths, where = [str(p) for p in demo[: args.files]], "the demo corpus' FLACs"
    else:
        paths, where = chords(Path(tmp.name), args.files, args.format), f"written 10 s {args.format} chords at 16 kHz"
    infos = [soundfile.info(p) for p in paths]
    rate = infos[0].samplerate
    count = round(args.seconds * rate)  # frames at the first file's rate, the same for every file
    starts = [random.Random(i).randrange(max(1, info.frames - count)) for i, info in enumerate(infos)]

    # Timed, each span is dropped once read, as a loader drops it into its batch; compared after.
    def through_soundfile(keep: list | None = None) -> None:
        for path, start in zip(paths, starts):
            with soundfile.SoundFile(path) as f:
                f.seek(start)
                span = f.read(frames=count, dtype="float32", always_2d=True).T
            if keep is not None:
                keep.append(span)

    def through_mtrun(keep: list | None = None) -> None:
        for path, start in zip(paths, starts):
            with open_span(path) as source:
                span = source.read(start, count)
            if keep is not None:
                keep.append(span.numpy())

    def through_mtrun_with_soundfile_read(keep: list | None = None) -> None:
        binding = audio._libsndfile_binding
        audio._libsndfile_binding = lambda: None  # what a soundfile release without the binding gets
        try:
            through_mtrun(keep)
        finally:
            audio._libsndfile_binding = binding

    print(cpu_report())
    print(f"{len(paths)} spans of {args.seconds} s from {where}; best of {args.rounds} alternating rounds")
    readers = {
        "soundfile alone (open, seek, read)": through_soundfile,
        "open_span with soundfile's read": through_mtrun_with_soundfile_read,
        "open_span (libsndfile's reader)": through_mtrun,
    }
    best = dict.fromkeys(readers, float("inf"))
    for _ in range(args.rounds):
        for label, fn in readers.items():
            start = time.perf_counter()
            fn()
            best[label] = min(best[label], (time.perf_counter() - start) / len(paths))
    spans = {label: [] for label in readers}
    for label, fn in readers.items():
        fn(spans[label])
    expected = spans["soundfile alone (open, seek, read)"]
    same = all(all(np.array_equal(a, b) for a, b in zip(expected, got)) for got in spans.values())
    for label, seconds in best.items():
        print(f"  {label:<36} {seconds * 1e3:6.3f} ms a span")
    ours, theirs, alone = (best[label] for label in (
        "open_span (libsndfile's reader)", "open_span with soundfile's read", "soundfile alone (open, seek, read)"))
    print(f"open_span with soundfile's read / open_span: {theirs / ours:.2f}x; "
          f"soundfile alone / open_span: {alone / ours:.2f}x; same frames: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
