"""MuLaP transfer on the demo corpus: probe the frozen musicnn backbone (docs/mulap.md).

MuLaP's central comparison: the audio backbone after multimodal pretraining against the same
backbone untrained, probed on downstream labels. Conditions:

* ``mulap``: ``recipes/mulap.toml --profile tiny`` trained (tiny musicnn, random init), one run
  per seed;
* ``random``: the same tiny backbone as initialised with that seed, untrained;
* ``mtt``: the full musicnn with its published MagnaTagATune weights (frozen);
* ``random-full``: the full musicnn at random initialisation (the like-for-like for ``mtt``).

Each backbone's pooled output (the mean of its chunk features) is probed for the demo corpus'
instrument, genre and tempo tags with ``mtrun``'s ``probe`` task (MuLaP's protocol: MLP with 512
hidden units, and a linear probe; Adam 1e-3, weight decay, early stopping on validation
accuracy; trained on the train split, tested on the test split; three probe seeds averaged).
Prints a Markdown table: mean and 95% t-interval over seeds (pretraining seeds for ``mulap``
and ``random``, probe seeds for the fixed published weights).

    python benchmarks/mulap_transfer.py --seeds 0 1 --out runs/mulap-transfer
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
RECIPE = ROOT / "recipes" / "mulap.toml"
CATEGORIES = ("instrument", "genre", "tempo")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447}
FULL = ["audio_encoder.preset=musicnn", "audio_encoder.frozen=true"]
PROBES = {"mlp": 512, "linear": 0}  # MuLaP's MLP probe (512 hidden) and a linear probe


def pretrain(seed: int, args: argparse.Namespace) -> Path:
    """Train the tiny profile once per seed (reused when its checkpoint exists)."""
    run_dir = args.out / f"mulap-seed{seed}"
    if not list((run_dir / "checkpoints").glob("step-*")):
        cmd = [
            str(Path(sys.executable).parent / "mtrun"), str(RECIPE), "--profile", "tiny",
            f"run.output_dir={args.out}", f"run.name=mulap-seed{seed}", f"run.seed={seed}",
            f"trainer.max_steps={args.steps}", "eval=[]", 'trainer.val_split="none"', "trainer.precision=fp32",
        ]
        print("$", " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"pretraining failed (seed {seed}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print(f"  pretrained in {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def probe(condition: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Probe one backbone on every category; the numbers, cached in OUT/probes.json."""
    import torch

    from mtrun.assemble import assemble
    from mtrun.eval.embed import EvalCache
    from mtrun.eval.probe import Probe
    from mtrun.runner import prepare
    from mtrun.train.checkpoint import find_latest, read_model_state

    overrides = [f"run.output_dir={args.out / 'probe-runs'}", f"run.name={condition}-{seed}", f"run.seed={seed}", "eval=[]"]
    if condition in ("mtt", "random-full"):
        overrides += FULL + [f"audio_encoder.weights={'MTT_musicnn' if condition == 'mtt' else ''}"]
    resolved, run = prepare(str(RECIPE), overrides, "tiny", False, None)
    torch.manual_seed(seed)  # the initialisation, as `mtrun` draws it
    built = assemble(resolved, run)
    if condition == "mulap":
        built.system.load_state_dict(read_model_state(find_latest(pretrain(seed, args) / "checkpoints")))
    cache = EvalCache()  # one embedding pass per backbone, shared by every probe
    test = built.data.load("test")
    out = {}
    for probe_name, hidden in PROBES.items():
        for category in CATEGORIES:
            task = Probe(
                Probe.Config(
                    category=category, train_split="train", clip_seconds=args.clip_seconds, hop_seconds=10.0,
                    hidden=hidden, seed=0, seeds=3,
                ),
                run=run,
                data=built.data,
            )
            result = task.evaluate(built.system, test, cache=cache)
            out[f"{probe_name}/{category}"] = float(result[f"probe/{category}/accuracy"])
            out[f"{probe_name}/{category}:std"] = float(result[f"probe/{category}/accuracy:std"])
    out["n_test"] = float(result[f"probe/{category}/n_test"])
    return out


def mean_ci(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=150, help="pretraining steps of the tiny profile")
    parser.add_argument("--conditions", nargs="+", default=["mulap", "random", "mtt", "random-full"])
    parser.add_argument("--clip-seconds", type=float, default=3.0, help="probe window: the first N s of each clip")
    parser.add_argument("--out", type=Path, default=Path("runs/mulap-transfer"))
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "probes.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for condition in args.conditions:
        # A fixed published backbone has no initialisation seed; one random full-size network
        # is the like-for-like for it (the full network's probes are the slow part).
        seeds = args.seeds if condition in ("mulap", "random") else [args.seeds[0]]
        for seed in seeds:
            key = f"{condition}/{seed}"
            if key not in results:
                start = time.perf_counter()
                results[key] = probe(condition, seed, args)
                print(f"{key}: {results[key]}  ({time.perf_counter() - start:.0f} s)", flush=True)
                store.write_text(json.dumps(results, indent=1))
    for probe_name, hidden in PROBES.items():
        kind = "linear probe" if hidden == 0 else f"MLP probe ({hidden} hidden)"
        print(f"\n{kind}, accuracy on the test split (%):\n")
        print("| backbone | " + " | ".join(CATEGORIES) + " |")
        print("|---|" + "---|" * len(CATEGORIES))
        for condition in args.conditions:
            rows = [v for k, v in results.items() if k.split("/")[0] == condition]
            cells = []
            for c in CATEGORIES:
                name = f"{probe_name}/{c}"
                if len(rows) > 1:
                    mean, half = mean_ci([r[name] for r in rows])
                else:  # one backbone: the spread of its three probe seeds
                    mean, half = rows[0][name], T975[2] * rows[0][f"{name}:std"] * math.sqrt(3 / 2) / math.sqrt(3)
                cells.append(f"{mean:.1f} ± {half:.1f}")
            print(f"| {condition} | " + " | ".join(cells) + " |")
    n_test = int(next(iter(results.values()))["n_test"])
    print(f"\n{n_test} test clips; mean ± 95% t-interval over seeds {args.seeds} (mtt and random-full, one backbone each: over its three probe seeds).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
