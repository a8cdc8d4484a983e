"""How long does the demo corpus take to build? Wall and CPU time of a cold build.

Builds the corpus (or a ``--scale`` fraction of it) into a fresh temporary cache and prints wall
time, CPU time (user + sys of this process and its workers; robust to other jobs sharing the
machine, which stretch wall time) and both per 100 pieces. music21's own pickle cache is pointed
at an empty folder (``TMPDIR``) so a build that would read it is measured as on a fresh machine.

    python benchmarks/demo_build.py                   # the full corpus (what the quickstart builds)
    python benchmarks/demo_build.py --scale 0.1       # ~130 pieces
    python benchmarks/demo_build.py --workers 1

To compare with another version of ``mtrun_demo``, run this script with ``PYTHONPATH``
pointing at that version's ``plugins/demo/src`` in the same conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each collection (1.0 = full)")
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", default="", help="build into this folder instead of a temporary one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mtrun-demo-bench-") as scratch:
        os.environ["TMPDIR"] = str(Path(scratch) / "tmp")  # music21's pickle cache, empty
        (Path(scratch) / "tmp").mkdir()
        tempfile.tempdir = None
        from mtrun_demo import DemoSettings, build_corpus

        root = Path(args.keep) if args.keep else Path(scratch) / "cache"
        settings = DemoSettings(scale=args.scale, clip_seconds=args.clip_seconds)
        load = os.getloadavg()[0]
        cpu0, wall0 = _cpu(), time.perf_counter()
        folder = build_corpus(settings, root=root, force=True, workers=args.workers)
        wall, cpu = time.perf_counter() - wall0, _cpu() - cpu0
        counts = json.loads((folder / "corpus.json").read_text())["counts"]
        pieces = counts["pieces"]
        print(f"{counts['items']} clips from {pieces} pieces, {args.workers} workers, "
              f"{os.cpu_count()} CPUs, load average before {load:.2f}, after {os.getloadavg()[0]:.2f}")
        print(f"wall {wall:.1f} s, CPU {cpu:.1f} s (user+sys, incl. workers); "
              f"per 100 pieces: wall {100 * wall / pieces:.1f} s, CPU {100 * cpu / pieces:.1f} s")


if __name__ == "__main__":
    if not os.environ.get("PYTHONPATH"):
        sys.path.insert(0, str(ROOT / "core" / "src"))
    main()
