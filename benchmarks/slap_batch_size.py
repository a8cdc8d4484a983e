"""SLAP vs the CLAP baseline on the demo corpus: batch size, modality gap, memory (docs/slap.md).

Batch size (the default): trains ``recipes/slap.toml`` and ``recipes/clap.toml`` (their tiny
profiles) at global batch 8, 32 and 128, each reached by accumulating micro-batches of 8, for
the same number of epochs, and evaluates the final weights on the held-out test split:
text→music R@10, the modality gap (centroid distance, audio-vs-text logistic-regression
accuracy). With accumulation BYOL's gradient is the whole batch's; InfoNCE's softmax only ever
sees the 8 items of a micro-batch. Prints a Markdown table (mean and 95% t-interval over seeds)
and writes every run's numbers to ``OUT/results.json``; runs that already have an
``eval-test-*/eval.json`` are reused, so an interrupted sweep continues where it stopped.

    python benchmarks/slap_batch_size.py --seeds 0 1 2 --epochs 3 --out runs/slap-batch
    python benchmarks/slap_batch_size.py --audio htsat     # the profiles' own HTS-AT tiny (10 s, slower)
    python benchmarks/slap_batch_size.py --memory          # peak memory of a step, both objectives

``--audio mavil`` (default) swaps the profiles' HTS-AT tiny (10 s at 48 kHz, ~24 samples/s on
a 2-core CPU) for the quickstart's MAViL tiny on 2.56 s crops (~4x faster), so that the sweep
fits a CPU session; everything else is the recipes' tiny profile.

Memory (``--memory``): what one training step of each objective holds at the same micro-batch,
counted tensor by tensor (a CPU has no allocator statistics, and a process's resident memory
is mostly libraries): weights (EMA targets included), gradients and AdamW state of the
trainable ones, and the tensors autograd saves for the backward pass. ``--scale paper`` builds
the paper's model sizes at random initialisation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from plain_loop import cpu_report  # noqa: E402 - benchmarks/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
METHODS = ("slap", "clap")
MICRO = 8
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
MAVIL = [
    'audio_encoder={type="mavil", preset="tiny", pretrained=""}',
    "loader.clip_seconds=2.56",
    'augmenter=[{type="specaugment", time_mask_width=48, freq_mask_width=48}]',
]


def overrides(method: str, batch: int, seed: int, args: argparse.Namespace, out: Path) -> list[str]:
    return [
        f"run.output_dir={out}",
        f"run.name={method}-b{batch}-seed{seed}",
        f"run.seed={seed}",
        *(MAVIL if args.audio == "mavil" else []),
        f"trainer.batch_size={batch}",
        f"trainer.grad_accum={batch // MICRO}",
        "trainer.max_steps=0",
        f"trainer.epochs={args.epochs}",
        "trainer.schedule.warmup_steps=0",
        f"trainer.schedule.warmup_epochs={args.epochs / 10}",  # SLAP: warm-up over the first tenth
        "trainer.precision=fp32",  # the same numbers on every CPU (auto picks bf16 where it is fast)
        "trainer.eval_every=0",
        "trainer.log_every=50",
        'trainer.val_split="none"',
        f'eval=[{{type="retrieval", bootstrap={args.bootstrap}}}, {{type="modality-gap"}}]',
        *args.set,
    ]


def run_one(method: str, batch: int, seed: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    run_dir = out / f"{method}-b{batch}-seed{seed}"
    found = sorted(run_dir.glob("eval-test-*/eval.json"))
    if not found:
        cmd = [str(Path(sys.executable).parent / "mtrun"), str(RECIPES / f"{method}.toml"), "--profile", "tiny"]
        cmd += overrides(method, batch, seed, args, out)
        print("$", " ".join(f"'{c}'" if any(x in c for x in ' [{"') else c for c in cmd[1:]), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({method}, batch {batch}, seed {seed}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
        found = sorted(run_dir.glob("eval-test-*/eval.json"))
    metrics = json.loads(found[-1].read_text())["metrics"]
    return {
        "R@10": float(metrics["retrieval/t2a/R@10"]),
        "a2t R@10": float(metrics["retrieval/a2t/R@10"]),
        "centroid distance": float(metrics["modality-gap/centroid_distance"]),
        "logreg accuracy": float(metrics["modality-gap/logreg_accuracy"]),
        "n_items": float(metrics["retrieval/n_items"]),
    }


def mean_ci(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def table(results: dict[str, dict[str, dict[str, float]]], seeds: list[int], batches: list[int]) -> str:
    columns = ("R@10", "a2t R@10", "centroid distance", "logreg accuracy")
    lines = [
        "| objective | global batch | micro-batches | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    n_items = None
    for method in METHODS:
        for batch in batches:
            runs = [results[method][f"{batch}/{s}"] for s in seeds if f"{batch}/{s}" in results.get(method, {})]
            if not runs:
                continue
            n_items = runs[0]["n_items"]
            cells = []
            for column in columns:
                mean, half = mean_ci([r[column] for r in runs])
                cells.append(f"{mean:.3f} ± {half:.3f}" if column == "logreg accuracy" else f"{mean:.2f} ± {half:.2f}")
            lines.append(f"| {method} | {batch} | {batch // MICRO} × {MICRO} | " + " | ".join(cells) + " |")
    lines.append("")
    if n_items:
        lines.append(
            f"Text→music (R@10) and music→text (a2t R@10) recall in %, mean ± 95% t-interval half-width over "
            f"seeds {seeds}; {int(n_items)} test clips (chance R@10 ≈ {1000 / n_items:.1f}%). Modality gap: "
            "distance of the normalised audio and text centroids; held-out accuracy of a logistic regression "
            "telling audio from text embeddings (0.5 = no gap)."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- memory


def step_memory(method: str, args: argparse.Namespace) -> dict[str, float]:
    """Bytes one training step holds at its peak, counted tensor by tensor (CPUs have no
    allocator statistics): the weights (EMA targets included), the gradients and AdamW's two
    moments of the trainable ones, and every tensor autograd saves for the backward pass of one
    micro-batch (deduplicated by storage)."""
    import torch

    from mtrun import Batch
    from mtrun.assemble import assemble
    from mtrun.runner import prepare

    overrides = [f"run.output_dir={args.out / 'memory'}", f"run.name={method}-memory", "eval=[]"]
    if args.scale == "paper":  # the paper's models at random initialisation (no hub here)
        from mtrun_hf_text.tiny_tokenizers import build_tiny_tokenizer  # an offline byte-level BPE

        tokenizer = args.out / "memory" / "tokenizer"
        build_tiny_tokenizer("roberta").save_pretrained(str(tokenizer))
        overrides += ["audio_encoder.preset=htsat-base", 'audio_encoder.pretrained=""', 'text_encoder.pretrained=""',
                      "text_encoder.preset=roberta-base", f'text_encoder.tokenizer="{tokenizer}"', "loader.clip_seconds=10.0",
                      "text_encoder.pooling=pooler"]
        if method == "slap":
            overrides += ["audio_projector.hidden_sizes=[512]", "audio_projector.dim=512", "text_projector.dim=512",
                          "text_projector.hidden_sizes=[512]", "objective.0.audio_predictor.hidden_sizes=[4096]",
                          "objective.0.audio_predictor.dim=512", "objective.0.text_predictor.hidden_sizes=[4096]",
                          "objective.0.text_predictor.dim=512"]
        else:
            overrides += ["audio_projector.dim=512", "text_projector.dim=512"]
    elif args.audio == "mavil":
        overrides += MAVIL
    resolved, run = prepare(str(RECIPES / f"{method}.toml"), overrides, "tiny", False, None)
    torch.manual_seed(0)
    system = assemble(resolved, run).system.train()
    seconds = run.loader.clip_seconds
    rate = system.audio_encoder.sample_rate
    # A caption long enough to fill SLAP's 128 tokens (max_length truncates it).
    texts = [" ".join(["a slow ballad on piano with soft strings and a warm voice"] * 20)] * args.memory_batch
    batch = Batch(waveforms=torch.randn(args.memory_batch, int(seconds * rate)) * 0.1, texts=texts,
                  text_inputs=system.text_encoder.tokenize(texts))
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = system(batch)
    loss.backward()
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in system.parameters()}
    weights.update({b.data_ptr(): b.numel() * b.element_size() for b in system.buffers()})
    trainable = sum(p.numel() * p.element_size() for p in system.parameters() if p.requires_grad)
    mib = 2**20
    return {
        "weights": sum(weights.values()) / mib,
        "gradients + AdamW state": 3 * trainable / mib,
        "saved activations": sum(saved.values()) / mib,
        "total": (sum(weights.values()) + 3 * trainable + sum(saved.values())) / mib,
    }


def memory(args: argparse.Namespace) -> None:
    rows = {method: step_memory(method, args) for method in METHODS}
    size = "paper-size models (HTS-AT base + RoBERTa-base, random init)" if args.scale == "paper" else f"tiny profiles ({args.audio} audio)"
    print(f"memory of one training step at micro-batch {args.memory_batch}, {size}, MiB:")
    print("| objective | " + " | ".join(rows["slap"]) + " |")
    print("|---|" + "---|" * len(rows["slap"]))
    for method, row in rows.items():
        print(f"| {method} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |")
    print("slap / clap: " + ", ".join(f"{k} {rows['slap'][k] / rows['clap'][k]:.2f}x" for k in rows["slap"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128], help=f"global batch sizes (multiples of {MICRO})")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--audio", default="mavil", choices=("mavil", "htsat"), help="audio encoder (see the module docstring)")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/slap-batch"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further recipe overrides for every run")
    parser.add_argument("--memory", action="store_true", help="measure peak memory per step instead")
    parser.add_argument("--memory-batch", type=int, default=MICRO)
    parser.add_argument("--scale", default="tiny", choices=("tiny", "paper"), help="--memory: the tiny profiles or paper-size models")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    print(cpu_report(), flush=True)
    if args.memory:
        memory(args)
        return 0
    if any(b % MICRO for b in args.batches):
        parser.error(f"--batches must be multiples of the micro-batch {MICRO}")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for seed in args.seeds:  # seed-major: a partial sweep still compares every setting
        for batch in args.batches:
            for method in args.methods:
                results.setdefault(method, {})[f"{batch}/{seed}"] = run_one(method, batch, seed, args, args.out)
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "results.json").write_text(
                    json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
                )
    print(table(results, args.seeds, args.batches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
