"""SLAP vs the CLAP baseline on the demo corpus: batch size, modality gap, memory (docs/slap.md).

Batch size (the default): trains ``recipes/slap.toml`` and ``recipes/clap.toml`` (their tiny
profiles) at global batch 8, 32 and 128, each reached by accumulating micro-batches of 8, for
the same number of epochs, and evaluates the final weights on the held-out test split:
text→music R@10, the modality gap (centroid distance, audio-vs-text logistic-regression
accuracy). With accumulation BYOL's gradient is the whole batch's; InfoNCE's softmax only ever
sees the 8 items of a micro-batch. Prints a Markdown table (mean and 95% t-interval over seeds)
and writes every run's numbers to ``OUT/results.json``; runs that already have an
``eval-test-*/eval.json`` are reused, so an interrupted sweep continues where it stopped.

    python benchmarks/slap_batch_size.py --seeds 0 1 2 --epochs 3 --out runs/slap-batch
    python benchmarks/slap_batch_size.py --audio htsat     # the profiles' own HTS-AT tiny (10 s, slower)
    python benchmarks/slap_batch_size.py --memory          # peak memory of a step, both objectives

``--audio mavil`` (default) swaps the profiles' HTS-AT tiny (10 s at 48 kHz, ~24 samples/s on
a 2-core CPU) for the quickstart's MAViL tiny on 2.56 s crops (~4x faster), so that the sweep
fits a CPU session; everything else is the recipes' tiny profile.

Memory (``--memory``): each objective in a fresh process (no DataLoader workers) trains a few
steps at the same micro-batch; the peak resident memory of the process (``ru_maxrss``) over
those steps is printed for both and their ratio. Weights, gradients, optimizer state and EMA
targets are all in it, as they are on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
METHODS = ("slap", "clap")
MICRO = 8
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
MAVIL = [
    'audio_encoder={type="mavil", preset="tiny", pretrained=""}',
    "loader.clip_seconds=2.56",
    'augmenter=[{type="specaugment", time_mask_width=48, freq_mask_width=48}]',
]


def cpu_line() -> str:
    import torch

    from mtrun.train.trainer import cpu_has_fast_bf16

    model = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next((l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")), model)
    return f"CPU: {model}, {os.cpu_count()} cores, fast bf16 (AMX/AVX512-BF16): {cpu_has_fast_bf16()}"


def overrides(method: str, batch: int, seed: int, args: argparse.Namespace, out: Path) -> list[str]:
    return [
        f"run.output_dir={out}",
        f"run.name={method}-b{batch}-seed{seed}",
        f"run.seed={seed}",
        *(MAVIL if args.audio == "mavil" else []),
        f"trainer.batch_size={batch}",
        f"trainer.grad_accum={batch // MICRO}",
        "trainer.max_steps=0",
        f"trainer.epochs={args.epochs}",
        "trainer.schedule.warmup_steps=0",
        f"trainer.schedule.warmup_epochs={args.epochs / 10}",  # SLAP: warm-up over the first tenth
        "trainer.precision=fp32",  # the same numbers on every CPU (auto picks bf16 where it is fast)
        "trainer.eval_every=0",
        "trainer.log_every=50",
        'trainer.val_split="none"',
        f'eval=[{{type="retrieval", bootstrap={args.bootstrap}}}, {{type="modality-gap"}}]',
        *args.set,
    ]


def run_one(method: str, batch: int, seed: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    run_dir = out / f"{method}-b{batch}-seed{seed}"
    found = sorted(run_dir.glob("eval-test-*/eval.json"))
    if not found:
        cmd = [str(Path(sys.executable).parent / "mtrun"), str(RECIPES / f"{method}.toml"), "--profile", "tiny"]
        cmd += overrides(method, batch, seed, args, out)
        print("$", " ".join(f"'{c}'" if any(x in c for x in ' [{"') else c for c in cmd[1:]), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({method}, batch {batch}, seed {seed}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
        found = sorted(run_dir.glob("eval-test-*/eval.json"))
    metrics = json.loads(found[-1].read_text())["metrics"]
    return {
        "R@10": float(metrics["retrieval/t2a/R@10"]),
        "a2t R@10": float(metrics["retrieval/a2t/R@10"]),
        "centroid distance": float(metrics["modality-gap/centroid_distance"]),
        "logreg accuracy": float(metrics["modality-gap/logreg_accuracy"]),
        "n_items": float(metrics["retrieval/n_items"]),
    }


def mean_ci(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def table(results: dict[str, dict[str, dict[str, float]]], seeds: list[int], batches: list[int]) -> str:
    columns = ("R@10", "a2t R@10", "centroid distance", "logreg accuracy")
    lines = [
        "| objective | global batch | micro-batches | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    n_items = None
    for method in METHODS:
        for batch in batches:
            runs = [results[method][f"{batch}/{s}"] for s in seeds if f"{batch}/{s}" in results.get(method, {})]
            if not runs:
                continue
            n_items = runs[0]["n_items"]
            cells = []
            for column in columns:
                mean, half = mean_ci([r[column] for r in runs])
                cells.append(f"{mean:.3f} ± {half:.3f}" if column == "logreg accuracy" else f"{mean:.2f} ± {half:.2f}")
            lines.append(f"| {method} | {batch} | {batch // MICRO} × {MICRO} | " + " | ".join(cells) + " |")
    lines.append("")
    if n_items:
        lines.append(
            f"Text→music (R@10) and music→text (a2t R@10) recall in %, mean ± 95% t-interval half-width over "
            f"seeds {seeds}; {int(n_items)} test clips (chance R@10 ≈ {1000 / n_items:.1f}%). Modality gap: "
            "distance of the normalised audio and text centroids; held-out accuracy of a logistic regression "
            "telling audio from text embeddings (0.5 = no gap)."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- memory

_MEMORY_CHILD = r"""
import json, resource, sys
from mtrun.cli import main
code = main(sys.argv[1:])
print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def memory(args: argparse.Namespace) -> None:
    out = args.out / "memory"
    rows = {}
    for method in METHODS:
        cmd = [
            sys.executable, "-c", _MEMORY_CHILD, str(RECIPES / f"{method}.toml"), "--profile", "tiny",
            f"run.output_dir={out}", f"run.name={method}-{int(time.time())}",
            *(MAVIL if args.audio == "mavil" else []),
            f"trainer.batch_size={args.memory_batch}", "trainer.grad_accum=1", f"trainer.max_steps={args.memory_steps}",
            "trainer.precision=fp32", "loader.num_workers=0", 'trainer.val_split="none"', "eval=[]",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("MAXRSS_KIB")]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"memory run failed ({method}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        rows[method] = int(line[-1].split()[1]) / 1024
    print(f"peak resident memory, {args.memory_steps} steps at micro-batch {args.memory_batch} ({args.audio} audio encoder):")
    for method, mib in rows.items():
        print(f"  {method}: {mib:.0f} MiB")
    print(f"  slap / clap: {rows['slap'] / rows['clap']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128], help=f"global batch sizes (multiples of {MICRO})")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--audio", default="mavil", choices=("mavil", "htsat"), help="audio encoder (see the module docstring)")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/slap-batch"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further recipe overrides for every run")
    parser.add_argument("--memory", action="store_true", help="measure peak memory per step instead")
    parser.add_argument("--memory-batch", type=int, default=MICRO)
    parser.add_argument("--memory-steps", type=int, default=5)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    print(cpu_line(), flush=True)
    if args.memory:
        memory(args)
        return 0
    if any(b % MICRO for b in args.batches):
        parser.error(f"--batches must be multiples of the micro-batch {MICRO}")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for seed in args.seeds:  # seed-major: a partial sweep still compares every setting
        for batch in args.batches:
            for method in args.methods:
                results.setdefault(method, {})[f"{batch}/{seed}"] = run_one(method, batch, seed, args, args.out)
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "results.json").write_text(
                    json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
                )
    print(table(results, args.seeds, args.batches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
