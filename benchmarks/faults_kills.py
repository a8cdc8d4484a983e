"""Kill sweep: SIGKILL the toy run at random moments, resume each time, count what survived.

Moments are drawn from ``--seed`` in chains of one kill of each kind (during a step, a
checkpoint write, an evaluation and a start-up; see ``tests/reliability/faultkit.py``, which
``tests/reliability/test_kills.py`` runs on a sample of four). Each chain kills the run at its
moments in turn, resuming with ``--resume latest`` in between, then resumes it to the end. Per
kind it prints

    kills/<kind>: injected N, survived N, data lost N, bare tracebacks N

where data lost counts kills after which the resumed run differed from the uninterrupted
reference run (final weights, optimizer state, logged training losses or val/loss), a complete
checkpoint could not be read, a partial checkpoint folder was left behind or the resume failed;
and bare tracebacks counts kills after which a process printed a Python traceback (SIGKILL
itself prints none). Each kill that did not survive is reported with the seed, its moment and
where it landed. Exit status 1 if any did not survive.

Usage: python benchmarks/faults_kills.py [--kills 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))

from faultkit import KINDS, draw_chains, kill_chain, reference  # noqa: E402


def cpu_name() -> str:
    """``lscpu``'s model name, else what :mod:`platform` knows."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="kill moments in all (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    args = parser.parse_args(argv)
    print(f"cpu: {cpu_name()}; python {platform.python_version()}; seed {args.seed}", flush=True)

    chains = draw_chains(args.seed, args.kills)
    outcomes = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mtrun-kills-") as tmp:
        reference_dir, startup = reference(Path(tmp) / "reference")
        reference_seconds = time.monotonic() - began
        for i, chain in enumerate(chains):
            outcomes += kill_chain(Path(tmp) / f"chain-{i:02d}", chain, reference_dir, startup)
    seconds = time.monotonic() - began - reference_seconds

    for kind in KINDS:
        mine = [o for o in outcomes if o.moment.kind == kind]
        print(
            f"kills/{kind}: injected {len(mine)}, survived {sum(o.survived for o in mine)}, "
            f"data lost {sum(bool(o.lost) for o in mine)}, bare tracebacks {sum(bool(o.tracebacks) for o in mine)}"
        )
    mid_write = sum("mid-write" in o.landed for o in outcomes if o.moment.kind == "checkpoint")
    in_eval = sum("during the evaluation" in o.landed for o in outcomes if o.moment.kind == "eval")
    print(
        f"landed: {mid_write} of {sum(o.moment.kind == 'checkpoint' for o in outcomes)} checkpoint kills mid-write, "
        f"{in_eval} of {sum(o.moment.kind == 'eval' for o in outcomes)} eval kills during the evaluation"
    )
    per_kill = seconds / max(1, len(outcomes))
    print(
        f"time: {seconds:.0f} s for {len(outcomes)} kills in {len(chains)} chains, "
        f"{per_kill / reference_seconds:.2f}x an uninterrupted run ({reference_seconds:.1f} s) per kill"
    )
    failed = [o for o in outcomes if not o.survived]
    for outcome in failed:
        print(f"\nseed {args.seed}: {outcome.report()}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
