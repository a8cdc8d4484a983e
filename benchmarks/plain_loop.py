"""mtrun's trainer against a plain PyTorch loop on the quickstart's model and data.

Trains the model of ``recipes/quickstart.toml`` (FLAP tiny: MAViL ViT ``tiny``, ``tiny-roberta``
text, MLP projectors, InfoNCE with a learnable temperature, SpecAugment, batch 32, the demo
corpus) for ``--steps`` steps two ways in one process:

* **mtrun**: the recipe assembled and trained by mtrun's own trainer, exactly as
  ``mtrun recipes/quickstart.toml`` builds it (validation and the test evaluation switched off;
  the one checkpoint at the end is outside the timed steps); with the recipe's
  ``[loader] cache = "features"`` its loader worker reads each crop's fbank frames from the
  feature cache (built by the first run on the machine, before any timed step);
* **plain**: a hand-written loop over the same modules (built from the same recipe and seed) that
  reads log-mels computed once for the whole training split (that precompute is timed and
  printed separately), crops them at random, applies SpecAugment and InfoNCE written inline,
  and steps ``torch.optim.AdamW`` — what a user would write by hand.

The two alternate (mtrun, plain, mtrun, plain, ... for ``--rounds``), so drift in the load of a
shared machine hits both alike. Printed: samples/s of each over the steps after ``--warmup``,
the ratio mtrun / plain (the target is >= 0.9), and where mtrun's step time goes, from timers
wrapped around the trainer's and the system's stages (monkeypatched here; core is untouched):
waiting for the DataLoader, fbank, SpecAugment, encoders, projectors, objective, backward,
optimizer and the rest (trainer bookkeeping). Decoding runs in the DataLoader worker, so it is
measured separately in this process (decode + crop, tokenize) per batch.

On a shared machine give both loops one thread (``--plain-threads 1``; mtrun's auto already
picks 1 beside its worker): two OpenMP threads on busy cores make the plain loop crawl. The
main-thread CPU columns are the figures a busy machine does not distort.

    python benchmarks/plain_loop.py --plain-threads 1      # 60 steps each, 2 rounds, fp32
    python benchmarks/plain_loop.py --precision bf16 --steps 100
    python benchmarks/plain_loop.py --threads 1 --workers 0
    python benchmarks/plain_loop.py --keep-logmels /tmp/logmels.pt   # reuse the precompute
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.toml"


# ---------------------------------------------------------------------- machine


def cpu_report() -> str:
    """One line: CPU model, bf16 hardware, cores this process may use, torch threads, load."""
    import torch
    from mtrun.train.trainer import cpu_has_fast_bf16

    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from mtrun.train.trainer import cpu_bf16_hardware

    hardware = cpu_bf16_hardware() or {}
    amx, avx512bf16 = hardware.get("amx", False), hardware.get("avx512_bf16", False)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"cpu: {model}; AMX {'yes' if amx else 'no'}, AVX512-BF16 {'yes' if avx512bf16 else 'no'} "
        f"(cpu_has_fast_bf16: {cpu_has_fast_bf16()}); cores usable {len(os.sched_getaffinity(0))} of "
        f"{os.cpu_count()}; torch threads {torch.get_num_threads()}; load average {load:.2f}; torch {torch.__version__}"
    )


# ---------------------------------------------------------------------- timers


class Stages:
    """Seconds spent per named stage (inclusive), summed over the timed steps: wall time, and the
    main thread's CPU time (which a busy machine's preemption does not inflate; with one torch
    thread the operators run on the main thread)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.on = False

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        """Replace ``owner.attr`` (an instance's method or a module's function) by a timed call."""
        inner = getattr(owner, attr)
        stages = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not stages.on:
                return inner(*args, **kwargs)
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                stages.seconds[name] += time.perf_counter() - start
                stages.cpu[name] += time.thread_time() - cpu

        setattr(owner, attr, timed)

    @contextlib.contextmanager
    def time(self, name: str):
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            if self.on:
                self.seconds[name] += time.perf_counter() - start
                self.cpu[name] += time.thread_time() - cpu


# ---------------------------------------------------------------------- mtrun


