"""Fault injection, one line per fault class: injected, survived, data lost, bare tracebacks.

Each class is a set of injected faults whose expected outcome the reliability tests state
(`tests/reliability/`, `tests/test_checkpoint_faults.py`, ...): a run that resumes bit-exactly,
a clear error naming the file or key, a skipped-and-listed item. This script runs those suites
(CI runs the same tests in its normal pass) plus the full SIGKILL sweep of
`benchmarks/faults_kills.py`, and counts per class:

* injected: faults injected (test cases; for kills, kill moments);
* survived: the expected outcome held;
* data lost: the outcome was wrong (a failed assertion: a resume that differs, a checkpoint
  that cannot be read, an item silently dropped);
* bare tracebacks: an exception other than an assertion escaped (what a user would see as a
  traceback instead of a message).

Usage: python benchmarks/faults.py [--kills 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from faults_kills import cpu_name  # noqa: E402 - one definition for both scripts

CLASSES: dict[str, list[str]] = {
    "disk": ["tests/reliability/test_disk_and_corruption.py", "-k", "disk or write or full or space or read_only or vanish"],
    "caches": [
        "plugins/demo/tests/test_demo_corpus.py", "plugins/tag-to-caption/tests/test_tag_to_caption.py",
        "tests/test_decode_cache.py", "tests/test_encoder_cache.py",
        "-k", "full_disk or cannot_be_written or disk or unwritable or corrupt or stale or concurrent",
    ],
    "corruption": ["tests/test_checkpoint_faults.py", "tests/reliability/test_disk_and_corruption.py", "-k", "not (disk or write or full or space or read_only or vanish)"],
    "numbers": ["tests/test_trainer.py", "-k", "nonfinite or non_finite or nan"],
    "data": ["tests/reliability/test_data_faults.py"],
    "recipes": ["tests/reliability/test_recipe_mutation.py"],
    "plugins": ["tests/test_plugins.py", "tests/test_public_api.py", "-k", "broken or import or clash or api or misspelled or raises"],
    "safety": ["tests/reliability/test_safety.py"],
}
"""Fault class -> the pytest selection that injects its faults."""


def run_class(name: str, selection: list[str]) -> tuple[int, int, int, int]:
    """``(injected, survived, data lost, bare tracebacks)`` of one class's pytest selection."""
    paths = [s for s in selection if s.endswith(".py")]
    missing = [p for p in paths if not (ROOT / p).exists()]
    if missing:
        print(f"{name}: not run ({', '.join(missing)} missing)")
        return (0, 0, 0, 0)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *selection],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )
        if not report.exists():
            return (0, 0, 0, 1)
        cases = ET.parse(report).getroot().iter("testcase")
        injected = survived = lost = tracebacks = 0
        for case in cases:
            if case.find("skipped") is not None:
                continue
            injected += 1
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            if problem is None:
                survived += 1
            elif problem.get("message", "").startswith(("AssertionError", "assert ", "Failed:")):
                lost += 1  # the test's own check failed: the fault was not survived
            else:
                tracebacks += 1
        return (injected, survived, lost, tracebacks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILL moments in the kill sweep")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = parser.parse_args()
    print(f"cpu: {cpu_name()}; python {platform.python_version()}")
    totals = [0, 0, 0, 0]
    for name, selection in CLASSES.items():
        counts = run_class(name, selection)
        totals = [t + c for t, c in zip(totals, counts)]
        print(f"{name}: injected {counts[0]}, survived {counts[1]}, data lost {counts[2]}, bare tracebacks {counts[3]}")
    kills = ROOT / "benchmarks" / "faults_kills.py"
    if kills.exists():
        sys.stdout.flush()
        subprocess.run([sys.executable, str(kills), "--kills", str(args.kills), "--seed", str(args.seed)], cwd=ROOT, check=False)
    print(f"all classes above but kills: injected {totals[0]}, survived {totals[1]}, data lost {totals[2]}, bare tracebacks {totals[3]}")
    return 0 if totals[2] == totals[3] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
