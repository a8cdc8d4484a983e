"""Does data loading keep up with training? Clips/s of the input pipeline vs the model's step rate.

The pipeline is what the trainer runs per item: decode (soundfile) + resample to the encoder's
rate + crop/pad + collate + tokenize, measured through :class:`mtrun.data.loader.BatchLoader`
with 0 and 2 DataLoader workers. The model side is forward + backward + optimizer step of a
system on the same batch size: the testkit's toy system by default, or the system a recipe
builds (``--recipe``). Both are measured in this run and printed as ratios (pipeline clips/s
÷ clips/s the model consumes): above 1 the pipeline keeps up.

    python benchmarks/data_throughput.py                      # synthetic WAV/FLAC set
    python benchmarks/data_throughput.py --manifest demo/manifest.csv
    python benchmarks/data_throughput.py --recipe recipes/quickstart.toml --profile tiny
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def synthetic_manifest(folder: Path, n: int, seconds: float) -> Path:
    """``n`` noisy chords at mixed rates (44.1/48/22.05 kHz), half WAV and half FLAC, stereo and mono."""
    import numpy as np
    import soundfile

    rng = np.random.default_rng(0)
    lines = ["id,audio,caption,split"]
    for i in range(n):
        rate = (44100, 48000, 22050)[i % 3]
        t = np.arange(int(rate * seconds)) / rate
        chord = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(110, 880, 3)) / 3
        data = (0.3 * chord + 0.01 * rng.standard_normal(len(t))).astype("float32")
        if i % 2:
            data = np.stack([data, data[::-1]], axis=1)
        ext = "flac" if i % 2 else "wav"
        soundfile.write(folder / f"clip{i}.{ext}", data, rate)
        lines.append(f"clip{i},clip{i}.{ext},synthetic chord {i},train")
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def toy_system():
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tests" / "testkit" / "src"))
    from toyrun import build_system

    return build_system(seed=0)


def recipe_system(recipe: str, profile: str | None):
    from mtrun.assemble import assemble
    from mtrun.runner import prepare

    resolved, run = prepare(recipe, overrides=['run.name="benchmark-data-throughput"', f'run.output_dir="{tempfile.mkdtemp()}"'], profile=profile)
    return assemble(resolved, run).system


def pipeline_rate(samples, system, *, batch_size: int, clip_seconds: float, workers: int, batches: int) -> float:
    """Clips/s through the BatchLoader (first batch excluded: worker start-up)."""
    from mtrun.data.loader import BatchLoader
    from mtrun.run import LoaderConfig

    loader = BatchLoader(
        samples,
        config=LoaderConfig(clip_seconds=clip_seconds, crop="random", num_workers=workers, probe_items=0),
        sample_rate=system.audio_encoder.sample_rate,
        tokenize=system.text_encoder.tokenize,
        batch_size=batch_size,
        seed=0,
    )
    seen, epoch, start = 0, 0, None
    while seen < batches + 1:
        for _, _, _batch in loader.micro_batches(epoch):
            seen += 1
            if seen == 1:
                start = time.perf_counter()
            if seen == batches + 1:
                break
        epoch += 1
    return batches * batch_size / (time.perf_counter() - start)


def model_rate(system, *, batch_size: int, clip_seconds: float, steps: int) -> float:
    """Clips/s the model consumes: forward + backward + AdamW step on random audio."""
    import torch

    from mtrun.interfaces import AugmentContext, Batch

    rate = system.audio_encoder.sample_rate
    texts = [f"a short caption number {i}" for i in range(batch_size)]
    batch = Batch(
        ids=[str(i) for i in range(batch_size)],
        waveforms=0.1 * torch.randn(batch_size, int(rate * clip_seconds)),
        texts=texts,
        tags=[{}] * batch_size,
        groups=[None] * batch_size,
        text_inputs=system.text_encoder.tokenize(texts),
    )
    params = [p for p in system.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    system.train()

    def step(i: int) -> None:
        context = AugmentContext(step=i, epoch=0, steps_per_epoch=steps, total_steps=steps, training=True,
                                 generator=torch.Generator().manual_seed(i))
        loss, _ = system(Batch(batch), context)
        if optimizer is not None:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    step(0)  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        step(i + 1)
    return steps * batch_size / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", help="a manifest to read (e.g. the demo corpus); default: a synthetic set")
    parser.add_argument("--split", default="train")
    parser.add_argument("--recipe", help="measure this recipe's system instead of the toy one")
    parser.add_argument("--profile", help="recipe profile")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--clip-seconds", type=float, default=5.0)
    parser.add_argument("--batches", type=int, default=8, help="batches timed per pipeline setting")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed")
    parser.add_argument("--items", type=int, default=160, help="synthetic clips to write")
    args = parser.parse_args(argv)

    import torch

    from mtrun.data.sources.manifest import ManifestSource

    torch.manual_seed(0)
    system = recipe_system(args.recipe, args.profile) if args.recipe else toy_system()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(args.manifest) if args.manifest else synthetic_manifest(Path(tmp), args.items, args.clip_seconds * 1.5)
        samples = ManifestSource(ManifestSource.Config(path=str(manifest))).load(args.split)
        print(f"data: {manifest} ({len(samples)} items, split {args.split}); model: {args.recipe or 'testkit toy system'} "
              f"at {system.audio_encoder.sample_rate} Hz; batch {args.batch_size}, clips of {args.clip_seconds:g} s")
        model = model_rate(system, batch_size=args.batch_size, clip_seconds=args.clip_seconds, steps=args.steps)
        print(f"model step rate:        {model:9.1f} clips/s  (ratio 1.00, the baseline)")
        for workers in (0, 2):
            rate = pipeline_rate(samples, system, batch_size=args.batch_size, clip_seconds=args.clip_seconds,
                                 workers=workers, batches=args.batches)
            verdict = "keeps up" if rate >= model else "is the bottleneck"
            print(f"pipeline, {workers} workers:   {rate:9.1f} clips/s  (ratio {rate / model:.2f} of the model's rate: data {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
