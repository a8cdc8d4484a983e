"""Peak memory and time of one training step with the gradient cache (docs/performance.md).

The quickstart's model (MAViL ViT tiny on 2.56 s crops, RoBERTa-layout tiny text encoder, MLP
projectors, SpecAugment, InfoNCE), random weights and inputs, one training step (forward,
backward, AdamW) in each of these, each in a fresh subprocess so that no run inherits another's
allocator state:

* ``plain-64``: batch 64 in one piece, the baseline every ratio is taken against;
* ``cache-512``: batch 512 as 8 micro-batches of 64 through the gradient cache (exact InfoNCE
  over all 512);
* ``accum-512``: batch 512 as 8 micro-batches of 64, plain gradient accumulation (InfoNCE over
  each 64 only): the memory the cache should match, and its time baseline;
* ``full-512``: batch 512 in one piece: what the cache computes, at the memory it avoids.

Memory, two measures, both of one step after a warm-up step on 2 items (optimizer state and
lazy kernels allocated):

* **tensors**: the largest number of bytes of live CPU tensors during the step, from the torch
  profiler's memory events (``profile_memory=True``, the "Total Allocated" of each event),
  plus the step's input batch. This is what the gradient cache changes: activations of one
  micro-batch instead of all.
* **RSS**: the rise of the process's resident memory (Linux ``VmHWM`` after resetting it
  through ``/proc/self/clear_refs``, minus ``VmRSS`` before the inputs were made): what a
  user sees, allocator slack included.

The inputs of the whole step are held in both: the loader delivers a step's micro-batches
together, and the re-run needs them. On a GPU they stay in host memory and only one
micro-batch is on the device at a time, so there the device's peak is the activations' alone.

    .venv/bin/python benchmarks/gradient_cache.py              # ~1-2 min on 2 cores
    .venv/bin/python benchmarks/gradient_cache.py --repeats 5  # steps timed per configuration (3)
    python benchmarks/gradient_cache.py --device cuda          # on a GPU: its peak allocation
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from plain_loop import cpu_report  # noqa: E402 - benchmarks/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name: (items per step, micro-batch, mode)
    "plain-64": (64, 64, "plain"),
    "cache-512": (512, 64, "cache"),
    "accum-512": (512, 64, "accum"),
    "full-512": (512, 512, "plain"),
}
MIB = 2**20
DEVICE = "cpu"
"""Where the model trains (``--device``); inputs stay in host memory and each micro-batch is
moved there when its turn comes, as the trainer does."""


# ------------------------------------------------------------------------------ child


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _model():
    import torch

    from mtrun.assemble import assemble_model
    from mtrun.runner import prepare

    # Only the model is built: nothing is written to the run folder.
    out = Path(tempfile.gettempdir()) / "gc-bench"
    resolved, run = prepare(str(ROOT / "recipes" / "quickstart.toml"), [f'run.output_dir="{out}"', "eval=[]"])
    torch.manual_seed(0)
    return assemble_model(resolved, run).train(), run.loader.clip_seconds


def _micros(system, seconds: float, items: int, micro: int, seed: int):
    import torch

    from mtrun import Batch

    gen = torch.Generator().manual_seed(seed)
    words = "slow fast ballad reel piano fiddle strings voice warm bright minor major drums soft loud".split()
    batches = []
    for start in range(0, items, micro):
        n = min(micro, items - start)
        texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=gen)) for _ in range(n)]
        rate = system.audio_encoder.sample_rate
        batches.append(
            Batch(
                ids=[f"item-{start + i}" for i in range(n)],
                waveforms=0.1 * torch.randn(n, int(seconds * rate), generator=gen),
                texts=texts,
                tags=[{} for _ in range(n)],
                groups=[None] * n,
                text_inputs=system.text_encoder.tokenize(texts),
            )
        )
    return batches


def _input_bytes(micros) -> int:
    import torch

    total = 0
    for batch in micros:
        for value in batch.values():
            for t in value.values() if isinstance(value, dict) else [value]:
                if torch.is_tensor(t):
                    total += t.numel() * t.element_size()
    return total


def _step(system, optimizer, micros, mode: str, step: int) -> None:
    import contextlib

    import torch

    from mtrun import AugmentContext, Batch
    from mtrun.train.gradient_cache import gradient_cache_step
    from mtrun.train.rng import derive_seed, seed_everything

    def context(m: int) -> AugmentContext:
        gen = torch.Generator().manual_seed(derive_seed(0, "augment-step", step, m, 0))
        return AugmentContext(step=step, epoch=0, steps_per_epoch=100, total_steps=100, training=True, generator=gen)

    def fresh(batch: Batch) -> Batch:
        # What the trainer's move to the device makes: a new Batch that encode may fill,
        # dropped after the micro-batch (filling the loader's own would keep features alive).
        def move(v):
            return v.to(DEVICE, non_blocking=True) if torch.is_tensor(v) else v

        return Batch({k: {kk: move(vv) for kk, vv in v.items()} if isinstance(v, dict) else move(v) for k, v in batch.items()})

    seed_everything(derive_seed(0, "step", step, 0))
    optimizer.zero_grad(set_to_none=True)
    if mode == "cache":
        gradient_cache_step(system, micros, prepare=fresh, context=context, autocast=contextlib.nullcontext)
    else:
        for m, batch in enumerate(micros):
            loss, _ = system(fresh(batch), context(m))
            (loss / len(micros)).backward()
            del loss
    optimizer.step()


def memory_child(name: str, threads: int) -> dict:
    import torch
    import torch.profiler as tp

    torch.set_num_threads(threads)
    items, micro, mode = CONFIGS[name]
    system, seconds = _model()
    system = system.to(DEVICE)
    optimizer = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=1e-4)
    _step(system, optimizer, _micros(system, seconds, 2, 2, seed=99), "plain", 0)  # warm-up
    if DEVICE != "cpu":  # the device's own count: the inputs wait in host memory
        micros = _micros(system, seconds, items, micro, seed=1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        _step(system, optimizer, micros, mode, 1)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"name": name, "items": items, "micro": micro, "mode": mode, "inputs_mib": _input_bytes(micros) / MIB,
                "device_peak_mib": peak / MIB, "device_step_mib": (peak - held) / MIB}

    # RSS: the rise over the resident memory before the step's inputs exist.
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    micros = _micros(system, seconds, items, micro, seed=1)
    inputs = _input_bytes(micros)
    _step(system, optimizer, micros, mode, 1)
    rss_peak = _status("VmHWM") - before

    # Tensors: the profiler's count of live bytes allocated during a step, plus the inputs.
    with tp.profile(activities=[tp.ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(system, optimizer, micros, mode, 2)
    with tempfile.TemporaryDirectory(prefix="gc-bench-") as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    allocated = max((e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]"), default=0)

    return {
        "name": name,
        "items": items,
        "micro": micro,
        "mode": mode,
        "inputs_mib": inputs / MIB,
        "tensor_peak_mib": (inputs + allocated) / MIB,
        "rss_peak_mib": rss_peak / MIB,
    }


def timing_child(repeats: int, threads: int) -> dict[str, float]:
    """Median seconds per step of every configuration, timed in one process in alternation, so
    that the load of a shared machine falls on all of them alike."""
    import torch

    torch.set_num_threads(threads)
    system, seconds = _model()
    system = system.to(DEVICE)
    optimizer = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=1e-4)
    inputs = {name: _micros(system, seconds, items, micro, seed=1) for name, (items, micro, _) in CONFIGS.items()}
    _step(system, optimizer, _micros(system, seconds, 2, 2, seed=99), "plain", 0)  # warm-up
    sync = torch.cuda.synchronize if DEVICE != "cpu" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for r in range(repeats):
        for name, (_, _, mode) in CONFIGS.items():
            sync()
            start = time.perf_counter()
            _step(system, optimizer, inputs[name], mode, 1 + r)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------------------ parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (1: steady on shared cores)")
    parser.add_argument("--child", choices=sorted(CONFIGS) + ["timing"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu, or cuda: the device's peak allocation instead of host memory")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not args.child:
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible here")
    if args.child == "timing":
        print(json.dumps(timing_child(args.repeats, args.threads)))
        return 0
    if args.child:
        print(json.dumps(memory_child(args.child, args.threads)))
        return 0

    print(cpu_report())
    print(f"model: recipes/quickstart.toml (random weights), fp32, {args.threads} torch thread(s) per child")
    results = {}
    for name in [*CONFIGS, "timing"]:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name, "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", DEVICE],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return 1
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, seconds in results.pop("timing").items():
        results[name]["step_s"] = seconds
    base = results["plain-64"]
    if DEVICE != "cpu":
        import torch

        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
        print("| step | items | micro-batch | inputs MiB (host) | device peak MiB | × plain-64 | step's own MiB | × plain-64 | step s | × plain-64 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, r in results.items():
            print(
                f"| {name} | {r['items']} | {r['micro']} | {r['inputs_mib']:.1f} | {r['device_peak_mib']:.1f} | "
                f"{r['device_peak_mib'] / base['device_peak_mib']:.2f} | {r['device_step_mib']:.1f} | "
                f"{r['device_step_mib'] / base['device_step_mib']:.2f} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} |"
            )
        cache = results["cache-512"]
        print(f"peak device memory, batch 512 with the gradient cache vs batch 64 (target <= 1.2x): "
              f"{cache['device_peak_mib'] / base['device_peak_mib']:.2f}x (the step's own: "
              f"{cache['device_step_mib'] / base['device_step_mib']:.2f}x)")
        if args.json:
            args.json.write_text(json.dumps({"cpu": cpu_report(), "device": torch.cuda.get_device_name(), "results": results}, indent=2))
        return 0
    print()
    print("| step | items | micro-batch | inputs MiB | tensors peak MiB | × plain-64 | RSS rise MiB | × plain-64 | step s | × plain-64 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['items']} | {r['micro']} | {r['inputs_mib']:.1f} | {r['tensor_peak_mib']:.1f} | "
            f"{r['tensor_peak_mib'] / base['tensor_peak_mib']:.2f} | {r['rss_peak_mib']:.1f} | "
            f"{r['rss_peak_mib'] / base['rss_peak_mib']:.2f} | {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f} |"
        )
    cache, accum, full = results["cache-512"], results["accum-512"], results["full-512"]
    working = (cache["tensor_peak_mib"] - cache["inputs_mib"]) / (base["tensor_peak_mib"] - base["inputs_mib"])
    print()
    print(f"peak memory, batch 512 with the gradient cache vs batch 64 (target <= 1.2x): "
          f"tensors {cache['tensor_peak_mib'] / base['tensor_peak_mib']:.2f}x, without the held inputs "
          f"{working:.2f}x, RSS {cache['rss_peak_mib'] / base['rss_peak_mib']:.2f}x")
    print(f"vs batch 512 in one piece: tensors {cache['tensor_peak_mib'] / full['tensor_peak_mib']:.2f}x")
    print(f"time per step: cache-512 / accum-512 {cache['step_s'] / accum['step_s']:.2f}x, "
          f"cache-512 / full-512 {cache['step_s'] / full['step_s']:.2f}x, cache-512 / plain-64 {cache['step_s'] / base['step_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_report(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
