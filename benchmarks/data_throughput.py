"""Does data loading keep up with training? Items/s of the input pipeline vs the training step's rate.

The pipeline is what the trainer runs per item, through :class:`mtrun.data.loader.BatchLoader`:
read the audio, crop/pad, collate, tokenize, and (as the trainer arranges it) the audio
encoder's features where the encoder lets the loader make them. It is measured in up to four
settings, in this run (each waveform setting also with the fbank in the worker, below):

* ``feature cache (warm)``: ``[loader] cache = "features"`` after the cache was built, for an
  encoder that declares ``frame_features`` (MAViL): each crop's frames are read, no fbank;
* ``waveform cache (warm)``: ``cache = "waveforms"`` after the cache was built (each build, a
  first-run cost, is timed and printed separately);
* ``uncached, span reads``: ``cache = "off"``, ``read = "span"`` (decode only each crop);
* ``uncached, whole files``: ``cache = "off"``, ``read = "whole"`` (decode the whole file, then
  crop: the loader before the cache).

The model side is one training step (forward + backward + AdamW, in the precision the trainer
would settle on, ``auto`` timed as it times it, and its thread count) on a batch of the same size
and clip length. Each waveform setting is measured twice when the encoder declares
``preprocess_in_loader`` (MAViL's fbank):

* as a data pipeline (read, crop, collate, tokenize) against a step that makes its own
  features, as on a GPU;
* as the trainer ships it on a CPU (``+ fbank``): the worker also computes the features,
  against a step on ready features, so the fbank is counted once, on the pipeline's side.

The feature cache is measured against the step on ready features. Every figure is printed as a
ratio to the rate (items/s) of the step that is left: at 3.0 or more the pipeline alone is at
least three times as fast as training needs (docs/performance.md). The CPU's name, cores and
bf16 capability are printed with the numbers.

    python benchmarks/data_throughput.py --recipe recipes/quickstart.toml      # the demo corpus
    python benchmarks/data_throughput.py                                       # synthetic set, toy model
    python benchmarks/data_throughput.py --manifest demo/manifest.csv

The cache is built in a temporary folder (``--cache-dir`` to choose one), so the build is
always cold and the machine's own cache is left alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from plain_loop import cpu_report  # noqa: E402 - benchmarks/ is the script's folder

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


def toy_setup(args):
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tests" / "testkit" / "src"))
    from toyrun import build_system

    from mtrun.run import LoaderConfig

    loader = LoaderConfig(clip_seconds=args.clip_seconds, crop="random", num_workers=args.workers if args.workers is not None else 2, probe_items=0)
    return build_system(seed=0), loader, args.batch_size or 16, "fp32", None


def recipe_setup(args):
    """The recipe's system, loader table, batch size, resolved precision and data source."""
    import attrs
    import torch

    from mtrun.assemble import assemble
    from mtrun.runner import apply_threads, prepare
    from mtrun.train.trainer import settle_precision

    overrides = ['run.name="benchmark-data-throughput"', f'run.output_dir="{tempfile.mkdtemp()}"']
    resolved, run = prepare(args.recipe, overrides=overrides, profile=args.profile)
    threads, why = apply_threads(run)
    print(f"threads: {threads} ({why})")
    built = assemble(resolved, run)
    trainer = built.trainer.config
    loader = attrs.evolve(run.loader, probe_items=0)
    if args.workers is not None:
        loader = attrs.evolve(loader, num_workers=args.workers)
    batch = args.batch_size or trainer.batch_size // max(1, getattr(trainer, "grad_accum", 1))
    clip = round(loader.clip_seconds * built.system.audio_encoder.sample_rate)  # auto: timed as the trainer times it
    precision = settle_precision(getattr(trainer, "precision", "fp32"), torch.device("cpu"), built.system, batch_size=batch, clip_samples=clip)
    return built.system, loader, batch, precision, built.data


