"""What the frozen-encoder feature cache buys: DuET-MC epoch time, uncached vs cached.

Builds the DuET-MC ``tiny`` profile on the demo corpus twice from the recipe, once without an
encoder cache and once with a fresh :class:`mtrun.encoder_cache.EncoderCache` (its epoch 1
fills the cache, epochs 2+ hit it), and trains both for the same epochs on the same batches.
The two runs' epochs alternate (uncached epoch 1, cached epoch 1, uncached epoch 2, ...) so a
shared machine's changing load falls on both alike; a third loader, no model, times the data
pipeline alone: the floor a cached epoch cannot go below. Each step is the trainer's: the
loader's global batches, the System's loss under the trainer's precision (``auto``: bf16 on
CPUs with fast bf16), backward, the recipe's optimizer, ``on_step_end``. Every figure is a
ratio to the uncached run's mean epoch in this run.

Crops must repeat for a cache to hit: ``loader.crop = "start"`` here (the profile's
``random`` crop draws a new offset every epoch; see docs/performance.md). The cached run's
loader is wired as the trainer wires it (``served_items``): from epoch 2 a clip whose frozen
MERT outputs the cache holds is sent as zeros, not decoded, and served by its item key from the
cache's item store (memory-mapped files on disk, read a batch at a time).

    python benchmarks/encoder_cache.py                      # the tiny profile as it is (CLIP-T trains)
    python benchmarks/encoder_cache.py --lock-text          # CLIP-T locked too, as in the paper
    python benchmarks/encoder_cache.py --lock-text --n-items 120 --batch-size 8 \
        --override 'audio_encoder.preset="95m"'             # a frozen encoder that dominates the step
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from plain_loop import cpu_report  # noqa: E402 - benchmarks/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]


def overrides(args: argparse.Namespace, out: Path, name: str) -> list[str]:
    extra = [f'run.name="{name}"', f'run.output_dir="{out}"', f'loader.crop="{args.crop}"', "~eval"]
    if args.n_items:
        extra.append(f"data.n_items={args.n_items}")
    if args.batch_size:
        extra.append(f"trainer.batch_size={args.batch_size}")
    if args.lock_text:
        extra.append("text_encoder.frozen=true")
    return extra + list(args.override)


class Training:
    """One system with its loader and optimizer, trained an epoch at a time."""

    def __init__(self, args: argparse.Namespace, out: Path, name: str, cache: Any = None, model: bool = True, precision: str | None = None):
        import torch

        from mtrun.assemble import assemble
        from mtrun.data.loader import BatchLoader
        from mtrun.runner import apply_threads, prepare
        from mtrun.train.trainer import settle_precision

        resolved, run = prepare(args.recipe, overrides(args, out, name), profile=args.profile)
        apply_threads(run)
        torch.manual_seed(run.config.seed)
        built = assemble(resolved, run, encoder_cache=cache)
        self.system, self.cache, self.model = built.system.train(), cache, model
        cfg = built.trainer.config
        self.seed, self.grad_accum = run.config.seed, cfg.grad_accum
        self.loader = BatchLoader(
            built.data.load(cfg.train_split),
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            training=True,
            augmenters=self.system.sample_augmenters,
            config=run.loader,
            sample_rate=self.system.audio_encoder.sample_rate,
            tokenize=self.system.text_encoder.tokenize,
            seed=run.config.seed,
        )
        self.loader.served_items = self.system.served_items  # as the trainer does: served clips are not decoded
        self.steps = self.loader.num_batches
        self.total = self.loader.total_steps = args.epochs * self.steps
        self.loader.steps_per_epoch = self.steps
        self.optimizer = cfg.optimizer.build(model=self.system) if model else None
        # auto, timed as the trainer times it, once (on the uncached run's System) for all runs
        self.precision = precision or settle_precision(cfg.precision, torch.device("cpu"), self.system,
                                                       batch_size=max(1, cfg.batch_size // cfg.grad_accum), clip_samples=self.loader.clip_samples)

    def epoch(self, epoch: int) -> float:
        """Seconds for one epoch (the model's steps, or only the batches without a model)."""
        start = time.perf_counter()
        for b, micros in self.loader.global_batches(epoch):
            if self.model:
                self.step(epoch, b, micros)
        return time.perf_counter() - start  # the cache's disk writes go on in the background, as in training

    def step(self, epoch: int, b: int, micros: list[Any]) -> None:
        import torch

        from mtrun.interfaces import AugmentContext
        from mtrun.train.rng import derive_seed

        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if self.precision == "bf16" else contextlib.nullcontext
        step = epoch * self.steps + b
        self.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        for m, micro in enumerate(micros):
            context = AugmentContext(
                step=step, epoch=epoch, steps_per_epoch=self.steps, total_steps=self.total, training=True,
                generator=torch.Generator().manual_seed(derive_seed(self.seed, "augment-step", step, m, 0)),
                item_seeds=[derive_seed(self.seed, "augment-item", step, i) for i in micro["ids"]],
                batch_seed=derive_seed(self.seed, "augment-batch", step, m),
            )
            with autocast():
                loss, _ = self.system(copy.copy(micro), context)
            (loss.float() / len(micros)).backward()
        self.optimizer.step()  # type: ignore[union-attr]
        self.system.on_step_end(step, self.total)

    def served_step(self, epoch: int, repeats: int = 10) -> float:
        """Seconds of one step whose every encoder output is served: epoch ``epoch``'s first
        batch, replayed (the same clips and the same captions, so the text hits too). What is
        left is the trainable part (aggregator, projectors, loss, backward, optimizer)."""
        b, micros = next(iter(self.loader.global_batches(epoch)))
        self.step(epoch, b, micros)  # the captions into the cache
        start = time.perf_counter()
        for _ in range(repeats):
            self.step(epoch, b, micros)
        return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "duet_mc.toml"))
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-items", type=int, default=0, help="demo corpus subset (0 = all)")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = the recipe's")
    parser.add_argument("--crop", default="start", choices=("start", "center", "random"))
    parser.add_argument("--lock-text", action="store_true", help="lock CLIP-T as the paper does (the tiny profile trains it)")
    parser.add_argument("--override", action="append", default=[], help="further recipe overrides (key=value)")
    args = parser.parse_args(argv)

    from mtrun.encoder_cache import EncoderCache

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cache = EncoderCache(out / "encoder-cache")
        uncached = Training(args, out, "uncached")
        runs = {
            "uncached": uncached,
            "cached": Training(args, out, "cached", cache, precision=uncached.precision),
            "data only": Training(args, out, "data-only", model=False, precision=uncached.precision),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for epoch in range(args.epochs):
            for name, run in runs.items():
                times[name].append(run.epoch(epoch))
            print(f"epoch {epoch + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
        served = runs["cached"].served_step(args.epochs - 1)
        start = time.perf_counter()
        cache.flush()
        backlog = time.perf_counter() - start
        files = list((out / "encoder-cache").rglob("*.safetensors"))
        size = sum(p.stat().st_size for p in files)
        stores = list((out / "encoder-cache" / "items").glob("*/index.tsv"))
        store_size = sum(p.stat().st_size for s in stores for p in s.parent.iterdir())

    uncached, cached, data = times["uncached"], times["cached"], times["data only"]
    base = statistics.mean(uncached)
    steps = runs["uncached"].steps
    print()
    print(cpu_report())
    text = "locked" if args.lock_text else "trains (tiny profile)"
    print(
        f"{Path(args.recipe).name} --profile {args.profile} {' '.join(args.override)}: crop={args.crop}, "
        f"{steps} steps/epoch, precision {runs['uncached'].precision}, CLIP-T {text}; "
        f"cached: {', '.join(runs['cached'].system.cached_modules) or 'nothing'}"
    )
    print(f"{'epoch':>5}  {'uncached s':>10}  {'cached s':>9}  {'data only s':>11}  {'uncached mean / cached':>22}")
    for e, (u, c, d) in enumerate(zip(uncached, cached, data), 1):
        print(f"{e:>5}  {u:>10.2f}  {c:>9.2f}  {d:>11.2f}  {base / c:>21.2f}x")
    if len(cached) > 1:
        ratio = base / statistics.mean(cached[1:])
        print(f"epochs 2+: {ratio:.2f}x faster than uncached (epoch 1, filling: {base / cached[0]:.2f}x)")
        print(f"issue 13 target, >= 10x from the second epoch: {'reached' if ratio >= 10 else 'not reached'}")
    print(f"data pipeline alone: {base / statistics.mean(data):.2f}x the uncached epoch rate (the ceiling)")
    print(
        f"a step with every encoder output served (one batch replayed, captions too): {served * 1e3:.0f} ms; "
        f"an epoch of such steps: {base / (served * steps):.2f}x the uncached epoch rate (the trainable part's ceiling)"
    )
    for label, stats in cache.stats.items():
        print(f"  {label}: {stats}")
    print(
        f"  on disk: {len(files)} entries by content, {size / 2**20:.1f} MiB; {len(stores)} item stores, "
        f"{store_size / 2**20:.1f} MiB; the writes still queued after the last epoch took {backlog:.2f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
