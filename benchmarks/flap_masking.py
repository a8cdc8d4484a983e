"""Masked vs unmasked FLAP training on the demo corpus at equal steps: wall time and R@10.

Runs ``recipes/quickstart.toml`` (FLAP's tiny profile) once with 2-D token masking (the recipe as
is) and once without (``~augmenter.1`` removes the ``token-mask`` augmenter), for each seed, with
the same steps, batch and data, and prints per run: wall time of the whole command, the
trainer's training throughput, and text→music R@10 on the held-out test split, plus the
mean ratio masked / unmasked. Each run is a separate ``mtrun`` process, run one at a time.

    python benchmarks/flap_masking.py                          # 3 seeds, 150 steps
    python benchmarks/flap_masking.py --seeds 0 1 2 3 --steps 300 --out /tmp/flap-masking
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(out: Path, name: str, seed: int, steps: int, masked: bool, extra: list[str]) -> dict:
    args = [
        sys.executable, "-m", "mtrun.cli", str(ROOT / "recipes" / "quickstart.toml"),
        f"run.output_dir={out}", f"run.name={name}", f"run.seed={seed}", f"trainer.max_steps={steps}",
        "trainer.log_every=1000", *([] if masked else ["~augmenter.1"]), *extra,
    ]
    start = time.perf_counter()
    usage0 = os.times()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    usage1 = os.times()
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    run_dir = out / name
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    throughput = [m["samples_per_s"] for m in metrics if "samples_per_s" in m]
    (evaluation,) = sorted(run_dir.glob("eval-test-*/eval.json"))
    numbers = json.loads(evaluation.read_text())["metrics"]
    return {
        "name": name, "seed": seed, "masked": masked, "steps": steps, "wall_s": wall,
        "cpu_s": (usage1.children_user + usage1.children_system) - (usage0.children_user + usage0.children_system),
        "samples_per_s": throughput[-1] if throughput else float("nan"),
        "t2a_R@10": numbers["retrieval/t2a/R@10"], "n_test": numbers["retrieval/n_items"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("/tmp/flap-masking"))
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run, e.g. data.n_items=1200")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for seed in args.seeds:
        for masked in (True, False):
            name = f"{stamp}-{'masked' if masked else 'unmasked'}-s{seed}"
            rows.append(run_once(args.out, name, seed, args.steps, masked, args.overrides))
            r = rows[-1]
            print(f"seed {seed} {'masked  ' if masked else 'unmasked'} wall {r['wall_s']:6.1f} s  cpu {r['cpu_s']:6.1f} s  "
                  f"train {r['samples_per_s']:5.1f} samples/s  t2a R@10 {r['t2a_R@10']:5.2f} %  (n_test {r['n_test']})", flush=True)
    (args.out / f"{stamp}.json").write_text(json.dumps(rows, indent=2))
    chance = 100 * 10 / rows[0]["n_test"]
    print(f"\n| seed | masked wall s | unmasked wall s | masked samples/s | unmasked samples/s | masked R@10 % | unmasked R@10 % |")
    print("|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        m = next(r for r in rows if r["seed"] == seed and r["masked"])
        u = next(r for r in rows if r["seed"] == seed and not r["masked"])
        print(f"| {seed} | {m['wall_s']:.0f} | {u['wall_s']:.0f} | {m['samples_per_s']:.1f} | {u['samples_per_s']:.1f} | {m['t2a_R@10']:.1f} | {u['t2a_R@10']:.1f} |")
    for key in ("wall_s", "cpu_s", "samples_per_s", "t2a_R@10"):
        m = statistics.mean(r[key] for r in rows if r["masked"])
        u = statistics.mean(r[key] for r in rows if not r["masked"])
        print(f"mean {key}: masked {m:.2f}, unmasked {u:.2f}, ratio {m / u:.3f}")
    print(f"chance R@10 = 10 / {rows[0]['n_test']} = {chance:.2f} %; steps {args.steps}; raw rows in {args.out / (stamp + '.json')}")


if __name__ == "__main__":
    main()
