"""DuET-MC pipeline ablation on the demo corpus (docs/duet_mc_ablation.md).

Trains ``recipes/duet_mc.toml --profile tiny`` four times per seed, adding one text
augmentation at a time as in the paper's Table 4 — tags only → +tag-to-caption → +view
dropout → +TextSwap — and evaluates each run's final weights on the held-out test split
(text→music R@1, R@10, median rank). Prints a Markdown table with the mean over seeds and a
95% t-interval across seeds, and each row's R@10 and median-rank difference to the tags-only
row of the same seeds; writes every run's numbers to ``OUT/results.json``.

    python benchmarks/duet_mc_ablation.py --seeds 0 1 2 3 4 --out runs/duet-mc-ablation
    python benchmarks/duet_mc_ablation.py --recipe duet_mc_htsat.toml --steps 60 --n-items 600

Runs that already have an ``eval-test-*/eval.json`` are reused, so an interrupted ablation
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

# Each stage's [[augmenter]] list (a TOML array of inline tables, given as one override).
# "Tags only": tag-to-caption with p_cap = 0 writes the joined tags for every pair (without
# it the loader would use the demo corpus' own captions).
STAGES = {
    "tags only": '[{type="tag-to-caption", p_cap=0.0}]',
    "+ tag-to-caption": '[{type="tag-to-caption", p_cap=0.5}]',
    "+ view dropout": '[{type="view-dropout", output="tags"}, {type="tag-to-caption", p_cap=0.5}]',
    "+ TextSwap": (
        '[{type="view-dropout", output="tags"}, {type="tag-to-caption", p_cap=0.5}, '
        '{type="textswap", p_max=0.15, warmup_epochs=WARMUP, ramp_epochs=RAMP}]'
    ),
}
METRICS = ("R@1", "R@10", "median_rank")

# Two-sided 95% t quantiles by degrees of freedom.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def train_items(n_items: int) -> int:
    """How many training clips the run's demo corpus has (built or reused from the cache)."""
    from mtrun.data.demo import DemoCorpus

    return len(DemoCorpus(DemoCorpus.Config(n_items=n_items)).build()["train"])


def overrides(stage: str, seed: int, args: argparse.Namespace, out: Path) -> list[str]:
    epochs = args.steps * args.batch_size / args.train_items
    # TextSwap's schedule scaled to this run's length as in the paper's 5 + 20 of 100 epochs
    # would leave p ≈ 0 here; warm up for the first 1/6 and ramp over the next third instead.
    augmenters = STAGES[stage].replace("WARMUP", f"{epochs / 6:.3f}").replace("RAMP", f"{epochs / 3:.3f}")
    return [
        f"run.output_dir={out}",
        f"run.name={slug(stage)}-seed{seed}",
        f"run.seed={seed}",
        *([f"data.n_items={args.n_items}"] if args.n_items else []),
        *([f"loader.clip_seconds={args.clip_seconds}"] if args.clip_seconds else []),
        f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.schedule.warmup_steps={max(1, args.steps * 3 // 20)}",  # the tiny profile's 30 of 200
        "trainer.eval_every=0",
        'trainer.val_split="none"',  # no validation pass: the test split is evaluated once
        f"augmenter={augmenters}",
        f'eval=[{{type="retrieval", bootstrap={args.bootstrap}}}]',
    ]


def slug(stage: str) -> str:
    return stage.replace("+ ", "").replace(" ", "-").replace("TextSwap", "textswap")


def run_one(stage: str, seed: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    run_dir = out / f"{slug(stage)}-seed{seed}"
    found = sorted(run_dir.glob("eval-test-*/eval.json"))
    if not found:
        cmd = [str(Path(sys.executable).parent / "mtrun"), str(RECIPES / args.recipe), "--profile", "tiny", *overrides(stage, seed, args, out)]
        print("$", " ".join(f"'{c}'" if any(x in c for x in ' [{"') else c for c in cmd[1:]), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({stage}, seed {seed}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
        found = sorted(run_dir.glob("eval-test-*/eval.json"))
    metrics = json.loads(found[-1].read_text())["metrics"]
    result = {m: float(metrics[f"retrieval/t2a/{m}"]) for m in METRICS}
    result["n_items"] = float(metrics["retrieval/n_items"])
    return result


def mean_ci(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def table(results: dict[str, dict[int, dict[str, float]]], seeds: list[int]) -> str:
    n_items = next(iter(next(iter(results.values())).values()))["n_items"]
    lines = [
        f"| pipeline | R@1 (%) | R@10 (%) | median rank | ΔR@10 vs tags only | Δ median rank |",
        "|---|---|---|---|---|---|",
    ]
    base = results.get("tags only")
    for stage, runs in results.items():
        cells = []
        for m in METRICS:
            mean, half = mean_ci([runs[s][m] for s in seeds])
            cells.append(f"{mean:.1f} ± {half:.1f}")
        for m in ("R@10", "median_rank"):  # paired by seed
            if stage == "tags only" or base is None:
                cells.append("—")
            else:
                diff_mean, diff_half = mean_ci([runs[s][m] - base[s][m] for s in seeds])
                cells.append(f"{diff_mean:+.1f} ± {diff_half:.1f}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Mean ± 95% t-interval half-width over seeds {seeds}; {int(n_items)} test items "
        f"(chance R@1 = {100 / n_items:.1f}%, R@10 = {1000 / n_items:.1f}%, median rank ≈ {(n_items + 1) / 2:.0f})."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="duet_mc.toml", help="a DuET-MC recipe in recipes/ (its tiny profile)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-items", type=int, default=0, help="demo-corpus items (0 = all, 2,664)")
    parser.add_argument("--clip-seconds", type=float, default=0.0, help="training crop (0 = the profile's)")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--out", type=Path, default=Path("runs/duet-mc-ablation"))
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.train_items = train_items(args.n_items)
    results: dict[str, dict[int, dict[str, float]]] = {}
    for seed in args.seeds:  # seed-major: a partial ablation still compares every stage
        for stage in args.stages:
            results.setdefault(stage, {})[seed] = run_one(stage, seed, args, args.out)
            (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    print(table(results, args.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
