"""Train a tiny System built from testkit components; the tests run this file as a script.

It is a script (not a fixture) because the acceptance tests kill training with SIGKILL and
launch it under torchrun. The testkit is not installed, so ``tests/testkit/src`` is put on
``sys.path`` here and components are built directly, without entry points.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE
if str(HERE / "testkit" / "src") not in sys.path:
    sys.path.insert(0, str(HERE / "testkit" / "src"))


def build_system(*, seed: int = 0, augment: bool = False, extra_augmenters=()):
    """A System of testkit components with parameters drawn from ``seed``."""
    import torch
    import mtrun_testkit as tk

    from mtrun.system import System, WeightedObjective

    torch.manual_seed(seed)
    audio = tk.ToyAudio(tk.ToyAudio.Config())
    text = tk.ToyText(tk.ToyText.Config())
    augmenters = [tk.ToyGain(tk.ToyGain.Config())] if augment else []
    return System(
        audio_encoder=audio,
        text_encoder=text,
        audio_projector=tk.ToyLinear(tk.ToyLinear.Config(), in_features=audio.output_dim),
        text_projector=tk.ToyLinear(tk.ToyLinear.Config(), in_features=text.output_dim),
        objectives=[WeightedObjective("contrastive", 1.0, tk.ToyContrastive(tk.ToyContrastive.Config()))],
        augmenters=augmenters + list(extra_augmenters),
    )


def build_trainer(
    run_dir,
    *,
    steps: int = 20,
    batch_size: int = 8,
    grad_accum: int = 2,
    checkpoint_every: int = 1,
    eval_every: int = 0,
    keep_last: int = 3,
    resume: str = "",
    seed: int = 0,
    augment: bool = True,
    n_items: int = 40,
    precision: str = "fp32",
    num_workers: int = 0,
    system=None,
    evals=(),
    optimizer=None,
):
    """A DefaultTrainer over ToyTones with every knob the tests turn.

    ``optimizer`` is a ``ComponentSpec``; by default AdamW at lr 1e-2. The schedule is a
    3-step warm-up and a cosine down to 0.1 of the peak.
    """
    import mtrun_testkit as tk

    from mtrun.run import LoaderConfig, Run, RunConfig
    from mtrun.spec import ComponentSpec
    from mtrun.train.optim import AdamW
    from mtrun.train.schedule import Cosine
    from mtrun.train.trainer import DefaultTrainer

    config = DefaultTrainer.Config(
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=steps,
        optimizer=optimizer or ComponentSpec.of("optimizer", "adamw", AdamW, AdamW.Config(lr=1e-2)),
        schedule=ComponentSpec.of("schedule", "cosine", Cosine, Cosine.Config(warmup_steps=3, min_lr_ratio=0.1)),
        grad_clip=1.0,
        precision=precision,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        keep_last=keep_last,
        log_every=1,
    )
    run = Run(
        dir=Path(run_dir),
        config=RunConfig(name="toy", seed=seed, resume=resume, device="cpu"),
        loader=LoaderConfig(clip_seconds=0.25, crop="random", num_workers=num_workers),
        recipe={"run": {"seed": seed}, "trainer": {"type": "default", "max_steps": steps}},
    )
    data = tk.ToyTones(tk.ToyTones.Config(n_items=n_items, seconds=0.5))
    system = system if system is not None else build_system(seed=seed, augment=augment)
    return DefaultTrainer(config, system=system, data=data, run=run, evals=evals)


def _gather_check(out: Path) -> None:
    """Check all_gather_with_grad against a single-process computation on the whole batch.

    Ranks hold different numbers of rows and each has its own loss, so the test catches a
    backward that averages instead of sums, or that returns the wrong slice.
    """
    import torch

    from mtrun import distributed

    r, n = distributed.rank(), distributed.world_size()
    sizes = [3 + i % 2 for i in range(n)]
    full = torch.randn(sum(sizes), 5, generator=torch.Generator().manual_seed(7))
    weights = [torch.randn(sum(sizes), 5, generator=torch.Generator().manual_seed(100 + k)) for k in range(n)]
    start = sum(sizes[:r])
    local = full[start : start + sizes[r]].clone().requires_grad_(True)
    gathered = distributed.all_gather_with_grad(local)
    (gathered.tanh() * weights[r]).sum().backward()
    reference = full.clone().requires_grad_(True)
    sum((reference.tanh() * w).sum() for w in weights).backward()
    expected = reference.grad[start : start + sizes[r]]
    result = {
        "rank": r,
        "world": n,
        "forward_equal": bool(torch.equal(gathered.detach(), full)),
        "grad_max_error": float((local.grad - expected).abs().max()),
    }
    (out / f"gather-rank{r}.json").write_text(json.dumps(result))


def run_toy(run_dir: Path, *args: str, timeout: float = 120, env: dict | None = None):
    """Run ``tests/toyrun.py`` to completion in a subprocess; fail with its output on error."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(HERE / "toyrun.py"), str(run_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, f"toyrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--resume", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--step-delay", type=float, default=0.0, help="sleep after each step, so a test can kill mid-run")
    parser.add_argument("--pause-checkpoint-at", type=int, default=0, help="hang while writing this step's checkpoint")
    parser.add_argument("--gather-check", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    if args.pause_checkpoint_at:
        from mtrun.train import checkpoint

        original = checkpoint._write_json
        target = f"step-{args.pause_checkpoint_at:06d}.tmp-"

        def hanging_write_json(path, data):
            original(path, data)
            if path.name == "trainer_state.json" and path.parent.name.startswith(target):
                (run_dir / "paused").write_text(str(path.parent))
                time.sleep(3600)

        checkpoint._write_json = hanging_write_json

    if args.gather_check:
        from mtrun import distributed

        distributed.init_from_env("cpu")
        _gather_check(run_dir)

    trainer = build_trainer(
        run_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
        resume=args.resume,
        seed=args.seed,
        augment=not args.no_augment,
    )
    if args.step_delay:
        hook = trainer.system.on_step_end

        def slow_on_step_end(step, total):
            hook(step, total)
            time.sleep(args.step_delay)

        trainer.system.on_step_end = slow_on_step_end
    result = trainer.fit()
    if int(os.environ.get("RANK", "0")) == 0:
        (run_dir / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