def pipeline_rate(samples, system, loader_config, *, batch_size: int, batches: int, **features) -> float:
    """Items/s through the BatchLoader (the first batch is left out: worker start-up); ``features``:
    ``preprocess`` or ``frame_features`` as the trainer would hand them over."""
    from mtrun.data.loader import BatchLoader

    loader = BatchLoader(
        samples,
        config=loader_config,
        sample_rate=system.audio_encoder.sample_rate,
        tokenize=system.text_encoder.tokenize,
        batch_size=batch_size,
        seed=0,
        **features,
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


def model_rate(system, *, batch_size: int, clip_seconds: float, steps: int, precision: str, features_in_loader: bool) -> float:
    """Items/s one training step consumes: forward + backward + AdamW step on random audio (its
    features made beforehand when ``features_in_loader``: the loader makes them in training)."""
    import contextlib

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
    if features_in_loader:
        with torch.no_grad():
            batch.clean_features = system.audio_encoder.preprocess(batch.waveforms)
    params = [p for p in system.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    system.train()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step(i: int) -> None:
        context = AugmentContext(step=i, epoch=0, steps_per_epoch=steps, total_steps=steps, training=True,
                                 generator=torch.Generator().manual_seed(i))
        with autocast():
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
    parser.add_argument("--recipe", help="measure this recipe's system, loader settings and data (e.g. recipes/quickstart.toml)")
    parser.add_argument("--profile", help="recipe profile")
    parser.add_argument("--manifest", help="read this manifest instead (default: the recipe's data, or a synthetic set)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--items", type=int, default=256, help="items of the split to use (the first N); synthetic clips to write")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's micro-batch, or 16")
    parser.add_argument("--clip-seconds", type=float, default=5.0, help="without --recipe: the clip length")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the recipe's [loader].num_workers, or 2)")
    parser.add_argument("--batches", type=int, default=6, help="batches timed per pipeline setting")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed")
    parser.add_argument("--cache-dir", help="where to build the waveform cache (default: a temporary folder)")
    args = parser.parse_args(argv)

    import attrs
    import torch

    from mtrun.data.feature_cache import frame_features_for
    from mtrun.data.sources.manifest import ManifestSource
    from mtrun.errors import MtrunError
    from mtrun.train.trainer import loader_preprocess

    torch.manual_seed(0)
    print(cpu_report())
    system, loader_config, batch_size, precision, data = recipe_setup(args) if args.recipe else toy_setup(args)
    clip = loader_config.clip_seconds
    with tempfile.TemporaryDirectory() as tmp:
        if args.manifest or data is None:
            manifest = Path(args.manifest) if args.manifest else synthetic_manifest(Path(tmp), args.items, clip * 1.5)
            samples = ManifestSource(ManifestSource.Config(path=str(manifest))).load(args.split)
            where = str(manifest)
        else:
            samples = data.load(args.split)
            where = f"the recipe's [data] ({type(data).__name__})"
        samples = list(samples)[: args.items]
        print(f"data: {where}, split {args.split}, {len(samples)} items; model: {args.recipe or 'testkit toy system'} "
              f"at {system.audio_encoder.sample_rate} Hz, {precision}; batch {batch_size}, clips of {clip:g} s; "
              f"{loader_config.num_workers} loader workers")

        # What the trainer hands the loader: the encoder's frame features (feature cache) or preprocess.
        preprocess = loader_preprocess(system, "cpu")
        try:
            frame_features = frame_features_for(system.audio_encoder, system.augmenters)
        except MtrunError:
            frame_features = None
        print(f"features: {'feature cache measured; ' if frame_features is not None else ''}"
              f"{'the waveform settings without and with the fbank in the loader worker' if preprocess is not None else 'computed in the step'}")
        # Two step baselines: the step making its own features (as on a GPU, and the pipeline then
        # only reads, crops and tokenizes), and the step on features made beforehand (what the
        # feature cache, and a worker running the encoder's preprocess, leave to the step).
        steps: dict[bool, list[float]] = {False: [], True: []}

        def step() -> None:
            for made in steps if (preprocess is not None or frame_features is not None) else (False,):
                steps[made].append(model_rate(system, batch_size=batch_size, clip_seconds=clip, steps=args.steps,
                                              precision=precision, features_in_loader=made))

        step()

        os.environ["MTRUN_CACHE"] = args.cache_dir or str(Path(tmp) / "cache")
        from mtrun.data.loader import BatchLoader

        # (label, loader table, what the loader makes, whether the step is spared the features)
        settings = []
        if frame_features is not None:
            settings.append(("feature cache (warm)", attrs.evolve(loader_config, cache="features"), {"frame_features": frame_features}, True))
        for label, config in (
            ("waveform cache (warm)", attrs.evolve(loader_config, cache="waveforms")),
            ("uncached, span reads", attrs.evolve(loader_config, cache="off", read="span")),
            ("uncached, whole files", attrs.evolve(loader_config, cache="off", read="whole")),
        ):
            settings.append((label, config, {}, False))
            if preprocess is not None:
                settings.append((label + " + fbank", config, {"preprocess": preprocess}, True))
        builds = {}
        for label, config, features, _ in settings:
            if config.cache != "off" and config.cache not in builds:  # the cold build, once
                start = time.perf_counter()
                BatchLoader(samples, config=config, sample_rate=system.audio_encoder.sample_rate,
                            tokenize=system.text_encoder.tokenize, batch_size=batch_size, **features)
                builds[config.cache] = time.perf_counter() - start
        rates = {}
        for label, config, features, spared in settings:  # the steps are measured between the settings too
            rates[label] = (pipeline_rate(samples, system, config, batch_size=batch_size, batches=args.batches, **features), spared)
            step()
        # A shared machine only ever slows a measurement down: the fastest is each baseline.
        model = {made: max(rates_) for made, rates_ in steps.items() if rates_}
        for made, rate in model.items():
            what = "on features made beforehand" if made else "making its own features"
            print(f"training step, {what:<27} {rate:9.1f} items/s  (fastest of {', '.join(f'{x:.1f}' for x in steps[made])})")
        for cache, build in builds.items():
            name = {"features": "feature", "waveforms": "waveform"}[cache]
            print(f"{name + ' cache build (cold, once)':<34} {len(samples) / build:9.1f} items/s  ({len(samples)} files in "
                  f"{build:.1f} s, {max(1, loader_config.num_workers)} process(es), under {os.environ['MTRUN_CACHE']})")
        print("pipeline rate / the rate of the step that is left to do (≥ 3x: keeps up with room):")
        for label, (rate, spared) in rates.items():
            baseline = model[spared]
            verdict = "≥ 3x: keeps up with room" if rate >= 3 * baseline else ("keeps up" if rate >= baseline else "is the bottleneck")
            against = "the step on ready features" if spared else "the step making its features"
            print(f"  {label:<34} {rate:9.1f} items/s  ({rate / baseline:5.2f}x {against}: {verdict})")
        whole = rates["uncached, whole files"][0]
        print(", ".join(f"{label} / whole-file reads: {rate / whole:.2f}x" for label, (rate, spared) in rates.items()
                        if label != "uncached, whole files" and not spared))
    return 0


if __name__ == "__main__":
    sys.exit(main())
