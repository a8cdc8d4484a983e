"""TextSwap's cost: extra text-encoder inputs and time per step, with and without TextSwap.

DuET-MC's paper says TextSwap adds hard negatives at no extra cost. Each swapped caption is one
more text the text encoder must embed in that step, so the cost is the number of hard
negatives per step. This script draws real training batches of the demo corpus (its captions
and tags), applies TextSwap at the probability it reaches after the ramp (p = 0.15) with the
paper's count (``swaps = "per-category"``) and with ``swaps = "fraction"`` (0.1 of the batch
per swapped pair), and prints, per batch size:

* the mean number of hard negatives per step and as a share of the batch;
* the text encoder's time for the batch alone and for batch + hard negatives (CLIP-T at the
  ``tiny`` size on this CPU, same process, interleaved), as a ratio.

    python benchmarks/textswap_cost.py                   # B = 32, 256, 1024; 5 steps each
    python benchmarks/textswap_cost.py --batch 1024 --steps 10 --preset vit-b-32
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def cpu_line() -> str:
    from mtrun.train.trainer import cpu_has_fast_bf16

    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, fast bf16: {cpu_has_fast_bf16()}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def encode_seconds(encoder, texts: list[str], chunk: int = 256) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), chunk):
            inputs = encoder.tokenize(texts[i : i + chunk])
            encoder(inputs["input_ids"], inputs["attention_mask"])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    from mtrun import AugmentContext, Batch
    from mtrun_demo import DemoCorpus
    from mtrun_clip_text import ClipTextEncoder
    from mtrun_textswap.augmenter import TextSwap

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--preset", default="tiny", help="CLIP-T preset timed (random init)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(cpu_line())

    train = DemoCorpus(DemoCorpus.Config()).build()["train"]
    encoder = ClipTextEncoder(ClipTextEncoder.Config(preset=args.preset, pretrained="")).eval()
    modes = {
        "per-category": TextSwap(TextSwap.Config(p_max=0.15, warmup_epochs=0.0, ramp_epochs=0.0)),
        "fraction 0.1": TextSwap(TextSwap.Config(p_max=0.15, warmup_epochs=0.0, ramp_epochs=0.0, swaps="fraction")),
    }
    encode_seconds(encoder, [s.captions[0] for s in train[:64]])  # warm-up: first calls pay one-off costs
    print(f"text encoder: CLIP-T {args.preset}; p = 0.15 (after the ramp); demo corpus train split, {len(train)} items")
    print("| B | swaps | hard negatives / step | per pair | text inputs × | text-encoder time × |")
    print("|---|---|---|---|---|---|")
    for b in args.batch:
        for name, aug in modes.items():
            counts, ratios = [], []
            for step in range(args.steps):
                g = torch.Generator().manual_seed(1000 * b + step)
                items = [train[i] for i in torch.randperm(len(train), generator=g)[:b].tolist()]
                texts = [s.captions[0] for s in items]
                batch = Batch(texts=texts, tags=[s.tags for s in items])
                context = AugmentContext(step=step, epoch=1, steps_per_epoch=10, total_steps=100, training=True, generator=torch.Generator().manual_seed(step))
                hard = aug(batch, context).hard_negatives
                counts.append(len(hard.texts))
                if step < 2:  # timing: the batch alone, then with its hard negatives, interleaved
                    alone = encode_seconds(encoder, texts)
                    both = encode_seconds(encoder, texts + list(hard.texts))
                    ratios.append(both / alone)
            mean = statistics.fmean(counts)
            print(f"| {b} | {name} | {mean:.0f} | {mean / b:.2f} | {(b + mean) / b:.2f} | {statistics.fmean(ratios):.2f} |")


if __name__ == "__main__":
    main()