def resolve_quickstart(out: Path, name: str, steps: int, precision: str, threads: int | None, workers: int | None):
    """The quickstart recipe for ``steps`` steps with validation and test evaluation off."""
    from mtrun.runner import prepare

    overrides = [
        f'run.output_dir="{out}"',
        f'run.name="{name}"',
        f"trainer.max_steps={steps}",
        f'trainer.precision="{precision}"',
        'trainer.val_split="none"',  # no such split: no validation pass at the end
        f"trainer.log_every={steps}",
        "trainer.checkpoint_every=0",
    ]
    if threads is not None:
        overrides.append(f"run.threads={threads}")
    if workers is not None:
        overrides.append(f"loader.num_workers={workers}")
    return prepare(RECIPE, overrides=overrides)


def build(resolved, run):
    import torch
    from mtrun.assemble import assemble

    torch.manual_seed(run.config.seed)  # as mtrun.runner.train does
    return assemble(resolved, run)


def run_mtrun(out: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train with mtrun's trainer; samples/s over the steps after the warm-up and the stages."""
    import warnings

    import torch
    import mtrun.train.trainer as trainer_module

    # The timers wrap optimizer.step after the trainer made its LambdaLR, which torch notices.
    warnings.filterwarnings("ignore", re.escape("Seems like `optimizer.step()` has been overridden"), UserWarning)

    from mtrun.runner import apply_threads

    resolved, run = resolve_quickstart(out, name, args.steps, args.precision, args.threads, args.workers)
    threads, _ = apply_threads(run)  # as `mtrun RECIPE` does
    built = build(resolved, run)
    trainer, system = built.trainer, built.system
    stages = Stages()
    exits: list[float] = []
    cpu: list[float] = []

    # The trainer's stages (instance attributes shadow the class's methods).
    step_inner = trainer._step

    def step(fit, b, micros):
        if len(exits) == args.warmup:
            stages.on = True
            torch.set_num_threads(threads)  # what apply_threads chose, whatever ran in between
        step_inner(fit, b, micros)
        exits.append(time.perf_counter())
        cpu.append(time.thread_time())

    trainer._step = step
    stages.wrap(trainer, "_forward_backward", "forward+backward+metrics")
    stages.wrap(trainer, "_log", "log")
    stages.wrap(trainer_module, "_seed_step", "reseed")
    data_loaders = trainer._data_loaders

    def loaders(*a, **k):
        loader, val_loader, val_samples = data_loaders(*a, **k)
        batches = loader.global_batches

        def timed_batches(epoch, start=0):
            iterator = batches(epoch, start)
            while True:
                with stages.time("wait for data"):
                    item = next(iterator, None)
                if item is None:
                    return
                yield item

        loader.global_batches = timed_batches
        return loader, val_loader, val_samples

    trainer._data_loaders = loaders
    make_optimizer = trainer._optimizer

    def optimizer(*a, **k):
        opt, scheduler = make_optimizer(*a, **k)
        if opt is not None:
            stages.wrap(opt, "step", "optimizer")
            stages.wrap(scheduler, "step", "lr schedule")
        return opt, scheduler

    trainer._optimizer = optimizer
    # The system's stages.
    stages.wrap(system, "forward", "model forward (all)")
    stages.wrap(system.audio_encoder, "preprocess", "fbank")
    augment = system._augment

    def timed_augment(stage, value, context):
        with stages.time(f"augment:{stage}"):
            return augment(stage, value, context)

    system._augment = timed_augment
    stages.wrap(system.audio_encoder, "forward", "audio encoder")
    stages.wrap(system.text_encoder, "forward", "text encoder")
    stages.wrap(system.audio_projector, "forward", "projectors")
    stages.wrap(system.text_projector, "forward", "projectors")
    for entry in system.objectives:
        stages.wrap(entry.objective, "forward", "objective")
    backward = torch.Tensor.backward

    def timed_backward(self, *a, **k):
        with stages.time("backward"):
            return backward(self, *a, **k)

    torch.Tensor.backward = timed_backward
    try:
        start = time.perf_counter()
        built.trainer.fit()
        total = time.perf_counter() - start
    finally:
        torch.Tensor.backward = backward
    timed = len(exits) - args.warmup
    span = exits[-1] - exits[args.warmup - 1]
    decode = decode_costs(trainer, system, args.batch_probe) if args.batch_probe else {}
    return {
        "samples_per_s": timed * trainer.config.batch_size / span,
        "step_s": span / timed,
        "cpu_s": (cpu[-1] - cpu[args.warmup - 1]) / timed,
        "stages": {k: v / timed for k, v in stages.seconds.items()},
        "cpu_stages": {k: v / timed for k, v in stages.cpu.items()},
        "fit_s": total,
        "decode": decode,
        "threads": torch.get_num_threads(),
        "workers": run.loader.num_workers,
        "precision": trainer.precision,
    }


def decode_costs(trainer, system, batches: int) -> dict[str, float]:
    """Main-thread CPU time per batch, in this process: the clips (``BatchLoader._prepare``: decode + crop, or
    ``_prepare_frames``: read the crops' frames from the feature cache), tokenize, and the whole ``make_batch``
    (what the DataLoader worker does for every batch, the fbank included when the trainer hands it the
    encoder's preprocess)."""
    from mtrun.data.loader import BatchLoader
    from mtrun.train.trainer import loader_frame_features, loader_preprocess

    cfg, run = trainer.config, trainer.run
    samples = trainer.data.load(cfg.train_split)
    frame_features = loader_frame_features(system, run.loader)
    loader = BatchLoader(
        samples, config=run.loader, sample_rate=system.audio_encoder.sample_rate, tokenize=system.text_encoder.tokenize,
        batch_size=cfg.batch_size, training=True, augmenters=system.sample_augmenters, seed=run.config.seed,
        **({"frame_features": frame_features} if frame_features is not None else {"preprocess": loader_preprocess(system, "cpu")}),
    )
    loader.config = type(run.loader)(**{**{f: getattr(run.loader, f) for f in ("clip_seconds", "crop", "pad", "cache")}, "probe_items": 0})
    loader.steps_per_epoch = loader.num_batches
    seconds = collections.defaultdict(float)
    clips = "_prepare_frames" if frame_features is not None else "_prepare"
    label = "read frames (feature cache)" if frame_features is not None else "decode+crop"
    prepare, tokenize = getattr(loader, clips), loader.tokenize

    def timed_prepare(*a, **k):
        start = time.thread_time()
        try:
            return prepare(*a, **k)
        finally:
            seconds[label] += time.thread_time() - start

    def timed_tokenize(*a, **k):
        start = time.thread_time()
        try:
            return tokenize(*a, **k)
        finally:
            seconds["tokenize"] += time.thread_time() - start

    setattr(loader, clips, timed_prepare)
    loader.tokenize = timed_tokenize
    order = loader.order(7)  # an epoch the timed run did not read, so the page cache is as cold as it is
    for b in range(batches):
        indices = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        start = time.thread_time()
        loader.make_batch(indices, epoch=7, batch_index=b)  # with the fbank, when the worker makes it
        seconds["make_batch (all)"] += time.thread_time() - start
    return {k: v / batches for k, v in seconds.items()}


# ---------------------------------------------------------------------- plain loop


def precompute(samples, encoder) -> tuple[Any, float]:
    """Log-mels ``[N, frames, 128]`` of every training clip, whole, normalised as mavil does."""
    import soundfile
    import torch
    from mtrun_mavil.encoder import NORM_MEAN, NORM_STD
    from mtrun_mavil.fbank import kaldi_fbank

    start = time.perf_counter()
    feats = []
    chunk = 64
    for i in range(0, len(samples), chunk):
        waves = []
        for s in samples[i : i + chunk]:
            data, rate = soundfile.read(str(s.audio), dtype="float32", always_2d=True)
            assert rate == encoder.sample_rate, "the demo corpus is 16 kHz; this loop does not resample"
            waves.append(torch.from_numpy(data.mean(1)))
        length = min(w.shape[0] for w in waves)
        x = torch.stack([w[:length] for w in waves])
        x = x - x.mean(-1, keepdim=True)
        with torch.no_grad():
            fb = kaldi_fbank(x, encoder.mel_banks, encoder.window, encoder.sample_rate)
        feats.append(((fb - NORM_MEAN) / (2 * NORM_STD)))
    frames = min(f.shape[1] for f in feats)
    return torch.cat([f[:, :frames] for f in feats]), time.perf_counter() - start


class PlainData:
    """What the plain loop reads: the precomputed log-mels and every caption tokenized once."""

    def __init__(self, samples, system, keep: Path | None = None):
        import torch

        if keep is not None and keep.exists():  # a rerun: the precompute's time is the first run's
            saved = torch.load(keep, weights_only=True)
            self.features, self.feature_s = saved["features"], float(saved["seconds"])
        else:
            self.features, self.feature_s = precompute(samples, system.audio_encoder)
            if keep is not None:
                torch.save({"features": self.features, "seconds": torch.tensor(self.feature_s)}, keep)
        start = time.perf_counter()
        texts, owner = [], []
        for i, s in enumerate(samples):
            for caption in s.captions or [", ".join(t for ts in s.tags.values() for t in ts)]:
                texts.append(caption)
                owner.append(i)
        tokens = system.text_encoder.tokenize(texts)
        self.input_ids, self.attention_mask = tokens["input_ids"], tokens["attention_mask"]
        self.lengths = self.attention_mask.sum(1)
        self.caption_index: list[list[int]] = [[] for _ in samples]
        for row, i in enumerate(owner):
            self.caption_index[i].append(row)
        self.tokenize_s = time.perf_counter() - start
        self.n = len(samples)


def run_plain(data: PlainData, resolved, run, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    built = build(resolved, run)
    system = built.system.train()
    audio_enc, text_enc = system.audio_encoder, system.text_encoder
    audio_proj, text_proj = system.audio_projector, system.text_projector
    target_length, batch = audio_enc.target_length, 32
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [p for m in (audio_enc, text_enc, audio_proj, text_proj) for p in m.parameters() if p.requires_grad] + [log_scale]
    optimizer = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.999), weight_decay=0.0)
    warmup, total = 30, args.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(run.config.seed)
    stages = Stages()
    frames = data.features.shape[1]
    exits, cpu = [], []
    order = torch.randperm(data.n, generator=generator)
    position = 0
    for step in range(total):
        stages.on = step >= args.warmup
        with stages.time("data"):
            if position + batch > data.n:
                order, position = torch.randperm(data.n, generator=generator), 0
            idx = order[position : position + batch]
            position += batch
            starts = torch.randint(0, frames - target_length + 1, (batch,), generator=generator)
            feats = torch.stack([data.features[i, s : s + target_length] for i, s in zip(idx.tolist(), starts.tolist())])
            # SpecAugment: one time band (< 48 frames) and one frequency band (< 48 bins) per item.
            u = torch.rand(batch, 4, generator=generator)
            tw, fw = (u[:, 0] * 48).floor(), (u[:, 1] * 48).floor()
            t0, f0 = (u[:, 2] * (target_length - tw)).floor(), (u[:, 3] * (128 - fw)).floor()
            t = torch.arange(target_length)[None]
            f = torch.arange(128)[None]
            masked = ((t >= t0[:, None]) & (t < (t0 + tw)[:, None]))[:, :, None] | ((f >= f0[:, None]) & (f < (f0 + fw)[:, None]))[:, None, :]
            feats = feats.masked_fill(masked, 0.0).unsqueeze(1)
            rows = torch.tensor([data.caption_index[i][int(torch.randint(len(data.caption_index[i]), (), generator=generator))] for i in idx.tolist()])
            width = int(data.lengths[rows].max())
            ids, mask = data.input_ids[rows, :width], data.attention_mask[rows, :width]
        with stages.time("forward"):
            with autocast:
                with stages.time("audio encoder"):
                    audio_out = audio_enc(feats)
                with stages.time("text encoder"):
                    text_out = text_enc(ids, mask)
                a, t_out = audio_proj(audio_out), text_proj(text_out)
            a, t_emb = F.normalize(a.float(), dim=-1), F.normalize(t_out.float(), dim=-1)
            logits = log_scale.clamp(max=math.log(100)).exp() * a @ t_emb.T
            target = torch.arange(batch)
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        with stages.time("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with stages.time("optimizer"):
            optimizer.step()
            scheduler.step()
        if (step + 1) % 50 == 0:
            float(loss.detach())  # a plain loop looks at its loss now and then
        exits.append(time.perf_counter())
        cpu.append(time.thread_time())
    timed = total - args.warmup
    span = exits[-1] - exits[args.warmup - 1]
    return {
        "samples_per_s": timed * batch / span,
        "step_s": span / timed,
        "cpu_s": (cpu[-1] - cpu[args.warmup - 1]) / timed,
        "stages": {k: v / timed for k, v in stages.seconds.items()},
        "cpu_stages": {k: v / timed for k, v in stages.cpu.items()},
        "loss": float(loss.detach()),
        "system": system,  # the trained modules, for benchmarks/budget_recall.py's evaluation
    }


# ---------------------------------------------------------------------- one step, interleaved


def model_probe(resolved, run, reference, args: argparse.Namespace) -> dict[str, list[float]]:
    """Forward + backward of one fixed batch, alternating: mtrun's ``System`` on the batch's
    waveforms (fbank, SpecAugment, encoders, projectors, InfoNCE plugin, metrics) / the plain
    path on the same batch's log-mels (computed once) / the fbank alone. Interleaving step by
    step makes the three see the same load, so their differences are the framework's and the
    fbank's, not the machine's mood."""
    import torch
    import torch.nn.functional as F
    from mtrun.data.loader import BatchLoader
    from mtrun.interfaces import AugmentContext, Batch

    import attrs

    trainer, system_ref = reference.trainer, reference.system
    loader = BatchLoader(  # waveforms, whatever the recipe's cache: the probe times the fbank on them
        trainer.data.load("train")[: trainer.config.batch_size], config=attrs.evolve(run.loader, cache="waveforms"),
        sample_rate=system_ref.audio_encoder.sample_rate, tokenize=system_ref.text_encoder.tokenize,
        batch_size=trainer.config.batch_size, training=True, seed=run.config.seed,
    )
    batch = loader.make_batch(list(range(trainer.config.batch_size)))
    mtrun_system = build(resolved, run).system.train()
    plain = build(resolved, run).system.train()
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    with torch.no_grad():
        features = plain.audio_encoder.preprocess(batch.waveforms)
    ids, mask = batch.text_inputs["input_ids"], batch.text_inputs["attention_mask"]
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext

    def mtrun_step() -> None:
        context = AugmentContext(step=0, epoch=0, steps_per_epoch=1, total_steps=1, training=True, generator=torch.Generator().manual_seed(0))
        with autocast():
            loss, _ = mtrun_system(Batch(dict(batch)), context)
        loss.float().backward()
        for q in mtrun_system.parameters():
            q.grad = None

    def plain_step() -> None:
        with autocast():
            a = plain.audio_projector(plain.audio_encoder(features))
            t = plain.text_projector(plain.text_encoder(ids, mask))
        a, t = F.normalize(a.float(), dim=-1), F.normalize(t.float(), dim=-1)
        logits = log_scale.clamp(max=math.log(100)).exp() * a @ t.T
        target = torch.arange(len(a))
        (0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))).backward()
        for q in plain.parameters():
            q.grad = None

    def fbank() -> None:
        with torch.no_grad():
            plain.audio_encoder.preprocess(batch.waveforms)

    times: dict[str, list[float]] = {"mtrun System step": [], "plain step": [], "fbank": []}
    runs = {"mtrun System step": mtrun_step, "plain step": plain_step, "fbank": fbank}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.probe_repeats):
        for name, fn in runs.items():
            start = time.thread_time()  # CPU time: a busy machine's preemption does not count
            fn()
            times[name].append(time.thread_time() - start)
    return times


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per training run (each of mtrun and plain, per round)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps of each run left out of the timing")
    parser.add_argument("--rounds", type=int, default=2, help="mtrun, plain alternations")
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="run.threads for mtrun (default: the recipe's); the plain loop uses what mtrun set")
    parser.add_argument("--plain-threads", type=int, default=0, help="threads for the plain loop (0 = PyTorch's default, one per usable core)")
    parser.add_argument("--workers", type=int, default=None, help="loader.num_workers for mtrun (default: the recipe's)")
    parser.add_argument("--keep-logmels", type=Path, default=None, help="save the plain loop's log-mels here and reuse them on reruns")
    parser.add_argument("--probe-repeats", type=int, default=10, help="interleaved one-batch forward+backward repeats (0 = skip)")
    parser.add_argument("--batch-probe", type=int, default=4, help="batches built in this process to time decoding and tokenizing")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    import torch
    from mtrun.runner import apply_threads, usable_cores

    out = Path(tempfile.mkdtemp(prefix="mtrun-plain-loop-"))
    resolved, run = resolve_quickstart(out, "plain", args.steps, args.precision, args.threads, args.workers)
    chosen, why = apply_threads(run)
    plain_threads = args.plain_threads or usable_cores()  # PyTorch's default: one per usable core
    reference = build(resolved, run)
    if args.precision == "auto":  # as mtrun's trainer settles it, once, for both loops
        from mtrun.train.trainer import settle_precision

        clip = round(run.loader.clip_seconds * reference.system.audio_encoder.sample_rate)
        args.precision = settle_precision("auto", torch.device("cpu"), reference.system, batch_size=32, clip_samples=clip)
    print(cpu_report())
    print(f"threads: mtrun {chosen} ({why}), plain loop {plain_threads}; precision: {args.precision}; steps per run {args.steps} (first {args.warmup} untimed); "
          f"batch 32; rounds {args.rounds}, alternating mtrun / plain", flush=True)
    samples = reference.data.load("train")
    data = PlainData(samples, reference.system, args.keep_logmels)
    print(f"plain loop's precompute (once, not in its samples/s): log-mels of {data.n} clips {data.feature_s:.1f} s "
          f"({tuple(data.features.shape)}, {data.features.numel() * 4 / 2**20:.0f} MiB); "
          f"{len(data.input_ids)} captions tokenized {data.tokenize_s:.2f} s", flush=True)

    results: dict[str, list[dict[str, Any]]] = {"mtrun": [], "plain": []}
    for r in range(args.rounds):
        m = run_mtrun(out, f"mtrun-{r}", args)
        results["mtrun"].append(m)
        print(f"round {r}: mtrun {m['samples_per_s']:6.1f} samples/s ({m['step_s'] * 1e3:.0f} ms/step, main thread CPU "
              f"{m['cpu_s'] * 1e3:.0f} ms/step; threads "
              f"{m['threads']}, workers {m['workers']}, {m['precision']}); load {os.getloadavg()[0]:.2f}", flush=True)
        torch.set_num_threads(plain_threads)
        p = run_plain(data, resolved, run, args)
        results["plain"].append(p)
        print(f"round {r}: plain {p['samples_per_s']:6.1f} samples/s ({p['step_s'] * 1e3:.0f} ms/step, CPU "
              f"{p['cpu_s'] * 1e3:.0f} ms/step); "
              f"ratio mtrun/plain {m['samples_per_s'] / p['samples_per_s']:.3f}; load {os.getloadavg()[0]:.2f}", flush=True)

    ratios = [m["samples_per_s"] / p["samples_per_s"] for m, p in zip(results["mtrun"], results["plain"])]
    cpu_ratios = [p["cpu_s"] / m["cpu_s"] for m, p in zip(results["mtrun"], results["plain"])]
    ms = statistics.median(m["samples_per_s"] for m in results["mtrun"])
    ps = statistics.median(p["samples_per_s"] for p in results["plain"])
    print(f"\nsamples/s (median of {args.rounds}): mtrun {ms:.1f}, plain {ps:.1f}; ratio mtrun/plain per round "
          f"{', '.join(f'{x:.3f}' for x in ratios)} (target >= 0.9); main-thread CPU per step plain/mtrun "
          f"{', '.join(f'{x:.3f}' for x in cpu_ratios)} (the ratio the machine's load does not distort)")

    def table(title: str, rows: list[tuple[str, Callable[[dict], float], int]], runs: list[dict]) -> None:
        """Per round: wall ms and its share of the step's wall time, then main-thread CPU ms
        and its share of the step's main-thread CPU time."""
        print(f"\n{title}")
        print(f"  {'':<54}" + "".join(f"{'round ' + str(r) + ': wall':>18}{'CPU':>18}" for r in range(len(runs))))
        for name, value, depth in rows:
            cells = ""
            for run in runs:
                cpu_run = {**run, "stages": run["cpu_stages"], "step_s": run["cpu_s"]}
                cells += f"{value(run) * 1e3:9.1f} ms {value(run) / run['step_s']:5.0%}"
                cells += f"{value(cpu_run) * 1e3:9.1f} ms {value(cpu_run) / run['cpu_s']:5.0%}"
            print(f"  {'  ' * depth}{name:<{54 - 2 * depth}}{cells}")

    def st(key: str) -> Callable[[dict], float]:
        return lambda run: run["stages"].get(key, 0.0)

    inner = ("fbank", "augment:features", "audio encoder", "text encoder", "projectors", "objective")

    def system_glue(run: dict) -> float:
        return st("model forward (all)")(run) - sum(v for k, v in run["stages"].items() if k in inner or k.startswith("augment:"))

    def trainer_glue(run: dict) -> float:
        return st("forward+backward+metrics")(run) - st("model forward (all)")(run) - st("backward")(run)

    top = ("wait for data", "reseed", "forward+backward+metrics", "optimizer", "lr schedule", "log")
    table(
        "mtrun, per step (inclusive timers; indented = inside the line above; wall and main-thread CPU time):",
        [
            ("step", lambda run: run["step_s"], 0),
            ("wait for data (DataLoader)", st("wait for data"), 0),
            ("reseed the global RNGs (_seed_step)", st("reseed"), 0),
            ("forward+backward+metrics", st("forward+backward+metrics"), 0),
            ("model forward (all)", st("model forward (all)"), 1),
            ("fbank (audio_encoder.preprocess; 0 with the loader's features)", st("fbank"), 2),
            ("SpecAugment", st("augment:features"), 2),
            ("audio encoder", st("audio encoder"), 2),
            ("text encoder", st("text encoder"), 2),
            ("projectors", st("projectors"), 2),
            ("objective (InfoNCE)", st("objective"), 2),
            ("system glue (other augment stages, checks, std)", system_glue, 2),
            ("backward", st("backward"), 1),
            ("trainer glue (to_device, loss read-back)", trainer_glue, 1),
            ("optimizer", st("optimizer"), 0),
            ("lr schedule", st("lr schedule"), 0),
            ("log", st("log"), 0),
            ("rest (on_step_end, collapse, due checks)", lambda run: run["step_s"] - sum(run["stages"].get(k, 0.0) for k in top), 0),
        ],
        results["mtrun"],
    )
    table(
        "plain loop, per step:",
        [
            ("step", lambda run: run["step_s"], 0),
            ("data (crop, SpecAugment, token rows)", st("data"), 0),
            ("forward", st("forward"), 0),
            ("audio encoder", st("audio encoder"), 1),
            ("text encoder", st("text encoder"), 1),
            ("backward", st("backward"), 0),
            ("optimizer + lr schedule", st("optimizer"), 0),
        ],
        results["plain"],
    )
    m_step = statistics.mean(m["step_s"] for m in results["mtrun"])
    if args.probe_repeats:
        torch.set_num_threads(chosen)
        times = model_probe(resolved, run, reference, args)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\none fixed batch, forward + backward, interleaved {args.probe_repeats}x (median main-thread CPU time; no data loading, no optimizer):")
        for k, v in med.items():
            print(f"  {k:<52} {v * 1e3:8.1f} ms  ({v / med['plain step']:.2f} x plain step)")
        rest = med["mtrun System step"] - med["plain step"] - med["fbank"]
        print(f"  {'mtrun − plain − fbank (system glue, InfoNCE plugin, metrics)':<52} {rest * 1e3:8.1f} ms  ({rest / med['plain step']:.2f} x plain step)")
    decode = {k: statistics.mean(m["decode"][k] for m in results["mtrun"]) for k in results["mtrun"][0]["decode"]}
    if decode:
        print("\nmtrun's data path per batch of 32, CPU time in this process (the DataLoader worker does this for every batch):")
        for k, v in decode.items():
            print(f"  {k:<52} {v * 1e3:8.2f} ms")
        m_cpu = statistics.mean(m["cpu_s"] for m in results["mtrun"])
        p_cpu = statistics.mean(p["cpu_s"] for p in results["plain"])
        total = m_cpu + (decode["make_batch (all)"] if results["mtrun"][0]["workers"] else 0.0)
        print(f"CPU per step, all processes: mtrun {total * 1e3:.1f} ms (main thread {m_cpu * 1e3:.1f} + loader "
              f"{(total - m_cpu) * 1e3:.1f}), plain {p_cpu * 1e3:.1f} ms; plain/mtrun {p_cpu / total:.3f}")


if __name__ == "__main__":
    main()
