"""Threads and DataLoader workers for the quickstart: samples/s of each setting, side by side.

Trains ``recipes/quickstart.toml`` through mtrun's trainer (as ``benchmarks/plain_loop.py``
does, with its timers) for ``--steps`` steps per setting, cycling through the settings
``--rounds`` times so a shared machine's load drifts over all of them alike, and prints each
setting's median samples/s and main-process CPU time per step as ratios to what ``threads = 0``
(auto) picks on this machine (:func:`mtrun.runner.choose_threads`).

    python benchmarks/threads.py                                  # 1/2 threads x 0/1 workers
    python benchmarks/threads.py --settings 1:1 2:0 --steps 60    # THREADS:WORKERS
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["1:1", "2:0", "2:1", "1:0"], help="THREADS:WORKERS pairs")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)

    from mtrun.runner import choose_threads, usable_cores
    from plain_loop import cpu_report, run_mtrun

    print(cpu_report())
    cores = usable_cores()
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings]
    auto = {w: choose_threads(0, w, cores=cores)[0] for _, w in settings}
    print("auto picks: " + ", ".join(f"{t} threads with {w} workers" for w, t in sorted(auto.items())), flush=True)
    out = Path(tempfile.mkdtemp(prefix="mtrun-threads-"))
    rows: dict[tuple[int, int], list[dict]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for threads, workers in settings:
            run_args = argparse.Namespace(
                steps=args.steps, warmup=args.warmup, precision=args.precision, threads=threads, workers=workers, batch_probe=0,
                fbank_in_worker=False,
            )
            result = run_mtrun(out, f"t{threads}-w{workers}-r{r}", run_args)
            rows[(threads, workers)].append(result)
            print(f"round {r}: threads {threads}, workers {workers}: {result['samples_per_s']:6.1f} samples/s, main CPU "
                  f"{result['cpu_s'] * 1e3:.0f} ms/step, waiting for data {result['stages'].get('wait for data', 0) * 1e3:.0f} ms/step; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    base_setting = next(((t, w) for t, w in settings if auto[w] == t), settings[0])
    base = statistics.median(x["samples_per_s"] for x in rows[base_setting])
    print(f"\nmedian samples/s over {args.rounds} rounds, as a ratio to threads {base_setting[0]}, workers {base_setting[1]} (what auto picks):")
    for (threads, workers), results in rows.items():
        sps = statistics.median(x["samples_per_s"] for x in results)
        cpu = statistics.median(x["cpu_s"] for x in results)
        per_round = ", ".join(f"{x['samples_per_s']:.0f}" for x in results)
        print(f"  threads {threads}, workers {workers}: {sps:6.1f} samples/s ({per_round}), ratio {sps / base:.2f}; main CPU {cpu * 1e3:.0f} ms/step")


if __name__ == "__main__":
    main()
