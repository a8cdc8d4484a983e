"""torchrun DDP against one process at the same global batch: per-step losses of real recipes.

For each recipe's tiny profile, trains a few steps twice — one process, then
``torchrun --nproc_per_node N`` (gloo on the CPU) — at the same global batch and
micro-batches, and prints both runs' per-step losses, their largest difference and the
wall-clock ratio. Both runs go through tests/reciperun.py (the recipe assembled as `mtrun`
does, dropout off unless ``--keep-dropout``, the test-split evaluation left out).

    python benchmarks/torchrun_equivalence.py                        # FLAP, FLAP + recon, SLAP
    python benchmarks/torchrun_equivalence.py --recipes flap --keep-dropout   # what dropout costs
    python benchmarks/torchrun_equivalence.py --steps 8 --batch-size 16 --ranks 2

SLAP runs with SGD (``trainer.optimizer.type='sgd'``, lr 0.05): its BatchNorm over micro-batches
of 4 magnifies float32 summation-order differences, which Adam turns into whole learning-rate
steps on gradients that are zero in exact arithmetic. ``--noise-floor`` adds, per recipe, one
process against itself with 2 threads instead of 1: how far rounding alone moves the run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "reciperun.py"

RECIPES = {
    "flap": ("flap.toml", [], ("loss", "infonce/loss")),
    "flap-recon": ("flap_recon.toml", [], ("loss", "infonce/loss", "mae-recon/loss")),
    "slap": ("slap.toml", ["trainer.optimizer.type='sgd'", "trainer.optimizer.lr=0.05", "trainer.optimizer.weight_decay=0.01"], ("loss", "byol/loss")),
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(folder: Path) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from demodata import data_overrides

    return data_overrides(folder)


def _run(folder: Path, name: str, recipe: str, overrides: list[str], ranks: int, keep_dropout: bool) -> tuple[list[dict], float]:
    args = [str(folder / f"{name}-report"), str(ROOT / "recipes" / recipe), "--profile", "tiny",
            *(["--keep-dropout"] if keep_dropout else []), *overrides,
            f"run.output_dir={folder / name}", f"run.name={name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
               "--master_port", str(_port()), str(SCRIPT), *args]
    else:
        cmd = [sys.executable, str(SCRIPT), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (folder / name / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--keep-dropout", action="store_true", help="leave dropout on (not exact under DDP)")
    parser.add_argument("--noise-floor", action="store_true", help="also run one process with 2 threads against 1")
    args = parser.parse_args(argv)
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, gloo, {args.ranks} ranks vs 1 process; global batch "
          f"{args.batch_size} in {args.grad_accum} micro-batches, {args.steps} steps, fp32, dropout "
          f"{'on' if args.keep_dropout else 'off'}")
    common = [f"trainer.max_steps={args.steps}", f"trainer.batch_size={args.batch_size}", f"trainer.grad_accum={args.grad_accum}",
              "trainer.log_every=1", "trainer.checkpoint_every=0", "trainer.eval_every=0", "trainer.precision='fp32'",
              "trainer.schedule.warmup_steps=1", "loader.num_workers=0", "run.threads=1", "~eval"]
    with tempfile.TemporaryDirectory(prefix="mtrun-torchrun-") as tmp:
        folder = Path(tmp)
        data = _data(folder)
        for key in args.recipes:
            recipe, extra, loss_keys = RECIPES[key]
            overrides = common + extra + data
            single, t1 = _run(folder, f"{key}-single", recipe, overrides, 1, args.keep_dropout)
            ddp, tn = _run(folder, f"{key}-ddp", recipe, overrides, args.ranks, args.keep_dropout)
            print(f"\n{key} ({recipe} --profile tiny{' ' + ' '.join(extra) if extra else ''})")
            print(f"  {'step':>4}  " + "  ".join(f"{k + ' 1 proc':>22}  {k + ' DDP':>22}  {'|diff|':>8}" for k in loss_keys))
            worst = 0.0
            for a, b in zip(single, ddp):
                cells = []
                for k in loss_keys:
                    diff = abs(a[k] - b[k])
                    worst = max(worst, diff)
                    cells.append(f"{a[k]:>22.9f}  {b[k]:>22.9f}  {diff:>8.1e}")
                print(f"  {a['step']:>4}  " + "  ".join(cells))
            print(f"  largest |diff| {worst:.1e}; wall clock DDP / 1 process = {tn / t1:.2f} (start-up included)")
            if args.noise_floor:
                threads = [o for o in overrides if o != "run.threads=1"] + ["run.threads=2"]
                other, _ = _run(folder, f"{key}-threads2", recipe, threads, 1, args.keep_dropout)
                floor = max(abs(a[k] - b[k]) for a, b in zip(single, other) for k in loss_keys)
                print(f"  noise floor: 1 process, 2 threads vs 1: largest |diff| {floor:.1e}")


if __name__ == "__main__":
    main()
