"""bf16 against fp32 on this CPU: the quickstart's step, a ViT-B step, and model FLOPs utilisation.

Measures in one run, interleaved (fp32, bf16, fp32, bf16, ...) so a shared machine's load hits
both alike, and prints every figure as a ratio to its baseline from the same run:

* the CPU's bf16 hardware (AMX, AVX512-BF16) and what ``precision = "auto"`` picks from it;
* the machine's matmul peak: FLOP/s of a large fp32 and a large bf16 matmul (best of repeats);
* the quickstart's training step (``recipes/quickstart.toml``: the System's forward — fbank,
  SpecAugment, encoders, projectors, InfoNCE — backward and AdamW step on one fixed batch of 32)
  under fp32 and under ``torch.autocast(bfloat16)``, as the trainer runs it;
* the mavil encoder's forward + backward (tiny at batch 32, ViT-B at ``--vit-batch``) in fp32, in
  bf16, and in bf16 with attention computed in float32 (patched in; see :func:`fp32_attention`);
* a ViT-B training step (MAViL ``base`` preset: 12 blocks of width 768 over 512 + 1 tokens from
  1024×128 fbank frames; forward, backward, AdamW) at ``--vit-batch``, both precisions, with its
  FLOPs counted by ``torch.utils.flop_counter`` and its model FLOPs utilisation (MFU) against
  the matmul peak of the same precision, measured above.

With ``--threads 1`` every time is the main thread's CPU time, which the preemption on a shared
machine does not inflate (the operators run on the calling thread); with more threads it is
wall time, so run those on an otherwise idle machine.

    python benchmarks/precision.py                    # threads: one per usable core
    python benchmarks/precision.py --threads 1 --vit-batch 1 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))


def clock() -> float:
    """Main-thread CPU time with one torch thread (a busy machine's preemption does not count;
    the operators run on the main thread), else wall time (CPU time would count spin-waiting)."""
    import torch

    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def matmul_flops(dtype, size: int, repeats: int) -> float:
    """Best FLOP/s of ``size``-square matmuls in ``dtype`` (the machine's attainable peak)."""
    import torch

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        torch.matmul(a, b)
        best = min(best, clock() - start)
    return 2 * size**3 / best


def width_matmuls(widths: tuple[int, ...], rows: int, repeats: int) -> dict[int, float]:
    """bf16/fp32 time of a ``[rows, d] @ [d, 4d]`` matmul (an MLP's first layer) per width ``d``:
    what a model of that width would see, measured in microseconds rather than a training step."""
    import torch

    ratios = {}
    for d in widths:
        a, b = torch.randn(rows, d), torch.randn(d, 4 * d)
        times = interleave({"fp32": lambda: torch.matmul(a, b), "bf16": lambda: torch.matmul(a.bfloat16(), b.bfloat16())}, repeats)
        ratios[d] = min(times["bf16"]) / min(times["fp32"])
    return ratios


def interleave(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn ``repeats`` times after one warm-up each."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def autocast(precision: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def quickstart_steps() -> dict[str, Callable[[], None]]:
    """One training step of the quickstart's System on a fixed batch, per precision (each its
    own copy of the model, from the same seed, so the two do not share optimizer state)."""
    import attrs
    import torch
    from mtrun.data.loader import BatchLoader
    from mtrun.interfaces import AugmentContext, Batch
    from plain_loop import build, resolve_quickstart

    out = Path(tempfile.mkdtemp(prefix="mtrun-precision-"))
    resolved, run = resolve_quickstart(out, "precision", 10, "fp32", None, 0)
    reference = build(resolved, run)
    trainer, system = reference.trainer, reference.system
    loader = BatchLoader(  # waveforms, whatever the recipe's cache: the step computes the fbank
        trainer.data.load("train")[: trainer.config.batch_size], config=attrs.evolve(run.loader, cache="waveforms"),
        sample_rate=system.audio_encoder.sample_rate, tokenize=system.text_encoder.tokenize,
        batch_size=trainer.config.batch_size, training=True, seed=run.config.seed,
    )
    batch = loader.make_batch(list(range(trainer.config.batch_size)))
    steps = {}
    for precision in ("fp32", "bf16"):
        model = build(resolved, run).system.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer, precision=precision) -> None:
            context = AugmentContext(step=0, epoch=0, steps_per_epoch=1, total_steps=1, training=True, generator=torch.Generator().manual_seed(0))
            with autocast(precision):
                loss, _ = model(Batch(dict(batch)), context)
            loss.float().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[precision] = step
    with torch.no_grad():
        features = system.audio_encoder.preprocess(batch.waveforms)
    ids, mask = batch.text_inputs["input_ids"], batch.text_inputs["attention_mask"]
    for precision in ("fp32", "bf16"):
        model = build(resolved, run).system.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def model_step(model=model, optimizer=optimizer, precision=precision) -> None:
            with autocast(precision):
                a = model.audio_projector(model.audio_encoder(features))
                t = model.text_projector(model.text_encoder(ids, mask))
            logits = torch.nn.functional.normalize(a.float(), dim=-1) @ torch.nn.functional.normalize(t.float(), dim=-1).T / 0.07
            target = torch.arange(len(logits))
            (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[f"model {precision}"] = model_step
    return steps


def vit_b(batch: int):
    """ViT-B training steps per precision, and the FLOPs of one forward + backward."""
    import torch
    from mtrun_mavil.encoder import MavilEncoder
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    encoder = MavilEncoder(MavilEncoder.Config(preset="base")).train()
    features = torch.randn(batch, 1, encoder.target_length, encoder.num_mel_bins)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)

    def forward_backward(precision: str) -> None:
        with autocast(precision):
            out = encoder(features)
        out.pooled.float().square().mean().backward()

    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward("fp32")
    encoder.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()

    def step(precision: str) -> None:
        forward_backward(precision)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {p: (lambda p=p: step(p)) for p in ("fp32", "bf16")}, flops, sum(p.numel() for p in encoder.parameters())


@contextlib.contextmanager
def fp32_attention():
    """Inside: CPU ``scaled_dot_product_attention`` on bf16 inputs runs in float32 and casts its
    output back (what docs/performance.md proposes for ``mtrun.nn.attention``), patched in here."""
    import torch
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        if q.device.type != "cpu" or q.dtype != torch.bfloat16:
            return original(q, k, v, *args, **kwargs)
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            kwargs["attn_mask"] = mask.float()
        with torch.autocast("cpu", enabled=False):
            return original(q.float(), k.float(), v.float(), *args, **kwargs).to(q.dtype)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def attention_experiment(preset: str, batch: int, repeats: int) -> dict[str, float]:
    """The mavil encoder's forward + backward: fp32, bf16, and bf16 with float32 attention;
    median times as ratios to fp32."""
    import torch
    from mtrun_mavil.encoder import MavilEncoder

    torch.manual_seed(0)
    encoder = MavilEncoder(MavilEncoder.Config(preset=preset)).train()
    features = torch.randn(batch, 1, encoder.target_length, encoder.num_mel_bins)

    def step(bf16: bool, patched: bool) -> None:
        with fp32_attention() if patched else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = encoder(features)
            out.pooled.float().square().mean().backward()
        encoder.zero_grad(set_to_none=True)

    runs = {"fp32": lambda: step(False, False), "bf16": lambda: step(True, False), "bf16, fp32 attention": lambda: step(True, True)}
    times = {k: statistics.median(v) for k, v in interleave(runs, repeats).items()}
    return {k: v / times["fp32"] for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per usable core, PyTorch's default)")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved repeats of each step")
    parser.add_argument("--vit-batch", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--skip-vit", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from mtrun.runner import usable_cores
    from mtrun.train.trainer import AUTO_BF16_MARGIN, cpu_has_fast_bf16
    from plain_loop import cpu_report

    torch.set_num_threads(args.threads or usable_cores())
    print(cpu_report())
    print("times are " + ("main-thread CPU time (one torch thread)" if torch.get_num_threads() == 1 else "wall time"))
    print('precision = "auto" on this CPU: ' + ("bf16 hardware, so the trainer times both precisions on the model at "
          f"start-up and keeps bf16 only below {AUTO_BF16_MARGIN}x fp32's time (the quickstart step below)" if cpu_has_fast_bf16() else "fp32 (no bf16 hardware)"))

    peaks = {}
    for _ in range(2):  # interleaved, best of both rounds
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peaks[name] = max(peaks.get(name, 0.0), matmul_flops(dtype, args.matmul_size, 3))
    print(f"matmul peak ({args.matmul_size}² square, best of 6): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s; bf16/fp32 {peaks['bf16'] / peaks['fp32']:.2f}", flush=True)

    widths = width_matmuls((64, 256, 768), 4096, 5)
    print("matmul [4096, d] @ [d, 4d], bf16/fp32 time: " + ", ".join(f"d={d} {r:.2f}" for d, r in widths.items()), flush=True)

    times = interleave(quickstart_steps(), args.repeats)
    q = {k: statistics.median(v) for k, v in times.items()}
    for what, f, b in (("the System's step (fbank included)", "fp32", "bf16"), ("the model alone (fbank precomputed)", "model fp32", "model bf16")):
        print(f"quickstart, {what}, batch 32, forward+backward+AdamW, median of {args.repeats}: fp32 {q[f] * 1e3:.0f} ms, "
              f"bf16 {q[b] * 1e3:.0f} ms; bf16/fp32 time {q[b] / q[f]:.2f} "
              f"(per repeat: {', '.join(f'{y / x:.2f}' for x, y in zip(times[f], times[b]))})", flush=True)

    experiments = [("tiny", 32)] + ([] if args.skip_vit else [("base", args.vit_batch)])
    for preset, batch in experiments:
        ratios = attention_experiment(preset, batch, args.repeats)
        print(f"mavil {preset} encoder forward+backward, batch {batch}, time as a ratio to fp32: "
              + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)

    if not args.skip_vit:
        steps, flops, params = vit_b(args.vit_batch)
        times = interleave(steps, args.repeats)
        v = {k: statistics.median(t) for k, t in times.items()}
        print(f"ViT-B step (batch {args.vit_batch}, {params / 1e6:.0f}M parameters, {flops / 1e9:.0f} GFLOP forward+backward; "
              f"median of {args.repeats}): fp32 {v['fp32']:.2f} s, bf16 {v['bf16']:.2f} s; bf16/fp32 time "
              f"{v['bf16'] / v['fp32']:.2f} (per repeat: {', '.join(f'{b / f:.2f}' for f, b in zip(times['fp32'], times['bf16']))})")
        for name in ("fp32", "bf16"):
            achieved = flops / v[name]
            print(f"  MFU {name}: {achieved / 1e9:.1f} GFLOP/s = {achieved / peaks[name]:.1%} of this run's {name} matmul peak "
                  f"({achieved / peaks['fp32']:.1%} of the fp32 peak)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
